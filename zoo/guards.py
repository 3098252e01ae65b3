"""Guards every family shares: stop a run on a non-finite loss before any optimizer step uses it.

Call :func:`check_finite` in ``training_step`` (or before each manual ``optimizer.step``) with the loss;
it all-reduces the decision so every process raises at the same step (RELIABILITY.md #14, #19).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised on every process before an optimizer step could use it."""


def check_finite(module: L.LightningModule, name: str, loss: Tensor, batch_idx: int, hint: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming ``name``, the step and the batch when ``loss`` is not finite
    on ANY process. The decision is all-reduced, so every rank raises at the same step (a rank-local raise
    would leave the others hanging in the next collective; RELIABILITY.md #14, #19)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(())
    trainer = getattr(module, "_trainer", None)
    world = 1
    if trainer is not None:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
        world = trainer.world_size
    if bad.item() > 0:
        epoch = trainer.current_epoch if trainer is not None else 0
        raise NonFiniteLossError(
            f"{type(module).__name__}: {name} is {loss.item()} (non-finite on {int(bad.item())} of {world} "
            f"process(es)) at global_step={module.global_step}, epoch={epoch}, batch_idx={batch_idx}. "
            "Training stopped before the optimizer step, so the weights are still finite (the last "
            "checkpoint too). "
            + (hint or "Look for non-finite data or a too large learning rate (lower lr).")
        )
