"""Image datamodules on synthetic data written in the real formats (tests/image_data.py): CIFAR-10's python
archive (tar.gz and extracted folder), a folder of image files, and array files. Pixels and labels read back
exactly, in the split's order; the CHW layout of CIFAR rows; Pillow's resizing and cropping against the
closed form where it is exact; the pixel convention (``levels``); sharding over two ranks; clear errors."""

from __future__ import annotations

import io
import pickle
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from image_data import (
    CIFAR_ARCHIVE,
    CIFAR_FOLDER,
    cifar_batch,
    python2_pickle,
    write_arrays,
    write_cifar_archive,
    write_image_folder,
)
from PIL import Image

import datamodules.cifar
import datamodules.folders
from datamodules import CIFAR10, Arrays, ImageFolder, TensorDataModule
from datamodules.base import split_indices


def on_ranks(dm: TensorDataModule, world: int, rank: int) -> TensorDataModule:
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm


def everything(dm: TensorDataModule, split: str) -> torch.Tensor:
    """The whole split in its order, through the split's own loader (evaluation order, one process)."""
    dm.setup()
    dataset = dm.splits[split]
    return dataset.__getitems__(list(range(len(dataset))))


def as_bytes(x: torch.Tensor) -> np.ndarray:
    """Pixels k / 255 back to k (exact: float32 k / 255 times 255 rounds to k)."""
    return (x.double() * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """One small archive in each layout, with the pixels and labels written into it."""
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar_archive(root / "tar", n_train_per_batch=6, n_test=7, tar=True, seed=1)
    same = write_cifar_archive(root / "folder", n_train_per_batch=6, n_test=7, tar=False, seed=1)
    assert all(np.array_equal(written[k], same[k]) for k in written)
    return root, written


@pytest.mark.parametrize("layout", ["tar", "folder"])
def test_cifar10_reads_pixels_labels_and_the_chw_layout_exactly(cifar, layout):
    root, written = cifar
    dm = CIFAR10(str(root / layout), val_size=8, seed=3)
    assert dm.shape == (3, 32, 32) and dm.levels == 256
    test = everything(dm, "test")
    assert test.dtype == torch.float32 and test.shape == (7, 3, 32, 32)
    assert np.array_equal(as_bytes(test), written["test"])
    assert torch.equal(dm.labels("test"), torch.from_numpy(written["test_labels"]))

    # The row layout, read with plain pickle as the dataset's web page says: pixel (c, y, x) of image i is
    # row[1024 c + 32 y + x] (red plane, green plane, blue plane, each row-major).
    if layout == "folder":
        raw = (root / layout / CIFAR_FOLDER / "test_batch").read_bytes()
    else:
        with tarfile.open(root / layout / CIFAR_ARCHIVE) as tar:
            raw = tar.extractfile(f"{CIFAR_FOLDER}/test_batch").read()
    rows = pickle.loads(raw, encoding="bytes")[b"data"]
    i, c, y, x = 5, 2, 30, 1
    assert as_bytes(test)[i, c, y, x] == rows[i, 1024 * c + 32 * y + x]
    assert as_bytes(test)[i, 0, 0, 1] == rows[i, 1] and as_bytes(test)[i, 1, 0, 0] == rows[i, 1024]

    # train / val: the 30 training images split by the seed, as Digits splits; labels follow their images.
    train_index, val_index = split_indices(30, (22, 8), seed=3)
    for split, index in (("train", train_index), ("val", val_index)):
        assert np.array_equal(as_bytes(everything(dm, split)), written["train"][index.numpy()])
        assert torch.equal(dm.labels(split), torch.from_numpy(written["train_labels"][index.numpy()]))


def test_cifar10_missing_archive_says_where_to_get_it_and_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10(str(tmp_path)).setup()
    message = str(error.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path) in message and "download=True" in message
    (tmp_path / CIFAR_FOLDER).mkdir()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_1, data_batch_2"):
        CIFAR10(str(tmp_path)).setup()


def test_cifar10_checksums(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    with pytest.raises(ValueError, match=r"has md5 [0-9a-f]{32}, not the official .*verify=False"):
        CIFAR10(str(root / "tar"), val_size=8, verify=True).setup()  # synthetic pixels: never official
    # verify=None checks exactly the batches of the official size (10,000 images; 6 here, patched).
    monkeypatch.setattr(datamodules.cifar, "OFFICIAL_BATCH_SIZE", 6)
    with pytest.raises(ValueError, match="data_batch_1 has md5"):
        CIFAR10(str(root / "folder"), val_size=8).setup()
    dm = CIFAR10(str(root / "folder"), val_size=8, verify=False)
    dm.setup()
    assert len(dm.splits["train"]) == 22


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path):
    write_cifar_archive(tmp_path, n_train_per_batch=2, n_test=2, tar=False)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return open, (str(marker), "w")

    (tmp_path / CIFAR_FOLDER / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 batch.*refusing to load .*open"):
        CIFAR10(str(tmp_path), val_size=2).setup()
    assert not marker.exists()
    # Python 3's own pickles of a batch (numpy 2 names, protocol 5) are accepted.
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}
    (tmp_path / CIFAR_FOLDER / "test_batch").write_bytes(pickle.dumps(batch, protocol=5))
    assert CIFAR10(str(tmp_path), val_size=2).labels("test").tolist() == [3, 4]


def test_cifar10_corrupt_files_raise_value_error(tmp_path):
    (tmp_path / CIFAR_ARCHIVE).write_bytes(b"not a gzip file at all")
    with pytest.raises(ValueError, match=r"not a readable tar\.gz"):
        CIFAR10(str(tmp_path)).setup()
    folder = tmp_path / "wrong_shape"
    write_cifar_archive(folder, n_train_per_batch=2, n_test=2, tar=False)
    batch = python2_pickle({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    (folder / CIFAR_FOLDER / "data_batch_3").write_bytes(batch)
    with pytest.raises(ValueError, match=r"data_batch_3 holds data uint8 \(2, 1024\).*\[N, 3072\]"):
        CIFAR10(str(folder), val_size=2).setup()


def test_cifar10_download_from_a_local_mirror(cifar, tmp_path):
    root, _ = cifar
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = CIFAR10(str(tmp_path / "a"), download=True, url=(empty / CIFAR_ARCHIVE).as_uri())
    with pytest.raises(ConnectionError, match="no network reachable"):
        dm.prepare_data()
    mirror = (root / "tar" / CIFAR_ARCHIVE).as_uri()
    with pytest.raises(
        ValueError, match="not the official c58f30108f718f92721af3b95e74349a; nothing was kept"
    ):
        CIFAR10(str(tmp_path / "a"), download=True, url=mirror).prepare_data()
    assert list((tmp_path / "a").iterdir()) == []  # neither the archive nor a partial file
    dm = CIFAR10(str(tmp_path / "b"), val_size=8, download=True, verify=False, url=mirror)
    dm.setup()  # standalone: setup runs prepare_data
    assert (tmp_path / "b" / CIFAR_ARCHIVE).read_bytes() == (root / "tar" / CIFAR_ARCHIVE).read_bytes()
    assert len(dm.splits["test"]) == 7


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    written = write_image_folder(root, 11, size=8, classes=["dog", "cat", "ant"], seed=2)
    return root, {str(path): (pixels, label) for path, pixels, label in written}


def test_image_folder_reads_files_and_class_labels_in_split_order(folder):
    root, written = folder
    dm = ImageFolder(str(root), size=8, val_size=3, test_size=2, seed=5)
    assert dm.shape == (3, 8, 8) and dm.levels == 256
    sizes = {}
    for split in ("train", "val", "test"):
        x, labels, paths = everything(dm, split), dm.labels(split), dm.splits[split].paths
        sizes[split] = len(x)
        for image, label, path in zip(x, labels, paths, strict=True):
            pixels, written_label = written[str(path)]
            assert np.array_equal(as_bytes(image), pixels.transpose(2, 0, 1))  # same size: untouched
            assert dm.classes[label] == path.split("/")[-2] and label == ["ant", "cat", "dog"].index(
                ["dog", "cat", "ant"][written_label]
            )
    assert dm.classes == ["ant", "cat", "dog"] and sizes == {"train": 6, "val": 3, "test": 2}
    every = sorted(str(p) for s in ("train", "val", "test") for p in dm.splits[s].paths)
    assert every == sorted(written)  # disjoint splits covering every file


def test_image_folder_decodes_lazily_one_batch_at_a_time(folder, monkeypatch):
    root, _ = folder
    calls = []
    decode = datamodules.folders.decode
    monkeypatch.setattr(
        datamodules.folders, "decode", lambda path, *a: calls.append(path) or decode(path, *a)
    )
    dm = ImageFolder(str(root), size=8, val_size=3, test_size=2, batch_size=4)
    loader = dm.train_dataloader()
    held = {k for k, v in vars(dm.splits["train"]).items() if isinstance(v, np.ndarray | torch.Tensor)}
    assert calls == [] and held == {"paths", "labels"} and dm.splits["train"].paths.dtype.kind == "U"
    first = next(iter(loader))
    assert first.shape == (4, 3, 8, 8) and len(calls) == 4


def test_image_folder_with_a_worker_gives_the_same_batches(folder):
    root, _ = folder
    batches = [list(ImageFolder(str(root), size=4, val_size=3, test_size=2, batch_size=3, num_workers=w)
                    .train_dataloader()) for w in (0, 1)]  # fmt: skip
    assert len(batches[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_image_folder_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 10 wide, 6 high
    tall = rng.integers(0, 256, (9, 5), dtype=np.uint8)  # 5 wide, 9 high, greyscale file
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    Image.fromarray(tall).save(tmp_path / "b_tall.png")
    decode = datamodules.folders.decode
    # Shorter side already at size: the centred square, exactly (columns 2..7; rows 2..6).
    assert np.array_equal(decode(str(tmp_path / "a_wide.png"), 6, 3), wide[:, 2:8].transpose(2, 0, 1))
    assert np.array_equal(decode(str(tmp_path / "b_tall.png"), 5, 1)[0], tall[2:7])
    # A greyscale file read as RGB repeats the grey; an RGB file read as greyscale is ITU-R 601 luma.
    assert np.array_equal(decode(str(tmp_path / "b_tall.png"), 5, 3), np.repeat(tall[None, 2:7], 3, 0))
    luma = (wide[:, 2:8] @ np.array([0.299, 0.587, 0.114])).round()
    assert np.abs(decode(str(tmp_path / "a_wide.png"), 6, 1)[0] - luma).max() <= 1
    # Shrinking: a smooth picture against Pillow's resize of the shorter side to size, then the centre crop.
    y, x = np.mgrid[0:40, 0:64]
    smooth = np.stack([4 * x, 6 * y, 2 * (x + y)], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "c_smooth.png")
    reference = np.asarray(Image.fromarray(smooth).resize((16, 10), Image.Resampling.BICUBIC))[:, 3:13]
    got = decode(str(tmp_path / "c_smooth.png"), 10, 3).transpose(1, 2, 0)
    assert got.shape == (10, 10, 3) and np.abs(got.astype(int) - reference).max() <= 4


def test_image_folder_turns_photos_upright_by_their_exif_orientation(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    upright = np.rot90(pixels, k=-1)  # 4 wide, 8 high
    got = datamodules.folders.decode(str(tmp_path / "photo.png"), 4, 3).transpose(1, 2, 0)
    assert np.array_equal(got, upright[2:6])


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(str(tmp_path / "nowhere")).setup()
    (tmp_path / "notes.txt").write_text("no image here")
    with pytest.raises(FileNotFoundError, match=r"no image in .*looked for .*\.jpeg.*\.jpg.*\.png"):
        ImageFolder(str(tmp_path)).setup()
    write_image_folder(tmp_path, 3, size=4, seed=0)
    write_image_folder(tmp_path, 2, size=4, classes=["a"], seed=0)
    with pytest.raises(ValueError, match=r"holds both images .* and class folders"):
        ImageFolder(str(tmp_path)).setup()
    broken = tmp_path / "broken"
    write_image_folder(broken, 3, size=4, seed=0)
    (broken / "image_0001.png").write_bytes(b"\x89PNG but not really")
    dm = ImageFolder(str(broken), size=4, val_size=0, test_size=0, batch_size=3)
    with pytest.raises(ValueError, match=r"cannot read the image .*image_0001\.png"):
        next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="channels=2 is not allowed"):
        ImageFolder(str(broken), channels=2)
    with pytest.raises(ValueError, match=r"val_size=1.5: a share of the examples must lie in \[0, 1\)"):
        ImageFolder(str(broken), val_size=1.5).setup()


# ---------------------------------------------------------------- Arrays


@pytest.mark.parametrize(
    ("suffix", "layout", "dtype"),
    [(".npy", "NCHW", np.uint8), (".npz", "NHWC", np.uint8), (".pt", "NHW", np.uint8),
     (".pt", "vectors", np.float32), (".npz", "NCHW", np.bool_)],
)  # fmt: skip
def test_arrays_read_every_format_and_layout_exactly(tmp_path, suffix, layout, dtype):
    rng = np.random.default_rng(0)
    stored_shape = {"NCHW": (20, 2, 3, 5), "NHWC": (20, 3, 5, 2), "NHW": (20, 3, 5), "vectors": (20, 7)}
    uniform = rng.random(stored_shape[layout])
    data = {np.uint8: (uniform * 256).astype(np.uint8), np.float32: uniform.astype(np.float32),
            np.bool_: uniform < 0.5}[dtype]  # fmt: skip
    labels = None if suffix == ".npy" else rng.integers(0, 10, 20)
    path = write_arrays(
        tmp_path / f"data{suffix}", data, labels, data_key="images" if suffix == ".pt" else "x"
    )
    dm = Arrays(str(path), channels_last=layout == "NHWC", val_size=4, test_size=0.15, seed=1)
    expected = data.transpose(0, 3, 1, 2) if layout == "NHWC" else data[:, None] if layout == "NHW" else data
    scale = {np.uint8: 255.0, np.bool_: 1.0, np.float32: 1.0}[dtype]
    assert (
        dm.shape == expected.shape[1:] and dm.levels == {np.uint8: 256, np.bool_: 2, np.float32: None}[dtype]
    )
    for split, index in zip(("train", "val", "test"), split_indices(20, (13, 4, 3), seed=1), strict=True):
        x = everything(dm, split)
        assert x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(expected[index.numpy()].astype(np.float32)) / scale)
        got = dm.labels(split)
        assert got is None if labels is None else torch.equal(got, torch.from_numpy(labels[index.numpy()]))
    if suffix == ".npy":  # memory-mapped, and a spawned worker gets the path, not a copy of the data
        assert isinstance(dm.splits["train"].array, np.memmap)
        pickled = pickle.dumps(dm)
        assert data.tobytes() not in pickled
        assert torch.equal(everything(pickle.loads(pickled), "val"), everything(dm, "val"))


def test_arrays_levels_and_bad_files(tmp_path):
    codes = np.array([[0, 1], [2, 3], [3, 0], [1, 1]], dtype=np.uint16)
    path = write_arrays(tmp_path / "four_levels.npy", codes)
    with pytest.raises(ValueError, match="uint16 integers; give levels"):
        Arrays(str(path))
    dm = Arrays(str(path), levels=4, val_size=0, test_size=0, batch_size=4)
    assert dm.levels == 4 and torch.equal(next(iter(dm.train_dataloader())).sort(0).values,
                                          torch.from_numpy(codes / 3.0).float().sort(0).values)  # fmt: skip
    dm = Arrays(str(path), levels=3, val_size=0, test_size=0, batch_size=4)
    with pytest.raises(ValueError, match=r"levels=3 must lie in 0\.\.2; found values in 0\.\.3"):
        next(iter(dm.train_dataloader()))
    both = tmp_path / "both.npz"
    np.savez(both, x=codes, images=codes)
    with pytest.raises(ValueError, match="holds both x and images; keep one"):
        Arrays(str(both), levels=4)
    unnamed = tmp_path / "unnamed.npz"
    np.savez(unnamed, a=codes, b=codes)
    with pytest.raises(ValueError, match=r"holds \['a', 'b'\]; name the data 'x' or 'images'"):
        Arrays(str(unnamed), levels=4)
    with pytest.raises(ValueError, match=r"shape \[4, 2\]; expected \[N, H, W, C\] with channels_last"):
        Arrays(str(path), levels=4, channels_last=True)
    with pytest.raises(ValueError, match=r"not one of the formats \.npy, \.npz, \.pt"):
        Arrays(str(tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Arrays(str(tmp_path / "absent.npy"))
    labelled = write_arrays(tmp_path / "l.npz", codes.astype(np.uint8), np.arange(3))
    with pytest.raises(ValueError, match="expected 4 integers, one per example"):
        Arrays(str(labelled)).setup()


# ---------------------------------------------------------------- conventions shared by all three


@pytest.fixture(scope="module")
def makers(cifar, folder, tmp_path_factory):
    root, _ = cifar
    array = tmp_path_factory.mktemp("arrays") / "images.npy"
    write_arrays(array, np.random.default_rng(3).integers(0, 256, (37, 3, 4, 4), dtype=np.uint8))
    return {
        "CIFAR10": lambda: CIFAR10(str(root / "tar"), val_size=5, batch_size=6, seed=2),
        "ImageFolder": lambda: ImageFolder(str(folder[0]), size=4, val_size=2, test_size=2, batch_size=6),
        "Arrays": lambda: Arrays(str(array), val_size=5, test_size=5, batch_size=6, seed=2),
    }


@pytest.mark.parametrize("name", ["CIFAR10", "ImageFolder", "Arrays"])
def test_two_ranks_see_the_global_batches_of_one_process(makers, name):
    make = makers[name]
    one = make().train_dataloader()
    one.sampler.set_epoch(2)
    global_batches = list(one)
    ranks = []
    for rank in range(2):
        loader = on_ranks(make(), 2, rank).train_dataloader()
        loader.sampler.set_epoch(2)
        ranks.append(list(loader))
    assert len(global_batches) == len(ranks[0]) == len(ranks[1]) >= 2
    for t, batch in enumerate(global_batches):  # global position p: rank p % 2, local position p // 2
        for p in range(len(batch)):
            assert torch.equal(ranks[p % 2][t][p // 2], batch[p])
    val = torch.cat(list(make().val_dataloader()))  # evaluation: rank r takes examples r, r + 2, ...
    for rank in range(2):
        assert torch.equal(torch.cat(list(on_ranks(make(), 2, rank).val_dataloader())), val[rank::2])


@pytest.mark.parametrize("name", ["CIFAR10", "ImageFolder", "Arrays"])
def test_pixels_follow_the_convention(makers, name):
    """float32 in [0, 1] on the grid k / (levels - 1)."""
    dm = makers[name]()
    x = torch.cat(list(dm.train_dataloader()))
    k = x.double() * (dm.levels - 1)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and dm.levels == 256
    assert torch.equal(k, k.round()) or (k - k.round()).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["CIFAR10", "ImageFolder", "Arrays"])
def test_the_cli_takes_the_new_data_by_name_and_links_their_shape(makers, name, tmp_path, monkeypatch):
    """``--data CIFAR10 --data.root ...`` etc. parse and instantiate with the shape linked into the model
    (the recipe tests train on them)."""
    from cli import GenZooCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    made = makers[name]()
    where = [f"--data.path={made.path}"] if name == "Arrays" else [f"--data.root={made.root}"]
    where += ["--data.size=16"] if name == "ImageFolder" else []
    cli = GenZooCLI(args=["--model=VAE", f"--data={name}", *where, "--data.val_size=2"], run=False)
    assert type(cli.datamodule).__name__ == name and cli.datamodule.levels == 256
    shape = (3, 16, 16) if name == "ImageFolder" else made.shape
    assert tuple(cli.model.shape) == tuple(cli.datamodule.shape) == tuple(shape)


def test_labels_of_a_split_that_has_none_is_none_and_bad_splits_are_refused(folder, tmp_path):
    flat = tmp_path / "flat"
    write_image_folder(flat, 4, size=4)
    dm = ImageFolder(str(flat), size=4, val_size=1, test_size=1)
    assert dm.labels("train") is None and dm.classes == []
    with pytest.raises(ValueError, match="split='validation' is not allowed"):
        dm.labels("validation")


def test_writers_refuse_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"a \.npy file holds one array"):
        write_arrays(tmp_path / "a.npy", np.zeros((2, 2)), np.zeros(2, int))
    assert (
        io.BytesIO(cifar_batch(np.zeros((1, 3, 32, 32), np.uint8), np.zeros(1), "b")).read(2) == b"\x80\x02"
    )
