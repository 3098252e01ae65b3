"""genzoo's datamodules: every one has a ``shape`` and yields float32 batches ``[B, *shape]``.

``batch_size`` is global (each of ``W`` processes loads ``batch_size // W``); splits, shuffling and
binarisation are functions of ``seed`` (and the epoch). See docs/datamodules.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.base import InMemoryDataset, ShardSampler, TensorDataModule
from datamodules.episodes import Episodes
from datamodules.images import MNIST, Digits, read_idx
from datamodules.toy import Dirac, Toy2D


def shared_data_dir() -> Path:
    """``$GENZOO_DATA`` if set, else ``<repo root>/../shared/data`` (the offline data next to the repo)."""
    if env := os.environ.get("GENZOO_DATA"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


__all__ = [
    "MNIST",
    "Digits",
    "Dirac",
    "Episodes",
    "InMemoryDataset",
    "ShardSampler",
    "TensorDataModule",
    "Toy2D",
    "read_idx",
    "shared_data_dir",
]
