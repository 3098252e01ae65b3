"""A folder of the user's own images (PNG, JPEG, WebP, ... whatever Pillow opens), decoded lazily per batch.

Layout: flat (every image file directly in ``root``; no labels) or one level of class folders
(``root/<class>/<image>``; label = the index of the class folder's name in sorted order, as torchvision's
``ImageFolder`` numbers them). Each image is turned upright by its EXIF orientation, converted to
``channels`` (1: Pillow mode ``"L"``, 3: ``"RGB"``; an alpha channel is dropped), and its central square is
resampled to ``size x size`` (``PIL.ImageOps.fit``: the largest centred square of the picture, i.e. the
shorter side resized to ``size`` and the longer one centre-cropped, in one bicubic, antialiased resampling).
Pixels ``k / 255`` (``levels = 256``).

Only the sorted list of file paths is held in memory (a numpy string array: DataLoader workers that read a
Python list of strings copy it page by page through reference counts); a batch decodes its own files, in the
worker that loads it when ``num_workers > 0``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import (
    TensorDataModule,
    check_choice,
    check_int,
    check_split_size,
    split_indices,
    split_sizes,
)

MODES = {1: "L", 3: "RGB"}


def image_extensions() -> tuple[str, ...]:
    """The file-name endings (lower case, with the dot) of every format Pillow can open here."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def find_images(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """The image files under ``root`` in sorted order, their labels and the class names.

    Flat: ``(files, None, [])``. Class folders: ``(files, labels, classes)`` with ``classes`` the sorted
    names of the sub-folders that hold an image and ``labels[i]`` the index of ``files[i]``'s folder.
    Hidden files and folders (names starting with ``.``) are skipped.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder: root {str(root)!r} is not a folder (missing or a file)")
    extensions = image_extensions()

    def images_in(folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )  # fmt: skip

    top = images_in(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {folder.name: found for folder in folders if (found := images_in(folder))}
    if per_class and top:
        raise ValueError(
            f"ImageFolder: {root} holds both images ({top[0].name}, ...) and class folders "
            f"({', '.join(per_class)}); put every image in a class folder, or all of them directly in root"
        )
    if not per_class and not top:
        raise FileNotFoundError(
            f"ImageFolder: no image in {root} or its sub-folders; looked for files ending in "
            f"{', '.join(extensions)} (the formats Pillow opens here, any letter case)"
        )
    if top:
        return top, None, []
    classes = sorted(per_class)
    files = [f for name in classes for f in per_class[name]]
    labels = [k for k, name in enumerate(classes) for _ in per_class[name]]
    return files, labels, classes


def decode(path: str, size: int, channels: int) -> np.ndarray:
    """One image file as uint8 ``[channels, size, size]`` (see the module docstring for the steps)."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert(MODES[channels])
            square = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"ImageFolder: cannot read the image {path} ({type(e).__name__}: {e})") from e
    pixels = np.asarray(square, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


class ImageFiles(Dataset):
    """Image files decoded when a batch asks for them: ``__getitems__`` returns float32 ``[B, C, size, size]``
    in [0, 1] (``k / 255``). ``labels`` (``[N]`` long or ``None``) stay on the dataset."""

    def __init__(self, paths: Sequence[str], size: int, channels: int, labels: Tensor | None = None) -> None:
        self.paths = np.array([str(p) for p in paths])  # one buffer, no per-string reference counts
        self.size, self.channels, self.labels = size, channels, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        batch = np.stack([decode(str(self.paths[i]), self.size, self.channels) for i in indices])
        return torch.from_numpy(batch).float().div_(255.0)


class ImageFolder(TensorDataModule):
    """The user's own images in a folder, flat or in class folders; shape ``(channels, size, size)``.

    Args:
        root: the folder (see the module docstring for the layouts and the decoding steps).
        size: the side of the square images, in pixels.
        channels: 1 (greyscale, Pillow ``"L"``) or 3 (``"RGB"``).
        val_size, test_size: counts (ints) or shares (floats in [0, 1)) of the images; the split is the
            first ``N - val - test`` images of a ``seed``-permutation for training, then val, then test
            (as :class:`datamodules.Digits`).
        batch_size: the GLOBAL batch size. num_workers: DataLoader processes decoding the images.

    ``levels = 256``. ``labels(split)``: class indices (sorted class-folder names, ``classes``), ``None`` for
    a flat folder. Unreadable files raise ``ValueError`` naming the file when their batch is loaded.

    Example:
        >>> dm = ImageFolder("photos", size=64, val_size=0.05, num_workers=4)  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader())).shape  # doctest: +SKIP
        torch.Size([128, 3, 64, 64])
    """

    def __init__(
        self,
        root: str,
        size: int = 64,
        channels: Literal[1, 3] = 3,
        val_size: int | float = 0.05,
        test_size: int | float = 0.05,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_int("size", size, 1)
        check_choice("channels", channels, tuple(MODES))
        check_split_size("val_size", val_size)
        check_split_size("test_size", test_size)
        self.root, self.size, self.channels = Path(os.path.expanduser(root)), size, channels
        self.val_size, self.test_size = val_size, test_size
        self.classes: list[str] = []
        self.shape = (channels, size, size)
        self.levels = 256

    def build(self) -> list[ImageFiles]:
        files, labels, self.classes = find_images(self.root)
        sizes = split_sizes(len(files), self.val_size, self.test_size)
        label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.long)
        out = []
        for index in split_indices(len(files), sizes, self.seed):
            part = None if label_tensor is None else label_tensor[index]
            out.append(ImageFiles([files[i] for i in index.tolist()], self.size, self.channels, part))
        return out
