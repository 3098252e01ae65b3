"""What every family shares to take the user's own pieces: optimisers and schedules as arguments (Lightning's
convention), and the hyperparameters a checkpoint can rebuild them from.

Optimisers and schedules
------------------------
Every family takes ``optimizer: OptimizerCallable | None`` (a callable ``params -> Optimizer``) and
``lr_scheduler: LRSchedulerCallable | None`` (``optimizer -> scheduler``), the types LightningCLI fills from a
recipe's ``class_path`` / ``init_args``::

    model:
      class_path: VAE
      init_args:
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 0.0003, weight_decay: 0.01}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.CosineAnnealingLR
          init_args: {T_max: 10000}

and Python from ``functools.partial(torch.optim.AdamW, lr=3e-4)`` or any lambda. ``optimizer=None`` is the
family's default (Adam at its ``lr``; ``lr`` is only that default's shorthand, ignored when ``optimizer`` is
given). A schedule is stepped after every optimizer step (Lightning's ``interval: "step"``), so ``T_max``
and ``total_iters`` count steps; ``ReduceLROnPlateau`` is stepped once per epoch on ``train/loss``. The
adversarial families take one pair per player (``generator_optimizer`` / ``discriminator_optimizer`` ...).

An optimiser that needs the model itself (``zoo.natural_gradient.NaturalGradient``: Fisher-vector products of
the model's ``log_prob``) has a ``bind_model(module)`` method; :func:`build_optimizer` calls it.

Hyperparameters
---------------
A network or callable given from Python is a live object: it is left out of ``save_hyperparameters`` (a
checkpoint must not pickle code), so ``Family.load_from_checkpoint(path, encoder=MyEncoder())`` passes it
again. From LightningCLI the same argument is saved as its ``class_path`` / ``init_args`` config, so the
checkpoint of a recipe run reloads with ``Family.load_from_checkpoint(path)`` and no arguments wherever the
user's classes are importable (:func:`live_arguments`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

__all__ = [
    "LRSchedulerCallable",
    "OptimizerCallable",
    "adam",
    "build_optimizer",
    "build_scheduler",
    "configure_single",
    "linear_decay",
    "live_arguments",
    "optimizer_config",
]


def adam(lr: float, betas: Sequence[float] = (0.9, 0.999)) -> OptimizerCallable:
    """The families' default: ``torch.optim.Adam`` at ``lr`` (and ``betas``)."""
    return functools.partial(torch.optim.Adam, lr=float(lr), betas=tuple(float(b) for b in betas))


def build_optimizer(
    module,
    params: Iterable,
    optimizer: OptimizerCallable | None,
    default: OptimizerCallable,
    role: str = "optimizer",
) -> torch.optim.Optimizer:
    """``optimizer(params)`` (``default`` when None), checked to be a ``torch.optim.Optimizer``; binds the
    model to an optimiser that needs it (``bind_model``)."""
    make = default if optimizer is None else optimizer
    built = make(list(params))
    if not isinstance(built, torch.optim.Optimizer):
        raise TypeError(
            f"{type(module).__name__}: {role} must be a callable params -> torch.optim.Optimizer (e.g. "
            f"functools.partial(torch.optim.AdamW, lr=1e-3), or class_path/init_args in a recipe); it "
            f"returned {type(built).__name__}"
        )
    bind = getattr(built, "bind_model", None)
    if callable(bind):
        bind(module)
    return built


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRSchedulerCallable | None,
    role: str,
    stepped_by: str | None = None,
):
    """``lr_scheduler(optimizer)`` or None, checked to have ``step``. ``stepped_by`` names a family that
    steps its schedules itself every batch (manual optimisation), where ``ReduceLROnPlateau``, which needs a
    monitored loss, is refused."""
    if lr_scheduler is None:
        return None
    scheduler = lr_scheduler(optimizer)
    if not callable(getattr(scheduler, "step", None)):
        raise TypeError(
            f"{role} must be a callable optimizer -> learning-rate scheduler (e.g. functools.partial("
            f"torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1000)); it returned "
            f"{type(scheduler).__name__}"
        )
    if stepped_by is not None and isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            f"{stepped_by}: {role} cannot be ReduceLROnPlateau: the family steps its schedules itself, every "
            "batch, with no loss to monitor; use a schedule in steps (StepLR, LinearLR, CosineAnnealingLR)"
        )
    return scheduler


def linear_decay(trainer, optimizer: torch.optim.Optimizer, final_factor: float):
    """The ``lr_final_factor`` shorthand: a ``LinearLR`` from lr to ``lr * final_factor`` over the run's
    ``trainer.estimated_stepping_batches`` (1 when that is unbounded or unknown)."""
    total = trainer.estimated_stepping_batches
    total = int(total) if math.isfinite(total) and total > 0 else 1
    return torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, final_factor, total_iters=total)


def optimizer_config(optimizer: torch.optim.Optimizer, scheduler, monitor: str = "train/loss"):
    """What ``configure_optimizers`` returns for one optimiser and an optional scheduler: stepped every
    optimizer step; ``ReduceLROnPlateau`` once per epoch on ``monitor``."""
    if scheduler is None:
        return optimizer
    config = {"scheduler": scheduler, "interval": "step"}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config.update(interval="epoch", monitor=monitor)
    return {"optimizer": optimizer, "lr_scheduler": config}


def configure_single(module, default: OptimizerCallable, fallback=None, monitor: str = "train/loss"):
    """``configure_optimizers`` of a one-optimiser family: ``module._optimizer_callable`` over its parameters
    (``default`` when None) and ``module._lr_scheduler_callable`` (when None: ``fallback(optimizer)`` if
    given, e.g. a family's linear decay, else no schedule), as :func:`optimizer_config` returns them."""
    optimizer = build_optimizer(module, module.parameters(), module._optimizer_callable, default)
    scheduler = build_scheduler(optimizer, module._lr_scheduler_callable, "lr_scheduler")
    if scheduler is None and fallback is not None:
        scheduler = fallback(optimizer)
    return optimizer_config(optimizer, scheduler, monitor)


def live_arguments(**arguments) -> list[str]:
    """The names among ``arguments`` (networks, optimiser and schedule callables) to leave out of
    ``save_hyperparameters``: every one given (not None) from Python. Under LightningCLI nothing is left out:
    Lightning saves the recipe's ``class_path`` / ``init_args`` for them, which ``load_from_checkpoint``
    rebuilds."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    if _given_hyperparameters.get() is not None:  # instantiated by LightningCLI: its config is saved
        return []
    return [name for name, value in arguments.items() if value is not None]
