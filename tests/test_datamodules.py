"""Datamodules: deterministic disjoint splits, DistributedSampler sharding, one-op batch fetch, exact
densities of the toy data, dynamic binarisation, the IDX reader and bad input."""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from datamodules import (
    MNIST,
    Digits,
    Dirac,
    Episodes,
    InMemoryDataset,
    ShardSampler,
    TensorDataModule,
    Toy2D,
    read_idx,
    shared_data_dir,
)


class Arange(TensorDataModule):
    """Example ``i`` is ``[i]`` for ``i < n``: batches show which indices were loaded."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.n, self.shape = n, (1,)

    def build(self):
        data = InMemoryDataset(torch.arange(self.n, dtype=torch.float32)[:, None])
        return data, data, data


def batches(dm: TensorDataModule, split: str = "train", epoch: int = 0) -> list[list[int]]:
    loader = dm.loader(split)
    loader.sampler.set_epoch(epoch)
    return [b[:, 0].long().tolist() for b in loader]


def on_ranks(dm: TensorDataModule, world: int, rank: int) -> TensorDataModule:
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm


# ---------------------------------------------------------------- splits


def splits(dm: TensorDataModule) -> dict[str, torch.Tensor]:
    dm.setup()
    return {k: v.data for k, v in dm.splits.items()}


def test_splits_deterministic_disjoint_and_sized():
    a, b, c = (splits(Toy2D("moons", 300, 50, 40, seed=s)) for s in (0, 0, 1))
    assert {k: len(v) for k, v in a.items()} == {"train": 300, "val": 50, "test": 40}
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["val"], c["val"])
    rows = [{tuple(r) for r in a[k].tolist()} for k in a]  # continuous draws: a shared row means overlap
    assert sum(map(len, rows)) == 390 and len(set.union(*rows)) == 390
    digits = splits(Digits(val_size=200, test_size=97, seed=4))
    assert {k: len(v) for k, v in digits.items()} == {"train": 1500, "val": 200, "test": 97}


def test_split_indices_partition_by_index():
    from datamodules.base import split_indices

    parts = split_indices(1797, (1500, 297), seed=3)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1797))
    assert [len(p) for p in parts] == [1500, 297]
    assert torch.equal(parts[1], split_indices(1797, (1500, 297), seed=3)[1])
    assert not torch.equal(parts[1], split_indices(1797, (1500, 297), seed=4)[1])


# ---------------------------------------------------------------- sharding


def test_train_shards_reassemble_the_one_process_batches():
    n, batch, world, epoch = 103, 8, 2, 5  # 103 is not divisible by 2 or 8
    dataset = InMemoryDataset(torch.arange(n))
    samplers = [ShardSampler(dataset, world, r, train=True, seed=7) for r in range(world)]
    single = ShardSampler(dataset, 1, 0, train=True, seed=7)
    for s in [*samplers, single]:
        s.set_epoch(epoch)
    glob, local = list(single), [list(s) for s in samplers]
    assert sorted(glob) == list(range(n)) and len(local[0]) == len(local[1]) == 52  # padded by one
    b = batch // world
    for t in range(math.ceil(n / batch)):
        g = glob[t * batch : (t + 1) * batch]
        for p, index in enumerate(g):  # global position p -> rank p % W, local position p // W
            assert local[p % world][t * b + p // world] == index
        union = set(local[0][t * b : (t + 1) * b]) | set(local[1][t * b : (t + 1) * b])
        assert union == set(g) | ({glob[0]} if len(g) < batch else set())  # last batch: one padded copy


def test_datamodule_loaders_reassemble_the_one_process_batches():
    one = batches(Arange(103, batch_size=8, seed=2), epoch=3)
    two = [batches(on_ranks(Arange(103, batch_size=8, seed=2), 2, r), epoch=3) for r in range(2)]
    assert [len(b) for b in one] == [8] * 12 + [7] and [len(b) for b in two[0]] == [4] * 13
    for t, g in enumerate(one):
        assert [two[p % 2][t][p // 2] for p in range(len(g))] == g
    assert batches(Arange(103, 8, seed=2), epoch=4) != one  # a new permutation every epoch


@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_have_no_duplicates_and_cover_everything(world):
    shards = [batches(on_ranks(Arange(103, batch_size=6), world, r), "val") for r in range(world)]
    flat = [i for shard in shards for b in shard for i in b]
    assert sorted(flat) == list(range(103))  # no padding, no duplicates
    assert [i for b in shards[1] for i in b] == list(range(1, 103, world))  # in order, rank::W


def test_batches_are_fetched_with_one_getitems_call(monkeypatch):
    calls = {"item": 0, "items": 0}
    getitems = InMemoryDataset.__getitems__

    def count_items(self, indices):
        calls["items"] += 1
        return getitems(self, indices)

    def count_item(self, index):
        calls["item"] += 1
        return self.data[index]

    monkeypatch.setattr(InMemoryDataset, "__getitems__", count_items)
    monkeypatch.setattr(InMemoryDataset, "__getitem__", count_item)
    out = list(Toy2D(n_train=1000, batch_size=64).train_dataloader())
    assert calls == {"item": 0, "items": 16} and len(out) == 16
    assert all(x.dtype == torch.float32 and isinstance(x, torch.Tensor) for x in out)


def test_dirac_every_example_is_loc():
    dm = Dirac(loc=1.5, n_train=100, batch_size=10)
    x = torch.cat(list(dm.train_dataloader()))
    assert dm.shape == (1,) and x.shape == (100, 1) and bool((x == 1.5).all())


# ---------------------------------------------------------------- exact densities


def reference_mixture_log_prob(x: np.ndarray, centers: np.ndarray, std: float) -> np.ndarray:
    """log((1/M) Σ_m N(x; c_m, std² I)) written out in numpy."""
    sq = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    return logsumexp(-sq / (2 * std**2), axis=1) - math.log(len(centers)) - math.log(2 * math.pi * std**2)


@pytest.mark.parametrize(("name", "half"), [("8gaussians", 2.5), ("25gaussians", 5.0)])
def test_mixture_log_prob(name, half):
    dm = Toy2D(name)
    step = dm.std / 2  # the trapezoid error on a Gaussian is ~ exp(-2π² std² / step²) = e^-79
    grid = torch.arange(-half, half + step / 2, step, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    density = dm.log_prob(xy).exp().reshape(len(grid), len(grid))
    total = torch.trapezoid(torch.trapezoid(density, grid), grid).item()
    assert abs(total - 1) < 1e-3

    points = torch.tensor(
        [[0.0, 0.0], [2.0, 0.0], [1.41, 1.43], [2.0, 2.05], [0.3, -4.0]], dtype=torch.float64
    )
    expected = reference_mixture_log_prob(points.numpy(), dm.centers.double().numpy(), dm.std)
    np.testing.assert_allclose(dm.log_prob(points).numpy(), expected, rtol=1e-10)

    # Separated modes: H = log M + log(2πe σ²) up to overlap ~ 1e-100; 20k samples give SE ≈ 0.007 nats.
    x = dm.sample(20000, torch.Generator().manual_seed(1))
    entropy = math.log(len(dm.centers)) + math.log(2 * math.pi * math.e * dm.std**2)
    assert abs(-dm.log_prob(x).mean().item() - entropy) < 0.03


def test_checkerboard_log_prob():
    dm = Toy2D("checkerboard")
    grid = torch.linspace(-5, 5, 1001, dtype=torch.float64)  # step 0.01: the square edges lie on the grid
    density = dm.log_prob(torch.cartesian_prod(grid, grid)).exp().reshape(1001, 1001)
    assert abs(torch.trapezoid(torch.trapezoid(density, grid), grid).item() - 1) < 1e-3

    points = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [3.9, -0.5], [0.5, 0.5], [4.5, 0.0]])
    black = [True, False, True, True, True, False]
    expected = torch.tensor([-math.log(32) if b else -math.inf for b in black])
    assert torch.equal(dm.log_prob(points), expected)

    x = dm.sample(5000, torch.Generator().manual_seed(0))
    assert torch.allclose(dm.log_prob(x), torch.full((5000,), -math.log(32)))  # entropy is log 32
    assert x.min() >= -4 and x.max() <= 4


@pytest.mark.parametrize("name", ["moons", "swissroll"])
def test_no_closed_form_density(name):
    dm = Toy2D(name)
    x = dm.sample(2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and x.abs().max() < 4.5 and x.std(0).min() > 0.4
    assert not dm.has_log_prob and not hasattr(dm, "centers")
    with pytest.raises(NotImplementedError, match="8gaussians, 25gaussians, checkerboard"):
        dm.log_prob(x)


def test_toy_data_is_a_function_of_seed():
    def train(seed):
        dm = Toy2D("8gaussians", 500, 10, 10, seed=seed)
        dm.setup()
        return dm.splits["train"].data

    assert torch.equal(train(3), train(3)) and not torch.equal(train(3), train(4))


# ---------------------------------------------------------------- binarisation


def test_dynamic_binarisation():
    dm = Digits(binarize="dynamic", seed=5)
    loader = dm.train_dataloader()  # runs setup
    train = dm.splits["train"]
    grey = train.grey
    x0 = train.data.clone()
    loader.sampler.set_epoch(1)  # as Lightning does at every epoch start
    x1 = train.data.clone()
    assert not torch.equal(x0, x1) and set(x1.unique().tolist()) == {0.0, 1.0}
    loader.sampler.set_epoch(0)
    assert torch.equal(train.data, x0)  # same (seed, epoch) -> same draw: on every rank, after a resume

    other = on_ranks(Digits(binarize="dynamic", seed=5), 2, 1)
    other.train_dataloader().sampler.set_epoch(1)
    assert torch.equal(other.splits["train"].data, x1)

    # Over K epochs each pixel's mean is Binomial(K, p)/K: standardised errors z have E z² = 1.
    k = 400
    total = np.zeros(grey.shape)
    for epoch in range(k):
        train.set_epoch(epoch)
        total += train.data.numpy()  # numpy: torch's tiny threaded adds are slow on 2 cores
    mean = torch.from_numpy(total / k).float()
    certain = (grey == 0) | (grey == 1)
    assert torch.equal(mean[certain], grey[certain])
    p = grey[~certain]
    z = (mean[~certain] - p) / (p * (1 - p) / k).sqrt()
    assert abs(z.pow(2).mean().item() - 1) < 0.05 and z.abs().max() < 6
    assert (mean - grey).abs().max() < 0.15

    # The evaluation set is binarised once, identically in the static and the dynamic mode.
    static = Digits(binarize="static", seed=5)
    static.setup()
    assert torch.equal(static.splits["val"].data, dm.splits["val"].data)


def test_static_binarisation_is_fixed():
    dm = Digits(binarize="static", seed=2)
    loader = dm.train_dataloader()
    x0 = dm.splits["train"].data.clone()
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)
        assert torch.equal(torch.cat(list(loader)), x0[list(loader.sampler)])  # the same images, reordered
    assert torch.equal(dm.splits["train"].data, x0) and set(x0.unique().tolist()) == {0.0, 1.0}
    grey = Digits(seed=2)
    grey.setup()
    g = grey.splits["train"].data
    assert len(g.unique()) == 17 and g.max() == 1 and g.min() == 0  # 17 grey levels /16
    assert abs(x0.mean().item() - g.mean().item()) < 0.005  # E[Bernoulli(p)] = p over 96,000 pixels


# ---------------------------------------------------------------- MNIST files

MNIST_T10K = shared_data_dir() / "mnist" / "t10k-images-idx3-ubyte.gz"
needs_mnist = pytest.mark.skipif(not MNIST_T10K.exists(), reason=f"offline MNIST copy absent: {MNIST_T10K}")


@needs_mnist
def test_mnist_reads_the_offline_test_split():
    assert hashlib.md5(MNIST_T10K.read_bytes()).hexdigest() == "9fb629c4189551a2d022fa330f9573f3"
    raw = read_idx(MNIST_T10K)
    assert raw.shape == (10000, 28, 28) and raw.dtype == np.uint8 and raw.max() == 255
    assert int(raw[0].sum()) == 18454 and int(raw.sum(dtype=np.int64)) == 264923200

    dm = MNIST(str(MNIST_T10K.parent), source="test", batch_size=100)
    x = next(iter(dm.train_dataloader()))
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 8000, "val": 1000, "test": 1000}
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    everything = torch.cat([dm.splits[k].data for k in ("train", "val", "test")])
    assert (everything.double() * 255).round().sum().item() == 264923200  # x = k / 255 exactly up to fp32


def test_mnist_missing_files_name_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz.*download=True"):
        MNIST(str(tmp_path / "nowhere"), source="test").setup()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte"):
        MNIST(str(tmp_path)).setup()


def test_corrupt_idx_files_raise_value_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable gzip"):
        MNIST(str(tmp_path), source="test").setup()
    bad_magic = tmp_path / "bad" / "t10k-images-idx3-ubyte"
    bad_magic.parent.mkdir()
    bad_magic.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="magic"):
        MNIST(str(bad_magic.parent), source="test").setup()
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes.fromhex("00000803000000020000001c0000001c") + b"\x00" * 784)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


@needs_mnist
def test_mnist_download_from_a_local_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    dm = MNIST(str(tmp_path / "root"), source="test", download=True, mirror=mirror.as_uri() + "/")
    with pytest.raises(ConnectionError, match="no network reachable"):
        dm.prepare_data()  # the mirror is empty
    assert not (tmp_path / "root" / "t10k-images-idx3-ubyte.gz").exists()  # nothing half-written
    shutil.copy(MNIST_T10K, mirror)
    dm.setup()  # standalone: setup runs prepare_data
    assert len(dm.splits["train"]) == 8000


def test_shared_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GENZOO_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("GENZOO_DATA")
    assert shared_data_dir().parts[-2:] == ("shared", "data")


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_value_and_the_choices():
    with pytest.raises(
        ValueError, match=r"'spiral'.*8gaussians, 25gaussians, swissroll, moons, checkerboard"
    ):
        Toy2D("spiral")
    with pytest.raises(ValueError, match=r"binarize='sometimes'.*'static', 'dynamic'"):
        Digits(binarize="sometimes")
    with pytest.raises(ValueError, match="source='valid'"):
        MNIST("x", source="valid")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        Dirac(batch_size=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        Toy2D(seed=-1)
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the world size 2"):
        on_ranks(Dirac(batch_size=5), 2, 0).train_dataloader()
    with pytest.raises(ValueError, match="empty test split"):
        Digits(test_size=0).test_dataloader()


# ---------------------------------------------------------------- default test splits


def test_digits_has_a_test_split_by_default_and_the_training_set_did_not_move():
    """Default 1,500 / 150 / 147: the old 1,500 / 297 training set exactly, val the first 150 of the old val
    set, test the other 147; disjoint by index (pixels can repeat between digits, indices cannot)."""
    for seed in (0, 3):
        new = splits(Digits(seed=seed))
        assert {k: len(v) for k, v in new.items()} == {"train": 1500, "val": 150, "test": 147}
        old = splits(Digits(val_size=297, test_size=0, seed=seed))
        assert torch.equal(new["train"], old["train"])
        assert torch.equal(torch.cat([new["val"], new["test"]]), old["val"])
    index = splits_by_index(1797, (1500, 150, 147), 0)
    assert len(set().union(*index)) == 1797


def splits_by_index(n: int, sizes, seed: int) -> list[set[int]]:
    from datamodules.base import split_indices

    return [set(i.tolist()) for i in split_indices(n, sizes, seed)]


@needs_mnist
def test_mnist_offline_test_split_leaves_the_training_set_unchanged():
    new = splits(MNIST(str(MNIST_T10K.parent), source="test", seed=1))
    old = splits(MNIST(str(MNIST_T10K.parent), source="test", val_size=2000, test_size=0, seed=1))
    assert torch.equal(new["train"], old["train"]) and len(new["train"]) == 8000
    assert torch.equal(torch.cat([new["val"], new["test"]]), old["val"])


def test_mnist_test_size_with_the_train_file_is_refused():
    with pytest.raises(ValueError, match="the t10k file is the test split"):
        MNIST("x", source="train", test_size=500)


@pytest.mark.parametrize(
    "make", [lambda: Digits(), lambda: Toy2D(), lambda: Dirac()], ids=["Digits", "Toy2D", "Dirac"]
)
def test_every_datamodule_has_a_test_loader_by_default(make):
    dm = make()
    assert sum(len(b) for b in dm.test_dataloader()) == len(dm.splits["test"]) > 0


# ---------------------------------------------------------------- pixel levels and labels


@pytest.mark.parametrize(
    ("make", "levels"),
    [
        (lambda: Toy2D(), None),
        (lambda: Dirac(), None),
        (lambda: Digits(), 17),
        (lambda: Digits(binarize="static"), 2),
        (lambda: Digits(binarize="dynamic"), 2),
        (lambda: Episodes(base="Digits", train_episodes=4, val_episodes=4, test_episodes=4), 17),
    ],
    ids=["Toy2D", "Dirac", "Digits", "Digits-static", "Digits-dynamic", "Episodes-Digits"],
)
def test_levels_say_which_grid_the_values_lie_on(make, levels):
    """``x = k / (levels - 1)`` with every ``k`` in ``0 .. levels - 1`` taken somewhere; None: continuous."""
    dm = make()
    assert dm.levels == levels
    dm.setup()
    data = dm.splits["train"]
    x = data.images if isinstance(dm, Episodes) else data.data
    if levels is None:
        assert len(x.unique()) > 17 or isinstance(dm, Dirac)  # Dirac: one real value, no grid
        return
    k = x.double() * (levels - 1)
    assert torch.equal(k, k.round()) and set(k.unique().long().tolist()) == set(range(levels))


@needs_mnist
@pytest.mark.parametrize("binarize", [None, "static"])
def test_mnist_levels_and_labels(binarize):
    dm = MNIST(str(MNIST_T10K.parent), source="test", binarize=binarize)
    assert dm.levels == (256 if binarize is None else 2)
    k = dm.labels("val")
    labels = read_idx(MNIST_T10K.parent / "t10k-labels-idx1-ubyte.gz")
    index = splits_by_index_list(10000, (8000, 1000, 1000), dm.seed)
    assert torch.equal(k, torch.from_numpy(labels[index[1]].astype(np.int64)))
    if binarize is None:  # the labels follow their images
        raw = torch.from_numpy(read_idx(MNIST_T10K)[index[1]].copy()).float().div(255).unsqueeze(1)
        assert torch.equal(dm.splits["val"].data, raw)


def splits_by_index_list(n: int, sizes, seed: int) -> list[np.ndarray]:
    from datamodules.base import split_indices

    return [i.numpy() for i in split_indices(n, sizes, seed)]


def test_mnist_without_labels_files_has_labels_none(tmp_path):
    header = bytes.fromhex("00000803") + (12).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(12 * 784))
    dm = MNIST(str(tmp_path), source="test", val_size=2, test_size=2)
    assert dm.labels("train") is None and len(dm.splits["train"]) == 8


@pytest.mark.parametrize("binarize", [None, "dynamic"])
def test_digits_labels_follow_their_images_in_every_split(binarize):
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    dm = Digits(binarize=binarize, seed=3)
    for split, index in zip(
        ("train", "val", "test"), splits_by_index_list(1797, (1500, 150, 147), 3), strict=True
    ):
        assert torch.equal(dm.labels(split), torch.from_numpy(digits.target[index]).long())
        if binarize is None:
            assert torch.equal(
                dm.splits[split].data[:, 0], torch.from_numpy(digits.images[index]).float() / 16
            )
    assert dm.labels("test").dtype == torch.long and Toy2D().labels("val") is None
