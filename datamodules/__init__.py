"""genzoo's datamodules: every one has a ``shape`` and yields float32 batches ``[B, *shape]``.

``batch_size`` is global (each of ``W`` processes loads ``batch_size // W``); splits, shuffling and
binarisation are functions of ``seed`` (and the epoch). Pixels lie in [0, 1] and ``levels`` says how many
values they take (256 for 8-bit images, ``None`` for continuous data); ``labels(split)`` gives the class
labels where the data have them. See docs/datamodules.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.arrays import Arrays
from datamodules.base import ArrayRows, InMemoryDataset, ShardSampler, TensorDataModule
from datamodules.cifar import CIFAR10
from datamodules.episodes import Episodes
from datamodules.folders import ImageFolder
from datamodules.images import MNIST, Digits, read_idx
from datamodules.streaming import Streaming
from datamodules.toy import Dirac, Toy2D


def shared_data_dir() -> Path:
    """``$GENZOO_DATA`` if set, else ``<repo root>/../shared/data`` (the offline data next to the repo)."""
    if env := os.environ.get("GENZOO_DATA"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


__all__ = [
    "CIFAR10",
    "MNIST",
    "ArrayRows",
    "Arrays",
    "Digits",
    "Dirac",
    "Episodes",
    "ImageFolder",
    "InMemoryDataset",
    "ShardSampler",
    "Streaming",
    "TensorDataModule",
    "Toy2D",
    "read_idx",
    "shared_data_dir",
]
