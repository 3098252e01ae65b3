"""Guards every family shares: no silent bad run.

Two calls in a family's ``training_step``, nothing else (see docs/architecture.md, "Run guards"):

* :func:`check_data` — the first training batch of a fit must have the model's shape and lie in the support
  its likelihood needs (``"real"``, ``"unit_interval"``, ``"binary"``); otherwise :class:`DataSupportError`
  naming the data, the option that imposes the support and what would work, before any optimizer step.
* :func:`check_finite` — the loss and, right before the optimizer writes them, the gradients must be finite;
  otherwise :class:`NonFiniteLossError` naming the family, the loss (or the parameter), the step, the epoch
  and the batch, before the weights are changed (so every checkpoint on disk holds finite weights).

Every decision is all-reduced, so all processes raise at the same step (a rank-local raise would leave the
others hanging in the next collective; RELIABILITY.md #14, #19).

How the gradient check stays cheap: inside ``Trainer.fit`` :func:`check_finite` does not synchronise. It
keeps the loss (on its device) in a :class:`FiniteGuard` callback, which it adds to the trainer once;
Lightning calls the callback's ``on_before_optimizer_step`` after the backward (and after any unscaling) and
before ``optimizer.step`` changes a weight, for automatic and manual optimisation alike. There the losses
since the last step and the sum of the optimizer's gradients (NaN and inf propagate into a sum) become one
flag, reduced over processes and read on the host: ONE synchronisation per optimizer step, as the loss-only
guard had (``benchmarks/guard_overhead.py`` measures the cost). Outside a fit (plain Python)
:func:`check_finite` checks at once. Under ``16-mixed`` the GradScaler skips steps whose gradients overflow
and halves its scale; the guard then raises only when gradients are still non-finite at a scale <= 1 (so
non-finite in themselves), instead of letting the scaler skip every step of the run.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor

Support = Literal["real", "unit_interval", "binary"]
SUPPORTS: tuple[str, ...] = ("real", "unit_interval", "binary")
_SUPPORT_TEXT = {
    "real": "finite values",
    "unit_interval": "every value in [0, 1]",
    "binary": "every value 0 or 1",
}
_DEFAULT_HINT = "Look for non-finite data or a too large learning rate (lower lr)."


class NonFiniteLossError(FloatingPointError):
    """A loss or a gradient became NaN or infinite; raised on every process before an optimizer used it."""


class DataSupportError(ValueError):
    """The training data does not fit the model: wrong shape, or values outside the likelihood's support."""


# -- non-finite losses and gradients -------------------------------------------------------------------------


def check_finite(module: L.LightningModule, name: str, loss: Tensor, batch_idx: int, hint: str = "") -> None:
    """Stop the run with :class:`NonFiniteLossError` when ``loss`` (or, in a fit, the gradients it leads to)
    is NaN or infinite on ANY process, naming ``name``, the family, the step, the epoch and the batch.

    Call it in ``training_step`` with each loss that is backpropagated (manual optimisation: before the
    optimizer step it feeds). In a fit the check happens right before the next ``optimizer.step`` (one
    synchronisation per step, loss and gradients together; see the module docstring); elsewhere at once.
    ``hint`` replaces the default advice at the end of the message.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.training:
        FiniteGuard.of(trainer).pending.append(
            (name, loss.detach(), batch_idx, module.global_step, trainer.current_epoch, hint)
        )
        return
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
    world = 1
    if trainer is not None:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
        world = trainer.world_size
    if bad.item() > 0:
        epoch = trainer.current_epoch if trainer is not None else 0
        n_bad, step = int(bad.item()), module.global_step
        raise NonFiniteLossError(
            _loss_message(module, name, loss, n_bad, world, step, epoch, batch_idx, hint)
        )


def _loss_message(module, name, loss, n_bad, world, step, epoch, batch_idx, hint) -> str:
    value = loss.detach().float()
    shown = value.item() if value.numel() == 1 else f"{value.tolist()}"
    return (
        f"{type(module).__name__}: {name} is {shown} (non-finite on {n_bad} of {world} process(es)) at "
        f"global_step={step}, epoch={epoch}, batch_idx={batch_idx}. Training stopped before the optimizer "
        "step, so the weights are still finite (the last checkpoint too). " + (hint or _DEFAULT_HINT)
    )


class FiniteGuard(Callback):
    """Checks the losses :func:`check_finite` collected and the optimizer's gradients in
    ``on_before_optimizer_step``, with one all-reduce and one host read. :func:`check_finite` adds it to the
    trainer the first time it is called in a fit; adding it yourself changes nothing."""

    def __init__(self) -> None:
        self.pending: list[tuple] = []  # (name, loss, batch_idx, global_step, epoch, hint) since last step

    @staticmethod
    def of(trainer: L.Trainer) -> FiniteGuard:
        """The trainer's guard, added on first use."""
        for callback in trainer.callbacks:
            if isinstance(callback, FiniteGuard):
                return callback
        guard = FiniteGuard()
        trainer.callbacks.append(guard)
        return guard

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pending, self.pending = self.pending, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not pending and not grads:
            return
        # Σ of the losses and Σ_p Σ g: NaN and ±inf propagate into a sum (inf - inf = NaN), so each is finite
        # iff its terms are, except that a finite sum can overflow beyond 3.4e38, far above where gradients
        # break Adam anyway (g² overflows beyond 1.8e19). ~10x cheaper on the CPU than max|g| (_foreach_norm).
        device = (grads[0] if grads else pending[0][1]).device
        zero = torch.zeros((), device=device)
        loss_sum = torch.stack([p[1].float().sum().to(device) for p in pending]).sum() if pending else zero
        # under FSDP2 (zoo.sharding) a gradient is a DTensor: each process checks its own shard
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        grad_sum = torch.stack([g.detach().sum().float() for g in grads]).sum() if grads else zero
        flags = ~torch.isfinite(torch.stack([loss_sum, grad_sum]))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and isinstance(getattr(scaler, "_scale", None), Tensor):
            # 16-mixed: the GradScaler skips a step whose (unscaled) gradients overflow and halves its scale;
            # gradients still non-finite at a scale <= 1 are non-finite in themselves.
            flags[1] &= scaler._scale.to(device).reshape(()) <= 1.0
        flags = flags.to(torch.float32)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        n_loss, n_grad = (int(v) for v in flags.tolist())  # the one host synchronisation
        if n_loss or n_grad:
            raise NonFiniteLossError(self._message(trainer, pl_module, optimizer, pending, n_loss, n_grad))

    @staticmethod
    def _message(trainer, module, optimizer, pending, n_loss, n_grad) -> str:
        world = trainer.world_size
        bad = [p for p in pending if not torch.isfinite(p[1]).all()]
        if n_loss and (bad or pending):  # a loss on this process, or only on another one (shown here as is)
            name, loss, batch_idx, step, epoch, hint = (bad or pending)[0]
            return _loss_message(module, name, loss, n_loss, world, step, epoch, batch_idx, hint)
        names = {id(p): n for n, p in module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        broken = [names.get(id(p), "?") for p in params if not torch.isfinite(p.grad).all()]
        losses = ", ".join(f"{p[0]}={p[1].float().item():.6g}" for p in pending if p[1].numel() == 1)
        name, loss, batch_idx, step, epoch, hint = pending[-1] if pending else (
            "", None, -1, module.global_step, trainer.current_epoch, "")  # fmt: skip
        where = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaled = " even at a GradScaler scale <= 1," if scaler is not None else ""
        return (
            f"{type(module).__name__}: a gradient is non-finite ({where or 'on another process'}){scaled} "
            f"although the loss is finite ({losses or 'not recorded'}), on {n_grad} of {world} process(es), "
            f"at global_step={step}, epoch={epoch}, batch_idx={batch_idx}. Training stopped before the "
            "optimizer step, so the weights are still finite (the last checkpoint too). "
            + (hint or _DEFAULT_HINT)
        )


# -- data outside the model's support ------------------------------------------------------------------------

_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> ids of the modules checked


def check_data(
    module: L.LightningModule,
    batch: Tensor,
    support: Support,
    *,
    option: str = "",
    fix: str = "",
    shape: Sequence[int] | None = None,
) -> None:
    """Refuse data that does not fit the model, with :class:`DataSupportError`, before the first step.

    Checks that the examples of ``batch`` have the shape ``shape`` (default ``module.shape``) and that every
    value lies in ``support``: ``"real"`` (finite), ``"unit_interval"`` ([0, 1]; Bernoulli probabilities or
    grey levels) or ``"binary"`` ({0, 1}). In a fit only the FIRST training batch is checked (one
    synchronisation per fit; later calls return at once); elsewhere every call checks. ``option`` names the
    setting that imposes the support (e.g. ``"--model.likelihood=bernoulli"``), ``fix`` what would work
    instead (e.g. ``"--model.likelihood=gaussian"``); both go into the message.
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {', '.join(map(repr, SUPPORTS))}; got {support!r}")
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        done = _checked.setdefault(trainer, set())
        if id(module) in done:
            return
        done.add(id(module))
    shape = shape if shape is not None else getattr(module, "shape", batch.shape[1:])
    expected = tuple(int(s) for s in shape)
    x = batch.detach()
    shape_ok = tuple(x.shape[1:]) == expected
    if support == "real":
        inside = torch.isfinite(x).all()
    elif support == "unit_interval":
        inside = ((x >= 0) & (x <= 1)).all()
    else:
        inside = ((x == 0) | (x == 1)).all()
    bad = torch.stack([torch.tensor(not shape_ok, device=x.device), ~inside]).to(torch.float32)
    world = 1
    if trainer is not None:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
        world = trainer.world_size
    n_shape, n_support = (int(v) for v in bad.tolist())
    if not (n_shape or n_support):
        return
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = "the training data" + (f" of {type(datamodule).__name__}" if datamodule is not None else "")
    family = type(module).__name__
    if n_shape:
        raise DataSupportError(
            f"{family} was built for examples of shape {expected} (its `shape`), but {data} has examples of "
            f"shape {tuple(x.shape[1:])} (first training batch, {n_shape} of {world} process(es)). Build the "
            f"model with shape={tuple(x.shape[1:])}: `genzoo fit` links the datamodule's shape into "
            "--model.shape unless it is overridden."
        )
    finite = x[torch.isfinite(x)]
    seen = f"[{finite.min().item():.4g}, {finite.max().item():.4g}]" if finite.numel() else "no finite value"
    nonfinite = "" if finite.numel() == x.numel() else f", {x.numel() - finite.numel()} non-finite"
    needs = f"with {option} " if option else ""
    raise DataSupportError(
        f"{family} {needs}needs {_SUPPORT_TEXT[support]}, but {data} does not (first training batch: values "
        f"in {seen}{nonfinite}; {n_support} of {world} process(es)). "
        + (f"Use {fix}, or " if fix else "Use ")
        + f"data with {_SUPPORT_TEXT[support]}."
    )
