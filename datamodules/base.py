"""The one shallow base for genzoo's in-memory data: a tensor dataset, a sharding sampler, a datamodule.

Conventions every datamodule follows:

* ``batch_size`` is the GLOBAL batch size; with ``W`` processes each loads ``batch_size // W`` examples,
  so one process and ``W`` processes see the same global batches.
* Sharding is ``torch.utils.data.DistributedSampler``'s interleaved order, used even with one process:
  with the same seed and epoch, rank ``r`` of ``W`` takes ``permutation[r::W]``, so the example at global
  position ``p`` of batch ``t`` sits on rank ``p % W`` at local position ``p // W`` (zoo/noise.py relies
  on it). Training shards are padded to equal length as DistributedSampler does; evaluation shards are
  not padded (no duplicates, so sum/count metrics over ranks equal the one-process value; some shards
  may hold one example fewer).
* Everything random is a function of ``seed`` (and the epoch), never of the global RNG, so a run resumed
  from an end-of-epoch checkpoint sees exactly the data of an uninterrupted one (RELIABILITY.md #10).
  Mid-epoch resume is not supported: the loaders are not stateful (RELIABILITY.md #11).
* Pixels: float32 in [0, 1]; ``levels`` says how many values a pixel takes, ``x = k / (levels - 1)`` for
  ``k = 0 .. levels - 1`` (256 for 8-bit data, 2 for binary data), ``None`` for continuous data.
* Batches are tensors ``[B, *shape]``; labels, where the data have them, stay on the split's dataset
  (``dataset.labels``, in the split's order) and are read with ``datamodule.labels(split)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

Binarize = Literal["static", "dynamic"]
BINARIZE_MODES = ("static", "dynamic")


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, e.g. ``(seed, stream, epoch)`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int) -> torch.Generator:
    """A private CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise ``ValueError`` naming ``name``, the bad value and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def return_batch(batch: Tensor) -> Tensor:
    """Collate function for :class:`InMemoryDataset`: the fetched batch is already one tensor."""
    return batch


def level_count(name: str, levels: int | None) -> int | None:
    """``levels`` checked: ``None`` (continuous data) or an integer >= 2 (``ValueError`` naming ``name``)."""
    if levels is not None:
        check_int(name, levels, 2)
    return levels


def check_split_size(name: str, size: int | float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``size`` is a count (int >= 0) or a share of the examples
    (float in [0, 1)): a split's size before the number of examples is known."""
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name}={size!r}: a share of the examples must lie in [0, 1)")
    elif isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"{name} must be a count (int) or a share (float in [0, 1)), got {size!r}")
    else:
        check_int(name, size, 0)


def split_sizes(n: int, val_size: float, test_size: float) -> tuple[int, int, int]:
    """``(train, val, test)`` sizes of ``n`` examples; ``val_size`` / ``test_size`` are counts (ints) or
    shares of ``n`` (floats in [0, 1), rounded to the nearest count). Raises ``ValueError`` naming the bad
    value, or when nothing is left to train on."""
    counts = []
    for name, size in (("val_size", val_size), ("test_size", test_size)):
        check_split_size(name, size)
        counts.append(round(size * n) if isinstance(size, float) else size)
    val, test = counts
    if val + test >= n:
        raise ValueError(f"val_size + test_size = {val} + {test} leaves no training example of {n}")
    return n - val - test, val, test


class InMemoryDataset(Dataset):
    """Examples ``data[i]`` of one tensor ``[N, *shape]``; a batch is ONE indexing op.

    PyTorch's fetcher calls ``dataset.__getitems__(indices)`` for a whole batch when it exists and passes
    the result to ``collate_fn`` (here :func:`return_batch`), instead of ``B`` ``__getitem__`` calls.
    ``labels`` (``[N]`` long, optional) stay here, out of the batches (see :meth:`TensorDataModule.labels`).
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        return self.data[torch.as_tensor(indices, dtype=torch.long)]


class DynamicBinarized(InMemoryDataset):
    """Grey levels ``p`` in [0, 1] redrawn as ``x ~ Bernoulli(p)`` at every epoch (dynamic binarisation).

    The draw of epoch ``e`` comes from a generator seeded with ``derive_seed(seed, DYNAMIC, e)``, so it
    is the same on every rank and after a resume; :class:`ShardSampler` forwards ``set_epoch`` here.
    """

    STREAM = 1  # the static draw uses stream 0

    def __init__(self, grey: Tensor, seed: int, labels: Tensor | None = None) -> None:
        self.grey, self.seed, self.epoch, self.labels = grey, seed, None, labels
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            g = generator(derive_seed(self.seed, self.STREAM, epoch))
            self.data, self.epoch = torch.bernoulli(self.grey, generator=g), epoch


def binarize_static(grey: Tensor, seed: int) -> Tensor:
    """One Bernoulli draw ``x ~ Bernoulli(grey)`` from a generator seeded with ``derive_seed(seed, 0)``."""
    return torch.bernoulli(grey, generator=generator(derive_seed(seed, 0)))


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Disjoint index sets of the given sizes: consecutive slices of ``randperm(n)`` seeded by ``seed``."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} add up to {sum(sizes)}, more than the {n} examples")
    perm = torch.randperm(n, generator=generator(seed))
    bounds = np.cumsum([0, *sizes])
    return [perm[a:b] for a, b in itertools.pairwise(bounds)]


def make_splits(
    data: Tensor,
    sizes: Sequence[int],
    seed: int,
    binarize: Binarize | None = None,
    labels: Tensor | None = None,
) -> list[InMemoryDataset]:
    """Split ``data`` (and ``labels`` alike, if given) by :func:`split_indices`; optionally binarise grey
    levels in [0, 1].

    ``binarize``: ``None`` keeps ``data``; ``"static"`` binarises all of it once (:func:`binarize_static`);
    ``"dynamic"`` makes the FIRST split (training) a :class:`DynamicBinarized` and binarises the others
    with the same static draw, so the evaluation sets are identical in both modes.
    """
    check_choice("binarize", binarize, (None, *BINARIZE_MODES))
    index = split_indices(len(data), sizes, seed)
    fixed = data if binarize is None else binarize_static(data, seed)
    part = (lambda i: None) if labels is None else (lambda i: labels[i])
    sets = [InMemoryDataset(fixed[i], part(i)) for i in index]
    if binarize == "dynamic":
        sets[0] = DynamicBinarized(data[index[0]], seed, part(index[0]))
    return sets


def unit_interval(batch: np.ndarray, levels: int | None) -> Tensor:
    """A batch as float32 in genzoo's pixel convention: integers ``k`` become ``k / (levels - 1)`` (uint8
    with ``levels=256``: ``k / 255``, correctly rounded, as ``torch`` divides); booleans 0 / 1; floating-
    point values are only cast. Raises ``ValueError`` when an integer lies outside ``0 .. levels - 1`` (the
    data are not what ``levels`` says)."""
    if np.issubdtype(batch.dtype, np.floating):
        return torch.from_numpy(batch.astype(np.float32, copy=False))
    if levels is None:
        raise ValueError(f"integer data ({batch.dtype}) need levels, the number of values a pixel takes")
    low, high = (int(batch.min()), int(batch.max())) if batch.size else (0, 0)
    if low < 0 or high > levels - 1:
        raise ValueError(
            f"integer data with levels={levels} must lie in 0..{levels - 1}; found values in {low}..{high}: "
            "give the number of values the data take as levels"
        )
    return torch.from_numpy(batch.astype(np.float32)).div_(levels - 1)


class ArrayRows(Dataset):
    """Rows ``index`` of an array ``[N, ...]`` kept as stored (e.g. uint8 CIFAR-10 in memory, a memory-
    mapped ``.npy``), converted to float32 one batch at a time by :func:`unit_interval`, so integer images
    take a quarter of the memory of float32 ones; a batch is ONE indexing op (``__getitems__``).

    ``channels_last``: the array holds ``[N, H, W, C]`` images, returned as ``[B, C, H, W]``.
    ``labels[index]`` (``[len(index)]`` long) stay on the dataset, in its order.
    """

    def __init__(
        self,
        array: np.ndarray,
        index: Tensor,
        labels: Tensor | None = None,
        levels: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self._array, self.index, self.levels, self.channels_last = array, index, levels, channels_last
        self.labels = None if labels is None else labels[index]

    @property
    def array(self) -> np.ndarray:
        """The whole array (subclasses may open it lazily)."""
        return self._array

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        rows = self.index[torch.as_tensor(indices, dtype=torch.long)].numpy()
        batch = np.asarray(self.array[rows])
        if self.channels_last:  # [B, H, W, C] -> [B, C, H, W]
            batch = batch.transpose(0, batch.ndim - 1, *range(1, batch.ndim - 1))
        return unit_interval(np.ascontiguousarray(batch), self.levels)


class ShardSampler(DistributedSampler):
    """DistributedSampler used for every loader, also with one process (so Lightning never replaces it).

    ``train=True``: shuffled with ``seed + epoch`` and padded to equal shards, exactly DistributedSampler.
    ``train=False``: in order, ``range(rank, N, W)``, no padding (Lightning's UnrepeatedDistributedSampler).
    ``set_epoch`` also reaches the dataset when it has one (dynamic binarisation).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, train: bool = True, seed: int = 0
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=train, seed=seed)
        self.train = train
        if not train:
            self.total_size = len(dataset)
            self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self):
        if self.train:
            return super().__iter__()
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if callable(set_epoch := getattr(self.dataset, "set_epoch", None)):
            set_epoch(epoch)


class TensorDataModule(L.LightningDataModule):
    """Base for datamodules whose splits are :class:`InMemoryDataset` s built once by :meth:`build`.

    Subclasses set ``self.shape`` (and ``self.levels`` for discrete data) in ``__init__`` and implement
    ``build() -> (train, val, test)``.

    ``levels``: the number of values a pixel takes, ``x = k / (levels - 1)`` (256: 8-bit images, ``k / 255``;
    2: binarised; 17: scikit-learn's Digits, ``k / 16``); ``None`` for continuous data. Likelihood families
    read it to report bits per dimension and to dequantise.
    """

    shape: tuple[int, ...]
    levels: int | None = None

    def __init__(self, batch_size: int, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.splits: dict[str, Dataset] | None = None

    def build(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = dict(zip(("train", "val", "test"), self.build(), strict=True))

    def labels(self, split: Literal["train", "val", "test"]) -> Tensor | None:
        """The class labels ``[N]`` (long) of ``split`` in the split's order (the order of its dataset, which
        the evaluation loaders keep), or ``None`` when the data have none. Batches stay image tensors, so
        unconditional families are unaffected; this is the hook for conditional models."""
        check_choice("split", split, ("train", "val", "test"))
        self.setup()
        return getattr(self.splits[split], "labels", None)

    def world(self) -> tuple[int, int]:
        """``(world_size, rank)`` from the attached trainer, else torch.distributed, else ``(1, 0)``."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def local_batch_size(self) -> int:
        """``batch_size // world_size``; raises ``ValueError`` if it does not divide."""
        world, _ = self.world()
        if self.batch_size % world:
            raise ValueError(
                f"the global batch_size={self.batch_size} is not divisible by the world size {world}; "
                f"use a multiple of {world}"
            )
        return self.batch_size // world

    def loader(self, split: Literal["train", "val", "test"]) -> DataLoader:
        """The DataLoader of one split, sharded by :class:`ShardSampler` for this process."""
        self.setup()
        dataset = self.splits[split]
        if len(dataset) == 0:
            raise ValueError(f"{type(self).__name__} has an empty {split} split; give it a size > 0")
        world, rank = self.world()
        sampler = self.sampler(split, dataset, world, rank)
        # Persistent workers would keep a stale copy of an epoch-dependent dataset.
        persistent = self.num_workers > 0 and not hasattr(dataset, "set_epoch")
        return DataLoader(
            dataset,
            batch_size=self.local_batch_size(),
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=persistent,
            collate_fn=return_batch,
            drop_last=False,
        )

    def sampler(self, split: Literal["train", "val", "test"], dataset: Dataset, world: int, rank: int):
        """Which examples of ``split`` this process loads, in which order: :class:`ShardSampler` (a datamodule
        with another order, e.g. ``datamodules.Streaming``'s shard windows, overrides this)."""
        return ShardSampler(dataset, num_replicas=world, rank=rank, train=split == "train", seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
