"""CIFAR-10 from its standard python archive, ``cifar-10-python.tar.gz`` or its extracted folder.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html) holds ``cifar-10-batches-py/data_batch_1`` ..
``data_batch_5`` (50,000 training images) and ``test_batch`` (10,000): pickles of a dict with ``b"data"``, a
uint8 array ``[N, 3072]`` whose row is one 32x32 image as its red plane, then green, then blue, each plane
row-major (so pixel ``(c, y, x)`` is ``row[1024 c + 32 y + x]``), and ``b"labels"``, N ints in 0..9.

Pickles can run code when loaded; :class:`BatchUnpickler` only builds the plain types and the numpy arrays a
batch consists of, so a tampered archive fails with an error instead of running anything.

Checksums (``verify``): the official files' md5 sums (the ones torchvision checks) identify the real CIFAR-10,
and a synthetic archive in the same format (the tests', or a user's own data written that way) cannot match
them. So ``verify=None`` (default) checks a batch's md5 exactly when it holds the official 10,000 images (a
real batch, which must then be intact) and a downloaded archive always; ``True`` checks every batch (only the
official data pass); ``False`` checks nothing. Corruption elsewhere still fails: gzip's CRC, the tar
structure, the pickle and the array shapes are checked on every read.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from datamodules.base import ArrayRows, TensorDataModule, check_int, split_indices

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # 170,498,071 bytes
BATCH_MD5 = {  # torchvision.datasets.CIFAR10's train_list / test_list
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_BATCH_SIZE = 10_000


class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch: builtin containers, bytes, numbers and numpy arrays, nothing else.

    The official files were written by Python 2 with numpy 1 (``numpy.core.multiarray._reconstruct``);
    numpy 2 writes ``numpy._core...``, protocol 5 ``_frombuffer``, and Python 3 at protocol 2 writes bytes as
    ``_codecs.encode(text, "latin1")``: every spelling maps to the same harmless function.
    """

    ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")
        return self.ALLOWED[(module, name)]


def read_batch(raw: bytes, name: str, where: str, verify: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of batch ``name`` (e.g. ``"data_batch_1"``) -> (uint8 images ``[N, 3, 32, 32]``, int64
    labels ``[N]``); ``where`` names the file in errors; ``verify`` as in the module docstring."""
    try:
        batch = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"CIFAR10: {where} is not a CIFAR-10 batch (a pickled dict with b'data' and b'labels'): {e}"
        ) from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise ValueError(
            f"CIFAR10: {where} holds data {data.dtype} {data.shape} and {labels.shape[0]} labels; expected "
            "uint8 [N, 3072] and N labels"
        )
    if verify or (verify is None and len(data) == OFFICIAL_BATCH_SIZE):
        digest = hashlib.md5(raw).hexdigest()
        if digest != BATCH_MD5[name]:
            raise ValueError(
                f"CIFAR10: {where} has md5 {digest}, not the official {BATCH_MD5[name]}: a corrupt copy, or "
                f"not the official CIFAR-10. Fetch {CIFAR10_URL} again, or pass verify=False to read data of "
                "your own in this format"
            )
    return data.reshape(-1, 3, 32, 32), labels  # [N, R plane | G plane | B plane] -> [N, C, H, W]


def read_cifar10(root: Path, verify: bool | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` from ``root/cifar-10-batches-py/`` or,
    if that folder is absent, from the members of ``root/cifar-10-python.tar.gz`` (read directly, not
    extracted). Images uint8 ``[N, 3, 32, 32]``, labels int64 ``[N]``."""
    names = (*TRAIN_BATCHES, "test_batch")
    folder, archive = root / FOLDER, root / ARCHIVE
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR10: {folder} lacks {', '.join(missing)}")
        raw = {n: (folder / n).read_bytes() for n in names}
        where = {n: str(folder / n) for n in names}
    elif archive.is_file():
        where = {n: f"{archive}:{FOLDER}/{n}" for n in names}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = {m.name: m for m in tar.getmembers() if m.isfile()}
                wanted = {n: members.get(f"{FOLDER}/{n}") for n in names}
                raw = {n: tar.extractfile(m).read() for n, m in wanted.items() if m is not None}
        except (tarfile.TarError, EOFError, OSError) as e:  # zlib / gzip errors, truncation
            raise ValueError(
                f"CIFAR10: {archive} is not a readable tar.gz ({type(e).__name__}: {e}); delete it and fetch "
                f"{CIFAR10_URL} again"
            ) from e
        if missing := [where[n] for n in names if n not in raw]:
            raise FileNotFoundError(f"CIFAR10: {archive} lacks {', '.join(missing)}")
    else:
        raise FileNotFoundError(
            f"CIFAR10: neither {archive} nor {folder}/ exists. Download {CIFAR10_URL} (163 MiB) and put "
            f"it in {root} (extracting it is optional), or pass download=True where a network is reachable"
        )
    batches = {n: read_batch(raw[n], n, where[n], verify) for n in names}
    train = [batches[n] for n in TRAIN_BATCHES]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches["test_batch"],
    }


class CIFAR10(TensorDataModule):
    """CIFAR-10: 32x32 colour images, shape ``(3, 32, 32)``, pixels ``k / 255`` (``levels = 256``).

    Args:
        root: the folder holding ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``.
        val_size: images cut out of the 50,000 training images for validation (a ``seed``-permutation's
            last ``val_size``; as :class:`datamodules.Digits`); the test batch is the test split.
        download: fetch the archive from ``url`` in ``prepare_data`` when it is absent (never in tests).
        verify: the md5 policy (module docstring): ``None`` checks official-size batches, ``True`` all,
            ``False`` none.
        batch_size: the GLOBAL batch size.

    The images stay uint8 in memory (184 MB for all 60,000) and become float32 one batch at a time.
    ``labels(split)``: the class indices 0..9 (airplane, automobile, bird, cat, deer, dog, frog, horse,
    ship, truck).
    """

    def __init__(
        self,
        root: str,
        val_size: int = 5000,
        download: bool = False,
        verify: bool | None = None,
        url: str = CIFAR10_URL,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_int("val_size", val_size, 0)
        self.root, self.val_size = Path(os.path.expanduser(root)), val_size
        self.download, self.verify, self.url = download, verify, url
        self.shape = (3, 32, 32)
        self.levels = 256

    def prepare_data(self) -> None:
        """Download the archive (only with ``download=True``, when neither it nor the folder exists);
        Lightning runs this on one process. The download's md5 must be the official one unless
        ``verify=False``; a failed or wrong download leaves nothing behind."""
        if not self.download or (self.root / FOLDER).is_dir() or (self.root / ARCHIVE).is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / ARCHIVE
        partial = target.with_name(ARCHIVE + ".part")
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response, open(partial, "wb") as f:
                digest = hashlib.md5()
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise ConnectionError(
                f"could not download {self.url} ({e}): no network reachable? Place {ARCHIVE} (or its "
                f"extracted {FOLDER}/) in {self.root} by hand"
            ) from e
        if self.verify is not False and digest.hexdigest() != ARCHIVE_MD5:
            partial.unlink()
            raise ValueError(
                f"CIFAR10: the file downloaded from {self.url} has md5 {digest.hexdigest()}, not the "
                f"official {ARCHIVE_MD5}; nothing was kept. Try again, or pass verify=False for a mirror of "
                "data of your own"
            )
        partial.rename(target)

    def build(self) -> list[ArrayRows]:
        if self.trainer is None:
            self.prepare_data()  # standalone use; under a Trainer, Lightning calls it once per node
        data = read_cifar10(self.root, self.verify)
        images, labels = data["train"]
        if self.val_size >= len(images):
            raise ValueError(f"val_size={self.val_size} leaves no training image of {len(images)}")
        train, val = split_indices(len(images), (len(images) - self.val_size, self.val_size), self.seed)
        test_images, test_labels = data["test"]
        labels, test_labels = torch.from_numpy(labels), torch.from_numpy(test_labels)
        return [
            ArrayRows(images, train, labels, levels=256),
            ArrayRows(images, val, labels, levels=256),
            ArrayRows(test_images, torch.arange(len(test_images)), test_labels, levels=256),
        ]
