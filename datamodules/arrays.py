"""Images or vectors from one array file: ``.npy`` (memory-mapped), ``.npz`` or ``.pt``.

What the file holds:

* ``.npy``: the data array alone (no labels). Opened with ``np.load(mmap_mode="r")``: an array larger than
  memory is read one batch at a time, and DataLoader workers share the operating system's page cache.
* ``.npz`` (``np.savez``) or ``.pt`` holding a dict (``torch.save({...})``): the data under the key ``x`` or
  ``images`` (or the only array in the file), the labels, optional, under ``y`` or ``labels``. A ``.pt``
  may also hold the data tensor alone. ``.npz`` members cannot be memory-mapped: they are read into memory
  once per process; ``.pt`` files (zip format, the default since torch 1.6) are memory-mapped
  (``torch.load(mmap=True)``).

Layouts (``N`` examples): ``[N, D]`` vectors, shape ``(D,)``; ``[N, H, W]`` greyscale images, shape
``(1, H, W)``; ``[N, C, H, W]`` images, shape ``(C, H, W)``; with ``channels_last=True``, ``[N, H, W, C]``
images (as Pillow, OpenCV and TensorFlow store them), returned as ``[B, C, H, W]``. The layout is never
guessed from the sizes: ``[N, 32, 32, 3]`` without ``channels_last`` is 32 channels of 32 x 3 pixels.

Values: uint8 ``k`` becomes ``k / 255`` (``levels = 256``); bool becomes 0 / 1 (``levels = 2``); other
integer types need ``levels`` and become ``k / (levels - 1)``; floats are kept as they are (images should
be in [0, 1]) with ``levels=None`` unless given. Integer data stay as stored and become float32 one batch
at a time; a value above ``levels - 1`` raises ``ValueError`` when its batch is loaded.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datamodules.base import ArrayRows, TensorDataModule, check_int, split_indices, split_sizes

SUFFIXES = (".npy", ".npz", ".pt")
DATA_KEYS, LABEL_KEYS = ("x", "images"), ("y", "labels")


def pick_keys(path: Path, keys: list[str]) -> tuple[str, str | None]:
    """``(data key, label key or None)`` of a file holding arrays named ``keys`` (module docstring's rule)."""
    data = [k for k in DATA_KEYS if k in keys]
    labels = [k for k in LABEL_KEYS if k in keys]
    if len(data) > 1 or len(labels) > 1:
        raise ValueError(
            f"Arrays: {path} holds both {' and '.join(data if len(data) > 1 else labels)}; keep one"
        )
    if not data and len(keys) == 1:
        data = keys
    if not data:
        raise ValueError(
            f"Arrays: {path} holds {sorted(keys)}; name the data 'x' or 'images' (labels, optional, 'y' or "
            "'labels'), or store the data array alone"
        )
    return data[0], labels[0] if labels else None


def as_numpy(value: object, path: Path, key: str) -> np.ndarray:
    """A loaded array or tensor as a numpy array sharing its memory (bfloat16 / half become float32)."""
    if isinstance(value, Tensor):
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"Arrays: {path}[{key!r}] is a {type(value).__name__}, not an array or a tensor")


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The data array (memory-mapped for ``.npy`` and zip-format ``.pt``) and the labels (or ``None``)."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            data_key, label_key = pick_keys(path, list(npz.keys()))
            return npz[data_key], None if label_key is None else npz[label_key]
    try:
        content = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict):
        return as_numpy(content, path, "<file>"), None
    data_key, label_key = pick_keys(path, list(content))
    labels = None if label_key is None else as_numpy(content[label_key], path, label_key)
    return as_numpy(content[data_key], path, data_key), labels


def data_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the data array, reading as little as the format allows (a header for .npy and
    .npz, the memory map for .pt)."""
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as archive:
            names = [n.removesuffix(".npy") for n in archive.namelist()]
            data_key, _ = pick_keys(path, names)
            with archive.open(data_key + ".npy") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
        return tuple(shape), np.dtype(dtype)
    data, _ = load_arrays(path)
    return tuple(data.shape), data.dtype


class ArrayFile:
    """One file's arrays, opened on first use in each process (memory maps are not inherited by pickling);
    it pickles as its path, so a spawned worker opens the file itself instead of receiving a copy."""

    def __init__(self, path: Path) -> None:
        self.path, self.loaded = path, None

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.loaded is None:
            self.loaded = load_arrays(self.path)
        return self.loaded

    def __getstate__(self) -> dict:
        return {"path": self.path, "loaded": None}


class FileRows(ArrayRows):
    """:class:`ArrayRows` of an :class:`ArrayFile`, reshaped to ``[B, *shape]`` (adds greyscale's channel)."""

    def __init__(self, source: ArrayFile, index: Tensor, labels: Tensor | None, levels: int | None,
                 channels_last: bool, shape: tuple[int, ...]) -> None:  # fmt: skip
        super().__init__(None, index, labels, levels, channels_last)
        self.source, self.shape = source, shape

    @property
    def array(self) -> np.ndarray:
        return self.source.arrays()[0]

    def __getitems__(self, indices) -> Tensor:
        return super().__getitems__(indices).reshape(len(indices), *self.shape)


class Arrays(TensorDataModule):
    """Images ``[N, C, H, W]`` / ``[N, H, W]`` / ``[N, H, W, C]`` or vectors ``[N, D]`` from a ``.npy``,
    ``.npz`` or ``.pt`` file (module docstring: keys, layouts, values).

    Args:
        path: the file.
        levels: values a pixel takes (``x = k / (levels - 1)``); default 256 for uint8, 2 for bool, ``None``
            for floats; required for other integer types.
        channels_last: the images are stored ``[N, H, W, C]``.
        val_size, test_size: counts (ints) or shares (floats in [0, 1)) of the examples, split by ``seed``
            as in :class:`datamodules.Digits`.
        batch_size: the GLOBAL batch size.

    ``labels(split)``: the file's labels (``[N]`` integers) in each split's order, else ``None``.
    """

    def __init__(
        self,
        path: str,
        levels: int | None = None,
        channels_last: bool = False,
        val_size: int | float = 0.05,
        test_size: int | float = 0.05,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.path = Path(os.path.expanduser(path))
        if self.path.suffix not in SUFFIXES:
            raise ValueError(f"Arrays: {self.path} is not one of the formats {', '.join(SUFFIXES)}")
        if not self.path.is_file():
            raise FileNotFoundError(f"Arrays: {self.path} does not exist")
        shape, dtype = data_header(self.path)
        self.levels = self.default_levels(dtype, levels)
        self.channels_last, self.val_size, self.test_size = channels_last, val_size, test_size
        self.shape = self.example_shape(shape, channels_last)

    def default_levels(self, dtype: np.dtype, levels: int | None) -> int | None:
        """``levels`` checked against the stored ``dtype``, or its default (class docstring)."""
        if levels is not None:
            check_int("levels", levels, 2)
        if dtype == np.bool_:
            if levels not in (None, 2):
                raise ValueError(f"levels={levels} for boolean data in {self.path}: they take 2 values")
            return 2
        if np.issubdtype(dtype, np.integer):
            top = 256 if dtype == np.uint8 else None
            if levels is None and top is None:
                raise ValueError(
                    f"Arrays: {self.path} holds {dtype} integers; give levels, the number of values a pixel "
                    "takes (x = k / (levels - 1))"
                )
            if top is not None and levels is not None and levels > top:
                raise ValueError(f"levels={levels} for uint8 data in {self.path}: at most 256")
            return levels or top
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"Arrays: {self.path} holds {dtype} data; store integers, booleans or floats")
        return levels

    def example_shape(self, shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
        """One example's shape ``(D,)`` or ``(C, H, W)`` from the stored ``[N, ...]`` (module docstring)."""
        if len(shape) not in (2, 3, 4) or (channels_last and len(shape) != 4):
            need = "[N, H, W, C] with channels_last" if channels_last else "[N, D], [N, H, W] or [N, C, H, W]"
            raise ValueError(f"Arrays: {self.path} holds an array of shape {list(shape)}; expected {need}")
        if len(shape) == 3:
            return (1, *shape[1:])
        return (shape[3], shape[1], shape[2]) if channels_last else tuple(shape[1:])

    def build(self) -> list[FileRows]:
        source = ArrayFile(self.path)
        data, labels = source.arrays()
        if labels is not None:
            if labels.shape != data.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"Arrays: the labels in {self.path} are {labels.dtype} {list(labels.shape)}; expected "
                    f"{len(data)} integers, one per example"
                )
            labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        sizes = split_sizes(len(data), self.val_size, self.test_size)
        return [
            FileRows(source, index, labels, self.levels, self.channels_last, self.shape)
            for index in split_indices(len(data), sizes, self.seed)
        ]
