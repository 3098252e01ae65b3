"""The smallest explicit density: a full-covariance Gaussian fitted by maximum likelihood, the showcase of
:class:`zoo.natural_gradient.NaturalGradient` (its Fisher is known in closed form, its optimum too).

p_θ(x) = N(x; μ, L Lᵀ), θ = (μ, L) with L lower triangular and diagonal exp(s). The maximum-likelihood optimum
is μ = x̄, L Lᵀ = S (the sample covariance, 1/N), with mean negative log-likelihood ½ log det(2π S) + D/2.
Its loss surface is as badly conditioned as the data's covariance: plain gradient steps crawl along the
long axis, the natural gradient (Fisher-preconditioned) does not (tests/test_natural_gradient.py counts).
"""

from __future__ import annotations

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


class ExplicitGaussian(L.LightningModule):
    """N(μ, L Lᵀ) on flattened examples, trained by maximum likelihood.

    Args:
        shape: shape of one example, linked from the datamodule by the CLI.
        optimizer: ``"natural"`` (:class:`~zoo.natural_gradient.NaturalGradient`), ``"adam"`` or ``"sgd"``.
        lr: learning rate (1 is the full natural-gradient step).
        damping: damping of the Fisher (natural gradient only).
        fisher: ``"outer"`` or ``"kl_hessian"`` Fisher-vector products (natural gradient only).
        fisher_samples: model samples per step for the Fisher (natural gradient only).
        cg_iters: conjugate-gradient iterations per step (natural gradient only).
        seed: seed of the Fisher samples.
    """

    def __init__(
        self,
        shape: Sequence[int],
        optimizer: Literal["natural", "adam", "sgd"] = "natural",
        lr: float = 1.0,
        damping: float = 1e-4,
        fisher: Fisher = "outer",
        fisher_samples: int = 256,
        cg_iters: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if optimizer not in ("natural", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'natural', 'adam' or 'sgd'; got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive; got {lr}")
        self.save_hyperparameters()
        self.shape, self.optimizer_kind, self.lr = shape, optimizer, lr
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        if self.optimizer_kind == "natural":
            return NaturalGradient(
                self.parameters(), self, lr=self.lr, damping=h.damping, fisher=h.fisher,
                n_samples=h.fisher_samples, cg_iters=h.cg_iters, seed=h.seed,
            )  # fmt: skip
        if self.optimizer_kind == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)
