"""An energy-based model trained by noise-contrastive estimation (NCE), with a learned log-normaliser.

Model: p_θ(x) = exp(-E_θ(x) - c), where c is a free parameter standing in for log Z(θ) (seed 001, "Noise
Contrastive Estimation"; Gutmann & Hyvärinen 2012, "Noise-contrastive estimation of unnormalized statistical
models, with applications to natural image statistics", JMLR 13).

NCE turns density estimation into logistic regression between the data and ``k`` noise samples y_j ~ q per
data point: with G(u) = log p_θ(u) - log q(u) = -E_θ(u) - c - log q(u) and the posterior of "data",
P(D = 1 | u) = σ(G(u) - log k) (seed 001: u_θ / (u_θ + k q)), the loss per data point is

    ℓ(x, y_1..k) = -log σ(G(x) - log k) - Σ_j log σ(-(G(y_j) - log k)).

Its minimiser is p_θ = p_data when the family contains it, with c = log Z: the model normalises itself, so
``log_prob(x) = -E(x) - c`` is a log-density without ever computing Z (Gutmann & Hyvärinen 2012, Thm. 2).

``objective="negative_sampling"`` (seed 001, Mikolov et al. 2013) is the special case that drops the noise
density: the logit is -E(u) - c instead of G(u) - log k. That is NCE with k q ≡ 1 (seed 001: k = |V| and q
uniform over a vocabulary), and for any other noise its optimum is -E(x) - c = log p_data(x) - log(k q(x)):
the energy learns a density *ratio*, not a density. ``log_prob`` adds log(k q(x)) back so it is still the
model's log-density; -E - c alone is no longer normalised.

Energies: ``energy="mlp"`` (a scalar MLP with SiLU activations, smooth in x) or ``"quadratic"``,
E(x) = ½ (x - μ)ᵀ P (x - μ) with P = L Lᵀ a full precision matrix (L lower triangular, positive diagonal):
the Gaussian family, for which NCE recovers the data's mean, covariance and c = log((2π)^{D/2} det P^{-1/2}).
Or the user's own network for the ``energy`` role, ``[B, *shape] -> [B]`` (or ``[B, 1]``), checked once at
construction; the family adds c, the noise, the loss, the guards and the DDP-exact noise around it.

Noise: ``noise="gaussian"``, N(m, s² S) with m, S the training data's mean and covariance (plus a
1e-4 · tr S / D ridge), s = ``noise_scale``. They are computed in ``on_fit_start`` from the training set, each
process summing its interleaved share ``range(rank, N, W)`` in float64 and all-reducing, so 1 and N processes
get the same noise; they are buffers, so a checkpoint keeps them and a resumed run does not refit. Outside a
Trainer call :meth:`NCE.fit_noise` (until then the noise is N(0, I)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal
from torch.nn.functional import logsigmoid
from torchmetrics import MeanMetric

from zoo.gaussian import full_precision, upcast
from zoo.guards import check_data, check_finite
from zoo.networks import check_role, dummy_batch, mlp, numel
from zoo.noise import global_normal, mix_key, positional_normal, randn, shard_of, step_key
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments

Energy = Literal["mlp", "quadratic"]
Objective = Literal["nce", "negative_sampling"]
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
_RIDGE = 1e-4


class QuadraticEnergy(nn.Module):
    """E(x) = ½ (x - μ)ᵀ L Lᵀ (x - μ) for ``x [B, D]``; L lower triangular with diagonal exp(raw)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))
        self.tril = nn.Parameter(torch.zeros(dim, dim))  # strictly lower part used; diagonal = exp(tril_ii)

    def cholesky(self) -> Tensor:
        """L with P = L Lᵀ."""
        return torch.tril(self.tril, -1) + torch.diag(self.tril.diagonal().exp())

    def precision(self) -> Tensor:
        factor = self.cholesky()
        return factor @ factor.T

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * ((x - self.mean) @ self.cholesky()).pow(2).sum(-1)


class NCE(L.LightningModule):
    """Energy model p(x) = exp(-E(x) - c) trained by noise-contrastive estimation.

    Args:
        shape: shape of one example, linked from the datamodule by the CLI, e.g. ``(2,)``.
        energy: the ``energy`` role: a preset, ``"mlp"`` or ``"quadratic"`` (the full-precision Gaussian
            family), or the user's network ``[B, *shape] -> [B]`` (``[B, 1]`` is squeezed), checked on a dummy
            batch here (``class_path`` / ``init_args`` in a recipe).
        noise: the noise distribution; ``"gaussian"``: matched to the training data's mean and covariance.
        objective: ``"nce"`` or ``"negative_sampling"`` (no noise-density term; see the module docstring).
        k: noise samples per data point.
        noise_scale: the noise's standard deviation relative to the data's (> 1 widens it).
        hidden: widths of the MLP energy's hidden layers (the ``"mlp"`` preset only).
        lr: learning rate of the default optimiser (Adam); ignored when ``optimizer`` is given.
        sample_proposals: noise proposals per sample drawn by :meth:`sample` (importance resampling).
        seed: seed of the training and evaluation noise (see :mod:`zoo.noise`).
        optimizer: a callable ``params -> Optimizer`` (``OptimizerCallable``); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler`` (``LRSchedulerCallable``), stepped every
            optimizer step; None: a constant learning rate.

    Example:
        >>> model = NCE(shape=(2,), energy="quadratic", k=5)
        >>> x = torch.randn(8, 2)
        >>> model.log_prob(x).shape, model.training_loss(x).shape
        (torch.Size([8]), torch.Size([]))
        >>> own = nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 1))  # [B, 2] -> [B, 1]
        >>> NCE(shape=(2,), energy=own).energy(x).shape
        torch.Size([8])
    """

    def __init__(
        self,
        shape: Sequence[int],
        energy: Energy | nn.Module = "mlp",
        noise: Literal["gaussian"] = "gaussian",
        objective: Objective = "nce",
        k: int = 10,
        noise_scale: float = 1.0,
        hidden: Sequence[int] = (128, 128),
        lr: float = 1e-3,
        sample_proposals: int = 100,
        seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        network = energy if isinstance(energy, nn.Module) else None
        preset = "mlp" if network is not None else energy
        _check_arguments(shape, preset, noise, objective, k, noise_scale, lr, sample_proposals)
        self.save_hyperparameters(
            ignore=live_arguments(energy=network, optimizer=optimizer, lr_scheduler=lr_scheduler)
        )
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        self.objective, self.k = objective, k
        self.shape, self.energy_kind = shape, "custom" if network is not None else energy
        self.noise_scale, self.lr, self.sample_proposals, self.seed = noise_scale, lr, sample_proposals, seed
        self.dim = dim = numel(shape)
        if network is not None:
            check_role("NCE", "energy", network, [dummy_batch(shape, like=network)], ("B",), ("B", 1),
                       hint="One energy (a scalar) per example. ")  # fmt: skip
            self.energy_net = network
        elif energy == "quadratic":
            self.energy_net = QuadraticEnergy(dim)
        else:
            self.energy_net = nn.Sequential(nn.Flatten(), mlp(dim, tuple(hidden), 1, activation=nn.SiLU))
        self.c = nn.Parameter(torch.zeros(()))  # the learned log-normaliser
        self.register_buffer("noise_mean", torch.zeros(dim))
        self.register_buffer("noise_tril", torch.eye(dim))
        self.register_buffer("noise_fitted", torch.zeros((), dtype=torch.bool))
        self.val_loss, self.val_log_prob, self.val_kl = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_loss, self.test_log_prob, self.test_kl = MeanMetric(), MeanMetric(), MeanMetric()

    # -- the model ------------------------------------------------------------------------------------

    def energy(self, x: Tensor) -> Tensor:
        """E(x) ``[B]`` for ``x [B, *shape]``, float32 (or wider) also under autocast."""
        flat = x.flatten(1) if self.energy_kind == "quadratic" else x
        return upcast(self.energy_net(flat)).reshape(x.shape[0])

    def noise_distribution(self) -> MultivariateNormal:
        """q = N(m, s² S) over flattened examples."""
        return MultivariateNormal(self.noise_mean, scale_tril=self.noise_tril, validate_args=False)

    def noise_log_prob(self, x: Tensor) -> Tensor:
        with full_precision(x):
            return self.noise_distribution().log_prob(upcast(x).flatten(1))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) = -E(x) - c (NCE), or -E(x) - c + log(k q(x)) (negative sampling), ``[B]`` nats."""
        log_p = -self.energy(x) - self.c
        if self.objective == "negative_sampling":
            log_p = log_p + math.log(self.k) + self.noise_log_prob(x)
        return log_p

    def logit(self, x: Tensor) -> Tensor:
        """Logit of P(data | x): G(x) - log k = -E - c - log q - log k (NCE) or -E - c (negative sampling)."""
        logit = -self.energy(x) - self.c
        if self.objective == "nce":
            logit = logit - self.noise_log_prob(x) - math.log(self.k)
        return logit

    def gaussian(self) -> MultivariateNormal:
        """The model as a ``MultivariateNormal`` (quadratic energy only): N(μ, P⁻¹)."""
        if self.energy_kind != "quadratic":
            raise NotImplementedError("NCE.gaussian exists for energy='quadratic' only")
        return MultivariateNormal(self.energy_net.mean, precision_matrix=self.energy_net.precision())

    @torch.no_grad()
    def fit_noise(self, x: Tensor) -> None:
        """Set the noise to N(mean, s² (cov + ridge)) of the examples ``x [N, *shape]`` (one process)."""
        flat = x.flatten(1).double()
        total = flat.sum(0)
        self._set_noise(
            total / len(flat), (flat - total / len(flat)).T @ (flat - total / len(flat)), len(flat)
        )

    def _set_noise(self, mean: Tensor, scatter: Tensor, n: int) -> None:
        cov = scatter / n
        cov = cov + _RIDGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.noise_mean.copy_(mean)
        self.noise_tril.copy_(self.noise_scale * torch.linalg.cholesky(cov))
        self.noise_fitted.fill_(True)

    def on_fit_start(self) -> None:
        """Match the noise to the training set once (not again on resume: the buffers are checkpointed)."""
        if bool(self.noise_fitted):
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError("NCE fits its noise to the training data: pass a datamodule to Trainer.fit")
        dataset = datamodule.train_dataloader().dataset
        rank, world = shard_of(self)
        index = list(range(rank, len(dataset), world))
        getitems = getattr(dataset, "__getitems__", None)
        local = getitems(index) if getitems else torch.stack([dataset[i] for i in index])
        local = (
            (local[0] if isinstance(local, list | tuple) else local).flatten(1).to(self.device, torch.float64)
        )
        reduce = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        mean = reduce(local.sum(0)) / len(dataset)
        centred = local - mean
        self._set_noise(mean, reduce(centred.T @ centred), len(dataset))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws: exact for the quadratic energy; otherwise sampling-importance-resampling from
        ``sample_proposals`` noise proposals per draw, weights p(y) / q(y) (exact as proposals → ∞)."""
        if self.energy_kind == "quadratic":
            eps = randn((n, self.dim), generator, device=self.device, dtype=self.dtype)
            factor = self.energy_net.cholesky()  # x = μ + L⁻ᵀ ε has covariance (L Lᵀ)⁻¹
            x = self.energy_net.mean + torch.linalg.solve_triangular(factor.T, eps.T, upper=True).T
            return x.reshape(n, *self.shape)
        m = n * self.sample_proposals
        eps = randn((m, self.dim), generator, device=self.device, dtype=self.dtype)
        proposals = self.noise_mean + eps @ self.noise_tril.T
        log_w = (self.log_prob(proposals.reshape(m, *self.shape)) - self.noise_log_prob(proposals)).float()
        index = torch.multinomial(torch.softmax(log_w, 0), n, replacement=True, generator=generator)
        return proposals[index].reshape(n, *self.shape)

    # -- training ---------------------------------------------------------------------------------------

    def nce_loss(self, x: Tensor, eps: Tensor) -> Tensor:
        """ℓ per data point ``[B]`` with noise y = m + L_q ε for ``eps [B, k, D]``."""
        y = (self.noise_mean + eps @ self.noise_tril.T).reshape(-1, *self.shape)  # [B * k, *shape]
        logits = self.logit(torch.cat([x, y.to(x.dtype)]))
        with full_precision(logits):
            data, noise = logits[: len(x)], logits[len(x) :].reshape(len(x), self.k)
            return -logsigmoid(data) - logsigmoid(-noise).sum(-1)

    def training_loss(self, batch: Tensor) -> Tensor:
        """ℓ averaged over the batch, with this step's noise samples (the single-objective capability)."""
        x = batch
        rank, world = shard_of(self)
        eps = global_normal(
            x.shape[0],
            (self.k, self.dim),
            key=step_key(self, _TRAIN_STREAM),
            rank=rank,
            world=world,
            device=x.device,
            dtype=self.noise_tril.dtype,
        )
        return self.nce_loss(x, eps).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        check_data(self, batch, "real")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/c", self.c.detach())
        return loss

    def _evaluate(
        self, x: Tensor, batch_idx: int, loss: MeanMetric, log_prob: MeanMetric, kl: MeanMetric
    ) -> None:
        rank, world = shard_of(self)
        eps = positional_normal(
            x.shape[0], (self.k, self.dim), key=mix_key(self.seed, _EVAL_STREAM, batch_idx), rank=rank,
            world=world, device=x.device, dtype=self.noise_tril.dtype,
        )  # fmt: skip
        loss.update(self.nce_loss(x, eps))
        log_p = self.log_prob(x)
        log_prob.update(log_p)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "has_log_prob", False):  # exact data density: KL(p_data ‖ p_θ) per example
            kl.update(datamodule.log_prob(x) - log_p)

    def _log_eval(self, stage: str, loss: MeanMetric, log_prob: MeanMetric, kl: MeanMetric) -> None:
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/log_prob", log_prob, prog_bar=stage == "val")
        if kl.update_count:
            self.log(f"{stage}/kl", kl)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.val_loss, self.val_log_prob, self.val_kl)
        self._log_eval("val", self.val_loss, self.val_log_prob, self.val_kl)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.test_loss, self.test_log_prob, self.test_kl)
        self._log_eval("test", self.test_loss, self.test_log_prob, self.test_kl)

    def configure_optimizers(self):
        return configure_single(self, adam(self.lr))


def _check_arguments(shape, energy, noise, objective, k, noise_scale, lr, sample_proposals) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if energy not in ("mlp", "quadratic"):
        raise ValueError(f"energy must be 'mlp', 'quadratic' or a torch.nn.Module; got {energy!r}")
    if noise != "gaussian":
        raise ValueError(f"noise must be 'gaussian'; got {noise!r}")
    if objective not in ("nce", "negative_sampling"):
        raise ValueError(f"objective must be 'nce' or 'negative_sampling'; got {objective!r}")
    for name, value in (("k", k), ("sample_proposals", sample_proposals)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive; got {noise_scale}")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr}")
