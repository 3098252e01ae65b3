"""``genzoo predict``: samples from any module with ``sample(n, generator=None)``, written to one file.

A family needs nothing for it beyond the ``Samplable`` capability (no ``predict_step``, no ``forward``).
Three pieces, each usable without the CLI::

    requests = SampleRequests(n=1000, seed=0)               # the predict "data": chunks of request indices
    install_sample_predict_step(model)                       # model.predict_step -> sample_predict_step
    trainer = L.Trainer(callbacks=[SampleWriter(n=1000, out="samples.npz")])
    trainer.predict(model, datamodule=requests, return_predictions=False)

Determinism. The ``n`` requests are cut into chunks of ``batch_size`` consecutive indices; chunk ``c`` is
drawn by ``model.sample(size_c, generator=g_c)`` with ``g_c`` a generator on the module's device seeded by
``mix_key(seed, STREAM, c)``. So sample ``i`` is a function of ``(seed, batch_size, i)`` and the device type
only, not of the number of processes: chunks go round-robin to ranks (``ShardSampler``, unpadded, so no
sample is drawn twice), every rank's samples are gathered with their indices, and rank 0 alone writes them
in index order. W processes write the file one process writes.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.base import ShardSampler, check_int
from zoo.capabilities import Samplable, require
from zoo.noise import mix_key

STREAM = 0x5A3  # keeps predict's generator seeds apart from the families' own noise streams
FORMATS = (".pt", ".npz", ".png")


class RequestChunks(Dataset):
    """Item ``c`` is ``tensor([start, size, key])``: draw ``size`` samples, indices ``start ..``, with a
    generator seeded by ``key``."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, c: int) -> Tensor:
        start = c * self.batch_size
        size = min(self.batch_size, self.n - start)
        return torch.tensor([start, size, mix_key(self.seed, STREAM, c)], dtype=torch.long)


class SampleRequests(L.LightningDataModule):
    """The data of ``trainer.predict`` for sampling: ``n`` requests in chunks of ``batch_size``, sharded over
    the trainer's processes (see the module docstring). ``batch_size`` is per chunk, not global: each
    process draws whole chunks, so the numbers do not depend on the number of processes."""

    def __init__(self, n: int = 64, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__()
        check_int("n", n, 1)
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def predict_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        chunks = RequestChunks(self.n, self.batch_size, self.seed)
        sampler = ShardSampler(chunks, num_replicas=world, rank=rank, train=False)
        return DataLoader(chunks, batch_size=None, sampler=sampler)


def sample_predict_step(module: LightningModule, batch: Tensor, batch_idx: int, dataloader_idx: int = 0):
    """Draw one chunk of requests: ``{"index": [size], "samples": [size, *shape]}``.

    ``batch`` is ``[start, size, key]`` (:class:`RequestChunks`); the generator lives on the module's
    device, as ``sample`` draws there."""
    start, size, key = (int(v) for v in batch.tolist())
    generator = torch.Generator(device=module.device).manual_seed(key)
    samples = module.sample(size, generator=generator)
    if samples.shape[0] != size:
        raise ValueError(
            f"{type(module).__name__}.sample({size}) returned {samples.shape[0]} samples; it must return "
            "a tensor [n, *shape]"
        )
    return {"index": torch.arange(start, start + size), "samples": samples}


def install_sample_predict_step(module: LightningModule) -> LightningModule:
    """Make ``module.predict_step`` :func:`sample_predict_step` on this instance (its class is unchanged).

    A ``functools.partial``, not a bound method, so a module that carries it can still be pickled into
    ``ddp_spawn``'s workers; Lightning's ``is_overridden`` sees through partials."""
    require(module, Samplable, "genzoo predict")
    module.predict_step = functools.partial(sample_predict_step, module)
    return module


def gather_in_order(predictions: list[dict[str, Tensor]], n: int) -> Tensor | None:
    """This rank's chunks, gathered from every rank and put in index order: ``[n, *shape]`` on rank 0 (and
    on every rank; ``None`` nowhere). ``all_gather_object`` also works for processes with no chunk."""
    if predictions:
        index = torch.cat([p["index"] for p in predictions])
        samples = torch.cat([p["samples"].detach().float().cpu() for p in predictions])
    else:
        index, samples = torch.empty(0, dtype=torch.long), None
    parts = [(index, samples)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index, samples))
    parts = [(i, s) for i, s in parts if s is not None]
    index = torch.cat([i for i, _ in parts])
    samples = torch.cat([s for _, s in parts])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(n)):
        raise RuntimeError(f"gathered sample indices are not 0..{n - 1}: {index[order][:10].tolist()} ...")
    return samples[order]


def write_samples(samples: Tensor, out: Path) -> Path:
    """Write ``samples [n, *shape]`` to ``out`` by its suffix: ``.pt`` (the tensor, loads with
    ``torch.load(out, weights_only=True)``), ``.npz`` (array ``samples``), ``.png`` (an image grid for
    images ``(C, H, W)`` with C = 1 or 3, a scatter plot for 2-D points)."""
    from callbacks.samples import image_grid, scatter_plot

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save(samples, out)
    elif out.suffix == ".npz":
        np.savez(out, samples=samples.numpy())
    else:
        shape = tuple(samples.shape[1:])
        if not png_ok(shape):
            raise ValueError(png_error(shape))
        if shape == (2,):
            scatter_plot(samples, title=f"{len(samples)} samples").save(out)
        else:
            image_grid(samples).save(out)
    return out


def png_ok(shape: tuple[int, ...]) -> bool:
    """Whether samples of this shape have a picture: images (1 or 3 channels) or 2-D points."""
    return (len(shape) == 3 and shape[0] in (1, 3)) or shape == (2,)


def png_error(shape: tuple[int, ...]) -> str:
    return (
        f"a PNG needs images (C, H, W) with C = 1 or 3, or 2-D points; the samples have shape {shape}. "
        "Write them as .pt or .npz instead (--samples.out samples.npz)"
    )


class SampleWriter(BasePredictionWriter):
    """Draws ``n`` samples in ``predict`` and writes them to ``out`` (rank 0 only), in index order.

    Args:
        n: how many samples.
        out: the file; its suffix picks the format: ``.pt`` (tensor ``[n, *shape]``), ``.npz`` (array
            ``samples``), ``.png`` (image grid, or scatter plot for 2-D data).
        seed: sample ``i`` is a function of ``(seed, batch_size, i)`` only (see the module docstring).
        batch_size: samples per ``sample`` call (a chunk); bounds the memory of one call.

    Example (what ``genzoo predict`` does)::

        writer = SampleWriter(n=64, out="grid.png")
        trainer = L.Trainer(callbacks=[writer])
        trainer.predict(install_sample_predict_step(model), datamodule=writer.requests())
    """

    def __init__(
        self, n: int = 64, out: str = "runs/samples.pt", seed: int = 0, batch_size: int = 256
    ) -> None:
        super().__init__(write_interval="epoch")
        SampleRequests(n, batch_size, seed)  # validates n, batch_size, seed
        if Path(out).suffix not in FORMATS:
            raise ValueError(f"out={out!r}: the suffix picks the format; use one of {', '.join(FORMATS)}")
        self.n, self.out, self.seed, self.batch_size = n, Path(out), seed, batch_size
        self.written: Path | None = None

    def requests(self) -> SampleRequests:
        """The datamodule of requests that matches this writer."""
        return SampleRequests(self.n, self.batch_size, self.seed)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, Samplable, "genzoo predict")
        # The request loader has no batch indices for Lightning to infer; samples carry their own index.
        warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices")
        shape = tuple(getattr(pl_module, "shape", ()) or ())
        if self.out.suffix == ".png" and shape and not png_ok(shape):
            raise ValueError(png_error(shape))  # before drawing anything

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        samples = gather_in_order(predictions, self.n)  # collective: every rank
        if trainer.is_global_zero:
            self.written = write_samples(samples, self.out)
            print(f"genzoo: wrote {self.n} samples of shape {tuple(samples.shape[1:])} to {self.written}")
