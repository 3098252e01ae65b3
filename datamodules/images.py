"""Grey-level image data: scikit-learn's 8x8 Digits and MNIST-format IDX files (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import sklearn.datasets
import torch

from datamodules.base import (
    BINARIZE_MODES,
    Binarize,
    InMemoryDataset,
    TensorDataModule,
    binarize_static,
    check_choice,
    check_int,
    derive_seed,
    make_splits,
)


class Digits(TensorDataModule):
    """The 1,797 8x8 hand-written digits shipped with scikit-learn (``load_digits``), shape ``(1, 8, 8)``.

    Pixels ``/16`` to [0, 1]. ``binarize``: ``None`` keeps the 17 grey levels (``levels = 17``);
    ``"static"`` draws ``x ~ Bernoulli(grey)`` once; ``"dynamic"`` redraws the training set every epoch
    from ``(seed, epoch)`` and binarises val/test once, with the static draw (see :func:`make_splits`);
    binarised, ``levels = 2``. The digit classes 0-9 are kept as ``labels(split)``.
    Default split: 1,500 train / 150 val / 147 test (the 297 held-out images of the earlier 1,500 / 297
    split, cut in two: the training set is unchanged, val is the first 150 of the old val set).
    """

    def __init__(
        self,
        binarize: Binarize | None = None,
        val_size: int = 150,
        test_size: int = 147,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_choice("binarize", binarize, (None, *BINARIZE_MODES))
        check_int("val_size", val_size, 0)
        check_int("test_size", test_size, 0)
        if val_size + test_size >= 1797:
            raise ValueError(
                f"val_size + test_size = {val_size + test_size} leaves no training image of 1797"
            )
        self.binarize, self.val_size, self.test_size = binarize, val_size, test_size
        self.shape = (1, 8, 8)
        self.levels = 17 if binarize is None else 2

    def build(self) -> list[InMemoryDataset]:
        digits = sklearn.datasets.load_digits()
        images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        sizes = (len(images) - self.val_size - self.test_size, self.val_size, self.test_size)
        labels = torch.from_numpy(digits.target).long()
        return make_splits(images, sizes, self.seed, self.binarize, labels)


MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
LABEL_FILES = {"train": "train-labels-idx1-ubyte", "test": "t10k-labels-idx1-ubyte"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format) of unsigned bytes, gzipped if the name ends in ``.gz``.

    Layout: magic ``00 00 08 n`` (``08`` = unsigned byte, ``n`` = number of dimensions), ``n`` big-endian
    uint32 sizes, then the bytes in C order. Raises ``ValueError`` on a corrupt or truncated file.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e}); delete it and fetch it again") from e
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes: magic {raw[:4].hex()!r}, want 000008nn"
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:offset]) if len(raw) >= offset else None
    need = None if dims is None else offset + int(np.prod(dims))
    if len(raw) != need:
        raise ValueError(f"{path} is truncated or corrupt: {len(raw)} bytes, its header {dims} needs {need}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


class MNIST(TensorDataModule):
    """MNIST-format images (MNIST, Fashion-MNIST, ...) read from IDX files in ``root``; shape ``(1, 28, 28)``.

    Looks in ``root`` for ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]``. ``source``
    picks the file split into train/val (``val_size`` images for val, default 2,000); with
    ``source="train"`` the t10k file is the test split (``test_size`` must stay ``None``); with
    ``source="test"`` (the offline copy holds only the 10,000 t10k images) the file is split 8,000 train /
    1,000 val / 1,000 test by default (``val_size`` default 1,000, ``test_size`` default 1,000: the 2,000
    held-out images of the earlier 8,000 / 2,000 split cut in two, training set unchanged). Pixels ``/255``
    to [0, 1] (``levels = 256``; 2 when binarised); ``binarize`` as in :class:`Digits`. The labels files
    (``train-labels-idx1-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) are optional: where present,
    ``labels(split)`` returns them, else ``None``. ``download=True`` fetches missing files from ``mirror``
    in ``prepare_data`` (for Fashion-MNIST: ``http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/``).
    """

    def __init__(
        self,
        root: str,
        binarize: Binarize | None = None,
        source: Literal["train", "test"] = "train",
        val_size: int | None = None,
        test_size: int | None = None,
        download: bool = False,
        mirror: str = MNIST_MIRROR,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_choice("binarize", binarize, (None, *BINARIZE_MODES))
        check_choice("source", source, tuple(IMAGE_FILES))
        if val_size is None:
            val_size = 2000 if source == "train" else 1000
        if source == "train" and test_size not in (None, 0):
            raise ValueError(
                f"test_size={test_size} with source='train': the t10k file is the test split; leave "
                "test_size unset (or use source='test' to cut a test split out of the t10k file)"
            )
        test_size = 0 if source == "train" else (1000 if test_size is None else test_size)
        check_int("val_size", val_size, 0)
        check_int("test_size", test_size, 0)
        self.root, self.binarize, self.source, self.val_size = Path(root), binarize, source, val_size
        self.test_size = test_size
        self.download, self.mirror = download, mirror
        self.shape = (1, 28, 28)
        self.levels = 256 if binarize is None else 2

    def needed(self) -> list[str]:
        """Which IDX files (without ``.gz``) this configuration reads."""
        return [IMAGE_FILES[self.source]] + ([IMAGE_FILES["test"]] if self.source == "train" else [])

    def find(self, name: str) -> Path | None:
        """``root/name.gz`` or ``root/name``, whichever exists first."""
        return next((p for p in (self.root / f"{name}.gz", self.root / name) if p.is_file()), None)

    def prepare_data(self) -> None:
        """Download missing files (only with ``download=True``; Lightning runs this on one process)."""
        missing = [name for name in self.needed() if self.find(name) is None]
        if not (self.download and missing):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for name in missing:
            url, target = self.mirror + name + ".gz", self.root / f"{name}.gz"
            partial = target.with_suffix(".gz.part")
            try:
                with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
                    f.write(response.read())
            except OSError as e:
                partial.unlink(missing_ok=True)
                raise ConnectionError(
                    f"could not download {url} ({e}): no network reachable? Place {name}.gz (or the "
                    f"uncompressed {name}) in {self.root} by hand"
                ) from e
            try:
                read_idx(partial.rename(target))  # check it before anyone uses it
            except ValueError:
                target.unlink()
                raise

    def load(self, name: str) -> torch.Tensor:
        path = self.find(name)
        if path is None:
            looked = ", ".join(str(self.root / n) for n in (f"{name}.gz", name))
            raise FileNotFoundError(
                f"MNIST: none of {looked} exists. Download {name}.gz from {self.mirror} (or Fashion-MNIST's "
                f"mirror) into {self.root}, or pass download=True where a network is reachable"
            )
        images = read_idx(path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{path} holds images of shape {images.shape[1:]}, expected (28, 28)")
        return torch.from_numpy(images.copy()).float().div(255.0).unsqueeze(1)

    def load_labels(self, source: str, n: int) -> torch.Tensor | None:
        """The labels ``[n]`` of ``source``'s images, or ``None`` when its labels file is absent."""
        path = self.find(LABEL_FILES[source])
        if path is None:
            return None
        labels = read_idx(path)
        if labels.shape != (n,):
            raise ValueError(f"{path} holds labels of shape {labels.shape}, expected ({n},) for its images")
        return torch.from_numpy(labels.astype(np.int64))

    def build(self) -> list[InMemoryDataset]:
        if self.trainer is None:
            self.prepare_data()  # standalone use; under a Trainer, Lightning calls it once per node
        images = self.load(IMAGE_FILES[self.source])
        held_out = self.val_size + self.test_size
        if held_out >= len(images):
            raise ValueError(f"val_size + test_size = {held_out} leaves no training image of {len(images)}")
        sizes = (len(images) - held_out, self.val_size, self.test_size)
        labels = self.load_labels(self.source, len(images))
        train, val, test = make_splits(images, sizes, self.seed, self.binarize, labels)
        if self.source == "train":
            t10k = self.load(IMAGE_FILES["test"])
            if self.binarize is not None:
                t10k = binarize_static(t10k, derive_seed(self.seed, 2))
            test = InMemoryDataset(t10k, self.load_labels("test", len(t10k)))
        return [train, val, test]
