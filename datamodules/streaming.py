"""Data larger than memory: any genzoo datamodule converted to WebDataset tar shards, read back in an order
that is the same on 1, 2 or N processes.

Format (written by :func:`convert`, read by :class:`Streaming`)::

    DIR/meta.json                 {"format": "genzoo-streaming", "version": 1, "shape", "levels", "dtype",
                                   "shard_size", "source", "splits": {"train": {"count", "shards": [...]}}}
    DIR/train/000000.tar ...      POSIX tar (WebDataset): member ``<index:09d>.npy`` = one example, in
    DIR/val/000000.tar ...        index order; ``shard_size`` examples a shard, the last one shorter
    DIR/test/000000.tar ...

An example is stored as integer codes ``k = x (levels - 1)`` when the data has ``levels`` (``uint8`` up to 256
levels: binary or 8-bit images; ``uint16`` up to 65,536), else as ``float32``; it is read back by
base.unit_interval, ``k / (levels - 1)`` in float32 as every genzoo datamodule computes it, so the round trip
is exact. Class labels, where the datamodule has them (``datamodule.labels(split)``), go to
``DIR/<split>/labels.npy`` (``[N]`` int64), and come back as ``Streaming.labels(split)``.

Order (docs/streaming.md). WebDataset's own ``split_by_node`` / ``split_by_worker`` give each rank whole
shards, so the global batches change with the world size. Here the training order of epoch ``e`` is a
function of ``(seed, e)`` alone, at shard granularity: the shards are permuted (``derive_seed(seed, 3, e)``),
cut into windows of ``window`` shards, and the examples of window ``w`` are permuted together
(``derive_seed(seed, 3, e, w)``). That sequence is then dealt out exactly as ``DistributedSampler`` deals a
permutation (padded with its first examples, rank ``r`` of ``W`` takes ``[r::W]``), so global position ``p``
of a batch sits on rank ``p % W`` as everywhere else in genzoo (datamodules/base.py, zoo/noise.py).
Evaluation splits are read in index order, ``range(r, N, W)``, unpadded (base.ShardSampler).

I/O: a rank holds the shards of one window as stored (its shuffle buffer, ``window x shard_size`` examples)
and reads every shard of the split once per epoch, whatever ``W``: world-size invariance costs every rank a
full read of the data (it keeps ``1 / W`` of it). Each DataLoader worker keeps its own window, so
``num_workers=K`` reads every shard ``K`` times per rank.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import (
    DynamicBinarized,
    ShardSampler,
    TensorDataModule,
    check_int,
    derive_seed,
    generator,
    level_count,
    unit_interval,
)

FORMAT, VERSION, META = "genzoo-streaming", 1, "meta.json"
SPLITS = ("train", "val", "test")
ORDER_STREAM = 3  # derive_seed streams 0 and 1 are the static and dynamic binarisation draws (base.py)


def locate(path: str, name: str) -> str:
    """The address of ``name`` (e.g. ``"train/000000.tar"``) inside the data set at ``path``.

    ``path`` is a folder or a URL prefix that WebDataset's ``gopen`` opens (``http(s)://``, ``gs://``, ...),
    joined with ``/``; or a command with ``{}`` where the name goes, e.g.
    ``"pipe:aws s3 cp s3://bucket/digits/{} -"`` (``pipe:`` streams the command's standard output).
    """
    return path.replace("{}", name) if "{}" in path else f"{path.rstrip('/')}/{name}"


def read_meta(path: str) -> dict:
    """``meta.json`` of a converted data set; a clear error when there is none or it is of another format."""
    url = locate(path, META)
    try:
        with wds.gopen(url, "rb") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"Streaming: cannot read {url} ({e}): {path!r} is not a converted data set. Write one with "
            f"`python -m datamodules.streaming convert --data <Class> --data.<arg> ... --out {path}`"
        ) from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{url} is format {meta.get('format')!r} version {meta.get('version')!r}; this genzoo reads "
            f"{FORMAT!r} version {VERSION}: convert the data again"
        )
    return meta


def storage_dtype(levels: int | None) -> str:
    """What the shards store: ``uint8`` codes for up to 256 levels, ``uint16`` up to 65,536, else float32."""
    if levels is None or levels > 2**16:
        return "float32"
    return "uint8" if levels <= 2**8 else "uint16"


def encode(x: Tensor, levels: int | None) -> np.ndarray:
    """Examples ``x`` in [0, 1] -> what the shards store: integer codes ``round(x (levels - 1))`` (see
    :func:`storage_dtype`), or ``x`` itself as float32.

    Raises ``ValueError`` when :func:`unit_interval` would not give ``x`` back bit for bit from the codes
    (the data are not ``k / (levels - 1)``, so something would be rounded away).
    """
    x = x.detach().to("cpu", torch.float32)
    dtype = storage_dtype(levels)
    if dtype == "float32":
        return x.numpy()
    codes = x.mul(levels - 1).round().clamp(0, levels - 1).numpy().astype(dtype)
    if not torch.equal(unit_interval(codes, levels), x):
        raise ValueError(
            f"the data say levels={levels}, but their values are not exactly k / {levels - 1} for k in "
            f"0..{levels - 1} (e.g. {x.flatten()[:4].tolist()}); give the datamodule the right levels (None "
            "for continuous data)"
        )
    return codes


def read_shard(url: str, count: int, shape: tuple[int, ...], dtype: str, first: int) -> np.ndarray:
    """The ``count`` stored examples ``[count, *shape]`` of one tar shard, read with WebDataset.

    The first member is read with ``np.load``; every other must carry the same ``.npy`` header (so the same
    shape and dtype) and the next key (``first, first + 1, ...``), and its data bytes are taken as they are.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header, data = None, []
    for i, sample in enumerate(wds.tarfile_samples([{"url": url}])):
        raw = sample["npy"]
        if header is None:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
            header = raw[: len(raw) - size] if array.shape == shape and array.dtype == dtype else b"?"
        if (
            sample["__key__"] != f"{first + i:09d}"
            or len(raw) != len(header) + size
            or raw[: len(header)] != header
        ):
            raise ValueError(
                f"{url}: member {sample['__key__']!r} is not example {first + i:09d} as {dtype} {shape}: the "
                "shard is corrupt or from another conversion; convert again"
            )
        data.append(raw[len(header) :])
    if len(data) != count:
        raise ValueError(f"{url} holds {len(data)} examples, its meta.json says {count}: convert again")
    return np.frombuffer(b"".join(data), dtype=dtype).reshape(count, *shape)


class ShardedSplit(Dataset):
    """One split of a converted data set: example ``i`` is in shard ``s`` with ``starts[s] <= i < ends[s]``.

    Random access by index, a batch at a time (``__getitems__``, as base.InMemoryDataset), converted to
    float32 by base.unit_interval; the shards, as stored, live in a least-recently-used cache of
    ``cache_shards`` shards, so a sampler that visits the examples window by window (:class:`WindowSampler`)
    reads each shard once an epoch. ``shard_reads`` counts the reads of this process (or worker);
    ``labels`` (``[N]`` long) are read from ``labels.npy`` when first asked for, ``None`` if there are none.
    """

    def __init__(self, path: str, split: str, meta: dict, cache_shards: int) -> None:
        self.path, self.split, self.cache_shards = path, split, cache_shards
        self.shape, self.levels, self.dtype = tuple(meta["shape"]), meta["levels"], meta["dtype"]
        shards = meta["splits"][split]["shards"]
        self.urls = [locate(path, shard["file"]) for shard in shards]
        self.counts = [int(shard["count"]) for shard in shards]
        self.ends = torch.tensor(np.cumsum(self.counts, dtype=np.int64))
        self.starts = self.ends - torch.tensor(self.counts, dtype=torch.long)
        self.has_labels = bool(meta["splits"][split].get("labels", False))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.shard_reads, self._labels = 0, None

    @property
    def labels(self) -> Tensor | None:
        if self.has_labels and self._labels is None:
            with wds.gopen(locate(self.path, f"{self.split}/labels.npy"), "rb") as f:
                self._labels = torch.from_numpy(np.load(io.BytesIO(f.read()), allow_pickle=False))
        return self._labels

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.counts) else 0

    def shard(self, s: int) -> np.ndarray:
        """The stored examples of shard ``s``, from the cache or read (evicting the least recently used)."""
        if s in self.cache:
            self.cache.move_to_end(s)
            return self.cache[s]
        codes = read_shard(self.urls[s], self.counts[s], self.shape, self.dtype, int(self.starts[s]))
        self.shard_reads += 1
        self.cache[s] = codes
        while len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return codes

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        index = torch.as_tensor(indices, dtype=torch.long)
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self):
            raise IndexError(f"{self.split} split of {self.path}: indices must be in [0, {len(self)})")
        where = torch.searchsorted(self.ends, index, right=True)
        out = np.empty((len(index), *self.shape), dtype=self.dtype)
        for s in dict.fromkeys(where.tolist()):  # shards in order of first use, each read at most once
            mask = (where == s).numpy()
            out[mask] = self.shard(s)[(index[mask] - self.starts[s]).numpy()]
        return unit_interval(out, self.levels)

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


def window_order(counts: Sequence[int], window: int, seed: int, epoch: int) -> Tensor:
    """The training order of epoch ``epoch``: a function of ``(seed, epoch)`` only, never of the world size.

    Shards permuted by ``derive_seed(seed, 3, epoch)``, taken ``window`` at a time; the examples of window
    ``w`` (all of its shards) permuted by ``derive_seed(seed, 3, epoch, w)``. With ``window`` at least the
    number of shards this is one uniform permutation of the split.
    """
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    shards = torch.randperm(len(counts), generator=generator(derive_seed(seed, ORDER_STREAM, epoch))).tolist()
    parts = []
    for w, first in enumerate(range(0, len(shards), window)):
        members = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards[first : first + window]])
        g = generator(derive_seed(seed, ORDER_STREAM, epoch, w))
        parts.append(members[torch.randperm(len(members), generator=g)])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class WindowSampler(ShardSampler):
    """The training sampler: :func:`window_order` dealt out like ``DistributedSampler`` deals its
    permutation (padded to a multiple of ``W`` with its first examples; rank ``r`` takes ``[r::W]``)."""

    def __init__(self, dataset: ShardedSplit, num_replicas: int, rank: int, seed: int, window: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, train=True, seed=seed)
        self.window = window

    def __iter__(self) -> Iterator[int]:
        order = window_order(self.dataset.counts, self.window, self.seed, self.epoch)
        padding = self.total_size - len(order)
        if padding:
            order = torch.cat([order, order.repeat(math.ceil(padding / len(order)))[:padding]])
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())


class Streaming(TensorDataModule):
    """A data set written by :func:`convert` (a folder, or a URL WebDataset opens), streamed from its tar
    shards; ``shape`` and ``levels`` come from its ``meta.json``.

    ``batch_size`` is global as everywhere in genzoo; the training order is :func:`window_order` (a
    function of ``seed`` and the epoch; ``window`` shards are shuffled together, so a larger window shuffles
    better and holds more in memory); val/test are read in order. Same global batches on any number of
    processes and nodes (docs/streaming.md).

    Example:
        >>> # python -m datamodules.streaming convert --data Digits --out /data/digits
        >>> dm = Streaming("/data/digits", batch_size=64)  # doctest: +SKIP
        >>> dm.shape, dm.levels  # doctest: +SKIP
        ((1, 8, 8), None)
    """

    def __init__(
        self, path: str, window: int = 4, batch_size: int = 128, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_int("window", window, 1)
        self.path, self.window = str(path), window
        self.meta = read_meta(self.path)
        self.shape = tuple(self.meta["shape"])
        self.levels: int | None = self.meta["levels"]

    def build(self) -> list[ShardedSplit]:
        return [ShardedSplit(self.path, split, self.meta, cache_shards=self.window) for split in SPLITS]

    def sampler(self, split: Literal["train", "val", "test"], dataset: Dataset, world: int, rank: int):
        """val/test: base.ShardSampler in order; train: :class:`WindowSampler` (persistent workers keep their
        own window of shards: the train split has no ``set_epoch``)."""
        if split != "train":
            return super().sampler(split, dataset, world, rank)
        return WindowSampler(dataset, world, rank, self.seed, self.window)


def split_batches(datamodule: L.LightningDataModule, split: str, chunk: int = 1024) -> Iterator[Tensor]:
    """The examples of one split as tensors ``[k, *shape]``: ``datamodule.splits[split]`` in index order
    where it has them (every TensorDataModule), else its one-process loader of that split."""
    splits = getattr(datamodule, "splits", None)
    if not isinstance(splits, dict):
        yield from getattr(datamodule, f"{split}_dataloader")()
        return
    dataset = splits[split]
    if isinstance(dataset, DynamicBinarized):
        raise ValueError(
            f"{type(datamodule).__name__}(binarize='dynamic') redraws its training set every epoch; a "
            "converted copy would freeze one draw. Convert binarize=None (grey levels) or binarize='static'"
        )
    for start in range(0, len(dataset), chunk):
        index = list(range(start, min(start + chunk, len(dataset))))
        many = getattr(dataset, "__getitems__", None)
        yield many(index) if many is not None else torch.stack([dataset[i] for i in index])


def convert(
    data: L.LightningDataModule, out: str | Path, shard_size: int = 10_000, overwrite: bool = False
) -> Path:
    """Write the train / val / test splits of any genzoo datamodule (its ``shape`` and ``levels``) to
    ``out`` in the format :class:`Streaming` reads; returns ``out``.

    Everything is written into ``out``'s sibling ``.<name>.partial`` and renamed at the end, so an
    interrupted conversion leaves no half-written data set. ``out`` must not exist unless ``overwrite``.
    Tar members carry a fixed mtime, so converting the same data twice gives the same bytes.
    """
    check_int("shard_size", shard_size, 1)
    shape, levels = tuple(int(n) for n in data.shape), level_count("levels", getattr(data, "levels", None))
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True (--overwrite true)")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    data.setup("fit")
    dtype = storage_dtype(levels)
    splits = {}
    for split in SPLITS:
        (partial / split).mkdir()
        count, writer = 0, None
        for batch in split_batches(data, split):
            if not isinstance(batch, Tensor) or tuple(batch.shape[1:]) != shape:
                got = tuple(batch.shape[1:]) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(
                    f"{type(data).__name__}'s {split} split yields {got}; convert writes one tensor of its "
                    f"shape {shape} per example"
                )
            for example in encode(batch, levels):
                if writer is None:
                    writer = wds.ShardWriter(
                        str(partial / split / "%06d.tar"), maxcount=shard_size, maxsize=float("inf"),
                        verbose=0, mtime=0.0,
                    )  # fmt: skip
                writer.write({"__key__": f"{count:09d}", "npy": example})
                count += 1
        if writer is not None:
            writer.close()
        sizes = [shard_size] * (count // shard_size) + ([count % shard_size] if count % shard_size else [])
        shards = [{"file": f"{split}/{i:06d}.tar", "count": n} for i, n in enumerate(sizes)]
        labels = data.labels(split) if callable(getattr(data, "labels", None)) else None
        if labels is not None:
            if len(labels) != count:
                raise ValueError(f"{type(data).__name__}: {len(labels)} {split} labels for {count} examples")
            np.save(partial / split / "labels.npy", torch.as_tensor(labels).long().numpy())
        splits[split] = {"count": count, "shards": shards, "labels": labels is not None}
    source = type(data)
    meta = {
        "format": FORMAT, "version": VERSION, "shape": list(shape), "levels": levels, "dtype": dtype,
        "shard_size": shard_size, "source": f"{source.__module__}.{source.__qualname__}", "splits": splits,
    }  # fmt: skip
    (partial / META).write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.streaming convert --data <Class> --data.<arg> ... --out DIR [--shard_size N]``:
    the datamodule by class name or import path, as ``genzoo fit --data`` takes it (jsonargparse)."""
    from jsonargparse import ArgumentParser

    import datamodules  # noqa: F401  (registers the datamodules' class names)

    command = ArgumentParser(
        description="Convert a genzoo datamodule's train / val / test splits into tar shards"
    )
    command.add_subclass_arguments(L.LightningDataModule, "data", required=True, help="e.g. --data Digits")
    command.add_argument("--out", type=str, required=True, help="the folder to write (must not exist)")
    command.add_argument("--shard_size", type=int, default=10_000, help="examples per tar shard")
    command.add_argument("--overwrite", type=bool, default=False, help="replace --out if it exists")
    parser = ArgumentParser(prog="python -m datamodules.streaming", description=__doc__.split("\n")[0])
    parser.add_subcommands().add_subcommand("convert", command)
    config = parser.parse_args(argv)
    init = parser.instantiate(config).convert
    path = convert(init.data, init.out, init.shard_size, init.overwrite)
    meta = json.loads((path / META).read_text())
    counts = ", ".join(
        f"{s['count']} {name} ({len(s['shards'])} shard{'s' * (len(s['shards']) != 1)})"
        for name, s in meta["splits"].items()
    )
    size = sum(f.stat().st_size for f in path.rglob("*.tar")) / 2**20
    print(f"wrote {counts} as {meta['dtype']} {tuple(meta['shape'])} to {path} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
