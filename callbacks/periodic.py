"""What the periodic diagnostics (divergence estimator, ELBO-gap monitor) share: when to evaluate, on which
fixed held-out examples, how the work is split over processes so N processes log what 1 process logs, and the
state a checkpoint keeps."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from callbacks.samples import evaluating
from zoo.noise import mix_key
from zoo.sharding import gathered

Split = Literal["val", "train", "test"]


def fixed_subset(trainer: Trainer, n: int, split: str = "val") -> Tensor:
    """The first ``n`` examples of the datamodule's ``split`` as one CPU tensor (the whole split if smaller).

    The order is the dataset's own (genzoo's splits are already shuffled by their seed), so every process and
    every resumed run takes the same examples. Dataset items that are tuples contribute their first element.
    """
    datamodule = trainer.datamodule
    make_loader = getattr(datamodule, f"{split}_dataloader", None) if datamodule is not None else None
    if make_loader is not None:
        loader = make_loader()
    else:
        loader = {"val": trainer.val_dataloaders, "train": trainer.train_dataloader}.get(split)
        if isinstance(loader, Sequence):
            loader = loader[0] if loader else None
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise RuntimeError(
            f"cannot find a {split!r} dataset for the fixed evaluation subset; give the Trainer a datamodule "
            f"with {split}_dataloader() or choose another split"
        )
    indices = list(range(min(n, len(dataset))))
    if hasattr(dataset, "__getitems__"):
        items = dataset.__getitems__(indices)
    else:
        items = [dataset[i] for i in indices]
    if isinstance(items, Tensor):
        return items.detach().cpu()
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items]).cpu()


class PeriodicDiagnostic(Callback):
    """A diagnostic run every few epochs (or optimizer steps) on a fixed subset of held-out data.

    * Cadence: after the last training batch of every ``every_n_epochs``-th epoch and of the last epoch
      (before validation, so an epoch-end checkpoint holds the evaluation); or, when ``every_n_steps`` is set,
      whenever ``trainer.global_step`` crosses a multiple of it. Override :meth:`should_evaluate` for another
      policy.
    * The fixed subset is the first ``n_examples`` of the ``split``, taken once and saved in checkpoints.
    * Processes: the subset is cut into blocks of ``batch_size`` examples; block j runs on rank j mod W with
      its own noise, from a generator keyed by ``(seed, global_step, j)``; the per-example results are
      all-gathered into global order and every rank computes the same statistics from them (then rank 0's are
      broadcast). So W processes log what one process logs, and each does 1/W of the work.
    * Values go to every logger at ``trainer.global_step`` and to ``trainer.callback_metrics`` as
      ``<prefix>/<name>``; each evaluation is appended to :attr:`history`.
    """

    prefix = "diagnostic"
    _stream = 0

    def __init__(
        self,
        every_n_epochs: int = 10,
        every_n_steps: int | None = None,
        n_examples: int = 256,
        batch_size: int = 256,
        split: Split = "val",
        seed: int = 0,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("n_examples", n_examples)):
            _check_positive(name, value)
        _check_positive("batch_size", batch_size)
        if every_n_steps is not None:
            _check_positive("every_n_steps", every_n_steps)
        if split not in ("val", "train", "test"):
            raise ValueError(f"split must be 'val', 'train' or 'test'; got {split!r}")
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.n_examples, self.batch_size, self.split, self.seed = n_examples, batch_size, split, seed
        self.fixed: Tensor | None = None
        self.history: list[dict[str, float]] = []
        self.evaluations = 0
        self.last_step = -1  # global_step of the last evaluation

    @functools.cached_property
    def state_key(self) -> str:  # Lightning asks for it at every hook call: computed once
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps, n_examples=self.n_examples,
            split=self.split, seed=self.seed,
        )  # fmt: skip

    # -- the policy ---------------------------------------------------------------------------------------

    def should_evaluate(self, trainer: Trainer, epoch_done: bool) -> bool:
        """Whether to evaluate now; called after every training batch (``epoch_done``: it ended the epoch)."""
        if trainer.sanity_checking or trainer.global_step == self.last_step:
            return False
        run_ends = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        if self.every_n_steps is not None:
            n = self.every_n_steps
            return trainer.global_step // n > max(self.last_step, 0) // n or run_ends
        if not epoch_done:
            return run_ends
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    # -- hooks --------------------------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ):
        progress = trainer.fit_loop.epoch_loop.batch_progress
        total = trainer.num_training_batches
        epoch_done = bool(progress.is_last_batch) or (math.isfinite(total) and batch_idx + 1 >= total)
        if self.should_evaluate(trainer, epoch_done):
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.should_evaluate(
            trainer, epoch_done=True
        ):  # an epoch that ended early (e.g. limit_train_batches)
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate now on every process, log, record, and draw (rank 0). Returns the logged values."""
        if self.fixed is None:
            self.fixed = fixed_subset(trainer, self.n_examples, self.split)
        with evaluating(pl_module), gathered(pl_module):  # FSDP2: full weights, no collective per forward
            values = self.evaluate(trainer, pl_module)
        values = trainer.strategy.broadcast(values, src=0)  # every rank logs and decides on rank 0's numbers
        step = trainer.global_step
        self.history.append({"epoch": float(trainer.current_epoch), "step": float(step), **values})
        self.evaluations, self.last_step = self.evaluations + 1, step
        metrics = {f"{self.prefix}/{name}": value for name, value in values.items()}
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        if trainer.is_global_zero:  # no collective below (RELIABILITY.md #19)
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": float(trainer.current_epoch)}, step=step)
            self.draw(trainer)
        return values

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """The diagnostic's values (python floats); runs on every process."""
        raise NotImplementedError

    def draw(self, trainer: Trainer) -> None:
        """Rank 0 only, after logging: pictures from :attr:`history` (nothing by default)."""

    # -- blocks over processes ----------------------------------------------------------------------------

    def blocks(self, trainer: Trainer) -> list[tuple[int, slice]]:
        """``(j, slice)`` of the fixed subset's blocks this process computes: j = rank, rank + W, ..."""
        n_blocks = math.ceil(len(self.fixed) / self.batch_size)
        return [
            (j, slice(j * self.batch_size, min((j + 1) * self.batch_size, len(self.fixed))))
            for j in range(trainer.global_rank, n_blocks, trainer.world_size)
        ]

    def generator(self, trainer: Trainer, device: torch.device, block: int) -> torch.Generator:
        """The generator of one block's noise, keyed by ``(seed, stream, global_step, block)``: the same on
        every process and after a resume."""
        key = mix_key(self.seed, self._stream, trainer.global_step, block)
        return torch.Generator(device=device).manual_seed(key)

    def gather(
        self, trainer: Trainer, parts: list[Tensor], item_shape: Sequence[int], like: Tensor
    ) -> Tensor:
        """All processes' per-example results ``[n, *item_shape]`` in global order, from this process's
        ``parts`` (one ``[len(block), *item_shape]`` per block of :meth:`blocks`). Every process must call
        it."""
        n, b, world = len(self.fixed), self.batch_size, trainer.world_size
        n_blocks = math.ceil(n / b)
        per_rank = math.ceil(n_blocks / world)
        local = like.new_full((per_rank, b, *item_shape), math.nan)
        for i, part in enumerate(parts):
            local[i, : len(part)] = part
        stacked = trainer.strategy.all_gather(local) if world > 1 else local[None]
        ordered = torch.cat([stacked[j % world, j // world] for j in range(n_blocks)])
        return ordered[:n]

    # -- checkpointed state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "fixed": self.fixed,
            "history": [dict(row) for row in self.history],
            "evaluations": self.evaluations,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fixed = state_dict["fixed"]
        self.history = [dict(row) for row in state_dict["history"]]
        self.evaluations, self.last_step = int(state_dict["evaluations"]), int(state_dict["last_step"])


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
