"""Writers of small synthetic data in the real formats genzoo reads: the CIFAR-10 python archive, a folder of
image files, and array files. Pixels are random (seeded); each writer returns what it wrote, so a test
compares what a datamodule reads with it exactly. Used by tests/test_image_data.py and the recipe tests.

Example:
    >>> written = write_cifar_archive(tmp_path, n_train_per_batch=4, n_test=6)  # doctest: +SKIP
    >>> CIFAR10(str(tmp_path), val_size=4).setup()  # doctest: +SKIP
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR-10 batches (protocol 2): every ``bytes``
    and ``str`` as a Python 2 byte string (``BINSTRING`` / ``SHORT_BINSTRING``), numpy's functions under
    numpy 1's module names (``numpy.core.multiarray._reconstruct``). Python 3's own protocol-2 pickles spell
    both differently (``_codecs.encode``, ``numpy._core``), so the reader is tested on the real spelling."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", None) or "builtins"
        name = name or obj.__qualname__
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def python2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 pickled the CIFAR-10 batches (:class:`Python2Pickler`)."""
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch(images: np.ndarray, labels: np.ndarray, label: str) -> bytes:
    """One batch file's bytes: ``{b"batch_label", b"labels", b"data", b"filenames"}`` as in the archive.
    A row of ``data`` is the red plane, then green, then blue, each row-major: ``[c, y, x] -> 1024 c + 32 y
    + x``, written here index by index rather than by a reshape, so the reader's layout is checked."""
    n = len(images)
    c, y, x = np.indices((3, 32, 32)).reshape(3, -1)
    rows = np.zeros((n, 3072), dtype=np.uint8)
    rows[:, 1024 * c + 32 * y + x] = images[:, c, y, x]
    batch = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(n)],
    }
    return python2_pickle(batch)


def write_cifar_archive(
    directory: str | Path, n_train_per_batch: int = 4, n_test: int = 4, tar: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write CIFAR-10's python archive with synthetic pixels into ``directory``: ``cifar-10-python.tar.gz``
    (``tar=True``) or the extracted ``cifar-10-batches-py/`` folder: ``data_batch_1..5`` of
    ``n_train_per_batch`` images each, ``test_batch`` of ``n_test``, ``batches.meta``, ``readme.html``.

    Returns ``{"train": uint8 [5 n, 3, 32, 32], "train_labels": [5 n], "test": ..., "test_labels": ...}``
    in file order (batch 1 first).
    """
    rng = np.random.default_rng(seed)
    n_train = 5 * n_train_per_batch
    written = {
        "train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train),
        "test": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test),
    }
    files = {}
    for b in range(5):
        part = slice(b * n_train_per_batch, (b + 1) * n_train_per_batch)
        files[f"data_batch_{b + 1}"] = cifar_batch(
            written["train"][part], written["train_labels"][part], f"training batch {b + 1} of 5"
        )
    files["test_batch"] = cifar_batch(written["test"], written["test_labels"], "testing batch 1 of 1")
    meta = {b"num_cases_per_batch": n_train_per_batch, b"label_names": CIFAR_LABEL_NAMES, b"num_vis": 3072}
    files["batches.meta"] = python2_pickle(meta)
    files["readme.html"] = b"<meta HTTP-EQUIV='REFRESH' content='0; url=https://www.cs.toronto.edu/~kriz/'>"

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tar:
        with tarfile.open(directory / CIFAR_ARCHIVE, "w:gz") as archive:
            folder = tarfile.TarInfo(CIFAR_FOLDER)
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(folder)
            for name, data in files.items():
                info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))
    else:
        (directory / CIFAR_FOLDER).mkdir(exist_ok=True)
        for name, data in files.items():
            (directory / CIFAR_FOLDER / name).write_bytes(data)
    return written


def write_image_folder(
    directory: str | Path,
    n: int,
    size: int | tuple[int, int] = 16,
    classes: Sequence[str] | None = None,
    channels: int = 3,
    suffix: str = ".png",
    seed: int = 0,
) -> list[tuple[Path, np.ndarray, int | None]]:
    """Write ``n`` random images into ``directory`` (flat) or, with ``classes``, round-robin into
    ``directory/<class>/`` (image ``i`` in class ``i % len(classes)``). ``size``: the side of square images,
    or ``(width, height)``. ``suffix``: any format Pillow writes (``.png`` keeps pixels exact; ``.jpg`` is
    lossy). Returns ``[(path, pixels uint8 [H, W] or [H, W, 3], label or None)]`` in writing order."""
    rng = np.random.default_rng(seed)
    width, height = (size, size) if isinstance(size, int) else size
    directory = Path(directory)
    out = []
    for i in range(n):
        label = None if classes is None else i % len(classes)
        folder = directory if classes is None else directory / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        shape = (height, width) if channels == 1 else (height, width, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"image_{i:04d}{suffix}"
        Image.fromarray(pixels).save(path)
        out.append((path, pixels, label))
    return out


def write_arrays(
    path: str | Path,
    data: np.ndarray,
    labels: np.ndarray | None = None,
    data_key: str = "x",
    label_key: str = "y",
) -> Path:
    """Write ``data`` (and ``labels``) in the format of ``path``'s suffix: ``.npy`` (data only), ``.npz``
    (``np.savez`` under ``data_key`` / ``label_key``), ``.pt`` (``torch.save`` of a dict of tensors, or of
    the data tensor alone when there are no labels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        if labels is not None:
            raise ValueError("a .npy file holds one array; use .npz or .pt for labels")
        np.save(path, data)
    elif path.suffix == ".npz":
        np.savez(path, **{data_key: data, **({} if labels is None else {label_key: labels})})
    elif path.suffix == ".pt":
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        content = tensor if labels is None else {data_key: tensor, label_key: torch.from_numpy(labels)}
        torch.save(content, path)
    else:
        raise ValueError(f"unknown array format {path.suffix!r}; use .npy, .npz or .pt")
    return path
