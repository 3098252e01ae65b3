"""The smallest explicit density: a full-covariance Gaussian fitted by maximum likelihood, the showcase of
:class:`zoo.natural_gradient.NaturalGradient` (its Fisher is known in closed form, its optimum too).

p_θ(x) = N(x; μ, L Lᵀ), θ = (μ, L) with L lower triangular and diagonal exp(s). The maximum-likelihood optimum
is μ = x̄, L Lᵀ = S (the sample covariance, 1/N), with mean negative log-likelihood ½ log det(2π S) + D/2.
Its loss surface is as badly conditioned as the data's covariance: plain gradient steps crawl along the
long axis, the natural gradient (Fisher-preconditioned) does not (tests/test_natural_gradient.py counts).

The optimiser is an argument: a shorthand string (``"natural"``, ``"adam"``, ``"sgd"``) or any
``OptimizerCallable`` (Lightning's convention, :mod:`zoo.plugins`), :class:`NaturalGradient` included: the
family binds itself as the optimiser's model (``bind_model``), so its Fisher is this Gaussian's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal
from torchmetrics import MeanMetric

from zoo.gaussian import full_precision, upcast
from zoo.guards import check_data, check_finite
from zoo.natural_gradient import Fisher, NaturalGradient
from zoo.networks import numel
from zoo.noise import randn
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, configure_single, live_arguments

Shorthand = Literal["natural", "adam", "sgd"]


class ExplicitGaussian(L.LightningModule):
    """N(μ, L Lᵀ) on flattened examples, trained by maximum likelihood.

    Args:
        shape: shape of one example, linked from the datamodule by the CLI.
        optimizer: a shorthand, ``"natural"`` (:class:`~zoo.natural_gradient.NaturalGradient` built from
            ``lr``, ``damping``, ``fisher``, ``fisher_samples``, ``cg_iters``, ``seed``), ``"adam"`` or
            ``"sgd"`` (at ``lr``); or a callable ``params -> Optimizer`` (``OptimizerCallable``, e.g.
            ``functools.partial(NaturalGradient, lr=1.0, damping=1e-4)`` or ``class_path`` / ``init_args``
            in a recipe), which the shorthand's arguments below do not touch.
        lr: learning rate of the shorthands (1 is the full natural-gradient step); ignored for a callable.
        damping: damping of the Fisher (``"natural"`` only).
        fisher: ``"outer"`` or ``"kl_hessian"`` Fisher-vector products (``"natural"`` only).
        fisher_samples: model samples per step for the Fisher (``"natural"`` only).
        cg_iters: conjugate-gradient iterations per step (``"natural"`` only).
        seed: seed of the Fisher samples (``"natural"`` only; NaturalGradient's own ``seed`` otherwise).
        lr_scheduler: a callable ``optimizer -> scheduler`` (``LRSchedulerCallable``), stepped every optimizer
            step; None: a constant learning rate.

    Example:
        >>> import functools
        >>> model = ExplicitGaussian(shape=(2,), optimizer=functools.partial(NaturalGradient, lr=0.5))
        >>> type(model.configure_optimizers()).__name__
        'NaturalGradient'
    """

    def __init__(
        self,
        shape: Sequence[int],
        optimizer: Shorthand | OptimizerCallable = "natural",
        lr: float = 1.0,
        damping: float = 1e-4,
        fisher: Fisher = "outer",
        fisher_samples: int = 256,
        cg_iters: int = 50,
        seed: int = 0,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if isinstance(optimizer, str) and optimizer not in ("natural", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'natural', 'adam', 'sgd' or a callable; got {optimizer!r}")
        if not isinstance(optimizer, str) and not callable(optimizer):
            raise TypeError(
                f"optimizer must be a shorthand string or a callable; got {type(optimizer).__name__}"
            )
        if lr <= 0:
            raise ValueError(f"lr must be positive; got {lr}")
        callable_optimizer = None if isinstance(optimizer, str) else optimizer
        self.save_hyperparameters(
            ignore=live_arguments(optimizer=callable_optimizer, lr_scheduler=lr_scheduler)
        )
        self.shape, self.lr = shape, lr
        self.optimizer_kind = optimizer if isinstance(optimizer, str) else "callable"
        self._optimizer_callable, self._lr_scheduler_callable = callable_optimizer, lr_scheduler
        self.dim = numel(shape)
        self.mean = nn.Parameter(torch.zeros(self.dim))
        self.tril = nn.Parameter(torch.zeros(self.dim, self.dim))  # strict lower part; diagonal is log L_ii
        self.val_log_prob, self.test_log_prob = MeanMetric(), MeanMetric()

    def scale_tril(self) -> Tensor:
        return torch.tril(self.tril, -1) + torch.diag(self.tril.diagonal().exp())

    def distribution(self) -> MultivariateNormal:
        return MultivariateNormal(self.mean, scale_tril=self.scale_tril(), validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log N(x; μ, L Lᵀ), ``[B]`` nats."""
        with full_precision(x):
            return self.distribution().log_prob(upcast(x).flatten(1).to(self.mean.dtype))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        eps = randn((n, self.dim), generator, device=self.device, dtype=self.dtype)
        return (self.mean + eps @ self.scale_tril().T).reshape(n, *self.shape)

    def training_loss(self, batch: Tensor) -> Tensor:
        """Mean negative log-likelihood of the batch."""
        return -self.log_prob(batch).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        check_data(self, batch, "real")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.val_log_prob.update(self.log_prob(batch))
        self.log("val/log_prob", self.val_log_prob, prog_bar=True)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.test_log_prob.update(self.log_prob(batch))
        self.log("test/log_prob", self.test_log_prob)

    def configure_optimizers(self):
        return configure_single(self, self._shorthand())

    def _shorthand(self) -> OptimizerCallable:
        """The optimiser the string ``optimizer`` names (used when no callable is given)."""
        h = self.hparams
        if self.optimizer_kind == "natural":
            return functools.partial(
                NaturalGradient, lr=self.lr, damping=h.damping, fisher=h.fisher, n_samples=h.fisher_samples,
                cg_iters=h.cg_iters, seed=h.seed,
            )  # fmt: skip
        make = torch.optim.Adam if self.optimizer_kind == "adam" else torch.optim.SGD
        return functools.partial(make, lr=self.lr)
