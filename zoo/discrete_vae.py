"""A VAE with categorical latents: Gumbel-softmax (Concrete), straight-through, or score-function gradients.

Model: ``n_latents`` independent categorical latents z_l with ``n_categories`` values each, one-hot coded,
a uniform prior p(z) = Π_l 1/C, a Bernoulli decoder p(x | z) (MLP on the concatenated one-hots) and an
amortised posterior q(z | x) = Π_l Cat(z_l; softmax(logits_l(x))). The model is discrete: every reported
ELBO, IWAE bound and ``log_prob`` is that of the categorical model, never of a relaxation.

* Gumbel-max trick (seed 001; Gumbel 1954): with G_c = -log(-log U_c), U_c ~ U(0, 1) i.i.d.,
  argmax_c (logits_c + G_c) ~ Cat(softmax(logits)). Exact samples of q, but argmax has no useful gradient.
* Concrete / Gumbel-softmax relaxation (seed 001 "softmax map"; Maddison, Mnih & Teh 2017; Jang, Gu & Poole
  2017): z̃ = softmax((logits + G) / τ), a point of the simplex that tends to the Gumbel-max one-hot as τ → 0.
  ``estimator="gumbel"`` differentiates through z̃ (the decoder sees z̃): low variance, biased for τ > 0.
* Straight-through Gumbel-softmax (Jang et al. 2017): ``estimator="straight_through"`` uses the one-hot
  z = argmax in the forward pass (so the loss is the discrete model's) and the gradient of z̃ backwards.
* Score function (REINFORCE, seed 001; :mod:`zoo.gradients`): ``estimator="score"`` samples exact one-hots
  and adds (L - b) ∇ log q(z | x) with a moving-average baseline b: unbiased, high variance.

Bounds (nats per example). With ``k = 1`` every estimator trains L_1 = E_q[log p(x | z)] - KL(q(z | x) ‖ p(z))
with the KL of the categoricals in closed form (Jang et al. 2017). With ``k > 1`` it trains the importance-
weighted bound L_k = E log (1/k) Σ_j w_j (Burda et al. 2016), w_j = p(x | z_j) p(z_j) / q(z_j | x):
``"straight_through"`` and ``"score"`` with the discrete weights, ``"gumbel"`` with the relaxed weights of
Maddison et al. (2017), w̃_j = p(x | z̃_j) p_τ(z̃_j) / q_τ(z̃_j | x), p_τ and q_τ the Concrete densities of the
uniform prior and of q at temperature τ (``RelaxedOneHotCategorical``; evaluated on log z̃ through its
``ExpRelaxedCategorical`` base, where the Jacobian of exp cancels in the ratio and nothing underflows).

``log_prob(x)`` is exact: log p(x) = logsumexp_z [log p(x | z) + log p(z)] over all C^L configurations
(allowed while C^L <= 2^16). Temperature: τ_t = τ_0 (τ_min / τ_0)^(min(t, T) / T) over ``anneal_steps`` = T
optimizer steps (constant τ_0 when T = 0), a function of the global step, so a resumed run continues it.

Sampling uses ``torch.distributions`` for the densities (``OneHotCategorical``, ``RelaxedOneHotCategorical``)
and the Gumbel transform of uniforms from :mod:`zoo.noise` for the draws, because the distributions' own
samplers read the global RNG: keyed uniforms give every example the same noise on 1 or N processes and after a
resume. The transform is the one ``ExpRelaxedCategorical.rsample`` applies (tests check they agree).

Networks are arguments: ``encoder`` ``[B, *shape] -> [B, F]`` features (a linear head maps them to the
``[B, L, C]`` logits of q) and ``decoder`` ``[B, L * C] -> [B, *shape]`` Bernoulli logits, checked once on a
dummy batch when the model is built; by default both are MLPs. Optimiser and schedule are arguments too
(:mod:`zoo.plugins`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    Distribution,
    Independent,
    OneHotCategorical,
    RelaxedOneHotCategorical,
    kl_divergence,
)
from torch.distributions.utils import clamp_probs
from torch.nn.functional import binary_cross_entropy_with_logits, one_hot, softplus
from torchmetrics import MeanMetric

from zoo.gaussian import full_precision, upcast
from zoo.gradients import MovingAverageBaseline, score_function_surrogate
from zoo.guards import check_data, check_finite
from zoo.networks import check_role, dummy_batch, mlp, numel
from zoo.noise import global_uniform, mix_key, positional_uniform, shard_of, step_key
from zoo.pixels import bits_per_dim, check_levels
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments
from zoo.vae import log_mean_exp

Estimator = Literal["gumbel", "straight_through", "score"]
ESTIMATORS = ("gumbel", "straight_through", "score")
MAX_ENUMERATION = 2**16  # largest C ** L that log_prob enumerates
_TRAIN_STREAM, _ELBO_STREAM, _IWAE_STREAM = 0, 1, 2


def gumbel(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise G = -log(-log U) from uniforms (seed 001, "how to sample a Gumbel?"); U is
    clamped to [eps, 1 - eps] as ``torch.distributions`` does, so G is finite."""
    return -torch.log(-torch.log(clamp_probs(uniform)))


def gumbel_max(logits: Tensor, uniform: Tensor) -> Tensor:
    """One-hot argmax_c (logits_c + G_c): an exact draw of ``OneHotCategorical(logits=logits)``."""
    return one_hot((logits + gumbel(uniform)).argmax(-1), logits.shape[-1]).to(logits.dtype)


def relaxed_log_sample(logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """log z̃ with z̃ = softmax((logits + G) / τ): a reparameterised draw of the log of a
    ``RelaxedOneHotCategorical(τ, logits=logits)`` sample (``ExpRelaxedCategorical.rsample``'s transform)."""
    return torch.log_softmax((logits + gumbel(uniform)) / temperature, dim=-1)


def straight_through(soft: Tensor) -> Tensor:
    """one_hot(argmax soft) in the forward pass, the gradient of ``soft`` in the backward pass. Written as
    hard + (soft - soft.detach()), so the forward value is exactly one-hot."""
    hard = one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


class DiscreteVAE(L.LightningModule):
    """VAE / IWAE with ``n_latents`` categorical latents of ``n_categories`` values and a Bernoulli decoder.

    Args:
        shape: shape of one example (data in [0, 1]), linked from the datamodule by the CLI.
        n_latents: number L of categorical latent variables.
        n_categories: values C of each (>= 2).
        estimator: ``"gumbel"`` (Concrete relaxation), ``"straight_through"`` (one-hot forward, relaxed
            backward) or ``"score"`` (REINFORCE with a moving-average baseline).
        temperature: initial temperature τ_0 of the relaxation (``gumbel``, ``straight_through``).
        temperature_min: final temperature τ_min (a floor: the relaxation's gradients blow up as τ → 0).
        anneal_steps: optimizer steps of the exponential decay from τ_0 to τ_min; 0 keeps τ_0.
        k: importance samples per example in training; ``k > 1`` trains L_k.
        hidden: widths of the MLP encoder's hidden layers (the MLP decoder mirrors them); ignored for a role
            given as a network.
        lr: learning rate of the default optimiser, Adam (ignored when ``optimizer`` is given).
        eval_k: importance samples of ``val/iwae`` and ``test/iwae``.
        seed: seed of the training and evaluation noise (see :mod:`zoo.noise`).
        encoder: the encoder network, ``[B, *shape] -> [B, F]`` features (any F, read from a dry run; a linear
            layer, ``posterior_head``, maps them to the L x C logits). None: an MLP that ends in the logits
            itself (``posterior_head`` is then the identity).
        decoder: the decoder network, ``[B, n_latents * n_categories] -> [B, *shape]`` Bernoulli logits, fed
            the concatenated one-hots (or their relaxation). None: an MLP.
        optimizer: a callable ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW,
            lr=3e-4)``, or ``class_path`` / ``init_args`` in a recipe); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler``, stepped after every optimizer step; None: a
            constant learning rate. The temperature schedule is separate (``anneal_steps``).
        levels: levels of the data (the CLI links the datamodule's ``levels``); with binary data
            (``levels=2``), where the Bernoulli decoder is a distribution over the levels, ``val/bpd`` and
            ``test/bpd`` report the IWAE bound in bits per dimension (:mod:`zoo.pixels`).

    A network given from Python is left out of the saved hyperparameters: reload its checkpoint with
    ``DiscreteVAE.load_from_checkpoint(path, decoder=MyDecoder())``. From a recipe (``class_path`` /
    ``init_args``) the checkpoint reloads with no arguments.

    Example:
        >>> model = DiscreteVAE(shape=(6,), n_latents=2, n_categories=4, hidden=(16,))
        >>> x = torch.randint(0, 2, (5, 6)).float()
        >>> model.elbo(x).shape, model.log_importance_weights(x, k=10).shape, model.log_prob(x).shape
        (torch.Size([5]), torch.Size([10, 5]), torch.Size([5]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        n_latents: int = 16,
        n_categories: int = 4,
        estimator: Estimator = "gumbel",
        temperature: float = 1.0,
        temperature_min: float = 0.5,
        anneal_steps: int = 0,
        k: int = 1,
        hidden: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        eval_k: int = 100,
        seed: int = 0,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        levels: int | None = None,
    ) -> None:
        super().__init__()
        check_levels(levels, "DiscreteVAE")
        shape = tuple(int(s) for s in shape)
        _check_arguments(
            shape,
            n_latents,
            n_categories,
            estimator,
            temperature,
            temperature_min,
            anneal_steps,
            k,
            lr,
            eval_k,
        )
        self.save_hyperparameters(
            ignore=live_arguments(
                encoder=encoder, decoder=decoder, optimizer=optimizer, lr_scheduler=lr_scheduler
            )
        )
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        self.shape, self.n_latents, self.n_categories = shape, n_latents, n_categories
        self.estimator, self.k, self.lr, self.eval_k, self.seed = estimator, k, lr, eval_k, seed
        self.levels = levels
        self.temperature0, self.temperature_min, self.anneal_steps = (
            temperature,
            temperature_min,
            anneal_steps,
        )
        dim_x, dim_z, hidden = numel(shape), n_latents * n_categories, tuple(hidden)
        if encoder is None:  # the MLP ends in the logits: the state_dict of genzoo's earlier presets
            encoder, head = nn.Sequential(nn.Flatten(), mlp(dim_x, hidden, dim_z)), nn.Identity()
        else:
            inputs = [dummy_batch(shape, like=encoder)]
            features = check_role("DiscreteVAE", "encoder", encoder, inputs, ("B", "F")).shape[1]
            head = nn.Linear(features, dim_z)  # [B, F] -> [B, L * C] logits
        if decoder is None:  # nn.Unflatten has no parameters: the state_dict keys are the flat MLP's
            decoder = mlp(dim_z, hidden[::-1], dim_x).append(nn.Unflatten(1, shape))
        else:
            inputs = [dummy_batch((dim_z,), like=decoder)]
            check_role("DiscreteVAE", "decoder", decoder, inputs, ("B", *shape), hint=_DECODER_HINT)
        self.encoder, self.posterior_head, self.decoder = encoder, head, decoder
        self.baseline = MovingAverageBaseline() if estimator == "score" else None
        self.val_elbo, self.val_iwae = MeanMetric(), MeanMetric()
        self.test_elbo, self.test_iwae = MeanMetric(), MeanMetric()
        self.val_bpd, self.test_bpd = MeanMetric(), MeanMetric()

    # -- the model ------------------------------------------------------------------------------------

    def posterior_logits(self, x: Tensor) -> Tensor:
        """Logits of q(z | x), ``[B, L, C]``."""
        return upcast(self.posterior_head(self.encoder(x))).reshape(-1, self.n_latents, self.n_categories)

    def posterior(self, x: Tensor) -> Distribution:
        """q(z | x): batch shape ``[B]``, event ``[L, C]`` (one-hot)."""
        return Independent(OneHotCategorical(logits=self.posterior_logits(x)), 1)

    def prior(self, like: Tensor) -> Distribution:
        """The uniform p(z): event ``[L, C]``."""
        logits = torch.zeros(self.n_latents, self.n_categories, device=like.device, dtype=like.dtype)
        return Independent(OneHotCategorical(logits=logits), 1)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits ``[..., *shape]`` for one-hot (or relaxed) ``z [..., L, C]``."""
        flat = z.reshape(-1, self.n_latents * self.n_categories)
        return self.decoder(flat).reshape(*z.shape[:-2], *self.shape)

    def observation(self, z: Tensor) -> Distribution:
        """p(x | z) for ``z [..., L, C]``: batch shape ``[...]``, event ``shape``."""
        return Independent(Bernoulli(logits=upcast(self.decode(z)), validate_args=False), len(self.shape))

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) = Σ_d x_d l_d - softplus(l_d) (−BCE with logits), ``[...]`` for ``z [..., L, C]``; the
        decoder runs under autocast, the terms and their sum in float32 (or wider)."""
        out = upcast(self.decode(z))
        with full_precision(out):
            log_p = -binary_cross_entropy_with_logits(out, x.expand_as(out).to(out.dtype), reduction="none")
            return log_p.flatten(-len(self.shape)).sum(-1)

    def kl(self, logits: Tensor) -> Tensor:
        """KL(q(z | x) ‖ p(z)) = Σ_l Σ_c q_lc (log q_lc + log C) in closed form, ``[B]``."""
        q = Independent(OneHotCategorical(logits=logits), 1)
        return kl_divergence(q, self.prior(logits))

    def temperature(self, step: int | None = None) -> float:
        """τ at optimizer step ``step`` (default: the current global step)."""
        step = self.global_step if step is None else step
        if self.anneal_steps == 0:
            return self.temperature0
        progress = min(step, self.anneal_steps) / self.anneal_steps
        return self.temperature0 * (self.temperature_min / self.temperature0) ** progress

    def _discrete_log_weights(self, x: Tensor, logits: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) + log p(z) - log q(z | x) for one-hot ``z [k, B, L, C]`` -> ``[k, B]``; with a
        straight-through z the value is the discrete one and gradients pass through z."""
        log_q = (z * torch.log_softmax(logits, -1)).sum((-1, -2))
        log_prior = -self.n_latents * math.log(self.n_categories)
        return self.log_likelihood(x, z) + log_prior - log_q

    def _relaxed_log_weights(self, x: Tensor, logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
        """log p(x | z̃) + log p_τ(z̃) - log q_τ(z̃ | x), the Concrete densities evaluated on log z̃ by
        ``RelaxedOneHotCategorical(...).base_dist`` (the Jacobian of exp is common to both and cancels)."""
        log_z = relaxed_log_sample(logits, uniform, temperature)  # [k, B, L, C]
        tau = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
        q = RelaxedOneHotCategorical(tau, logits=logits).base_dist
        p = RelaxedOneHotCategorical(tau, logits=torch.zeros_like(logits)).base_dist
        log_ratio = (p.log_prob(log_z) - q.log_prob(log_z)).sum(-1)
        return self.log_likelihood(x, log_z.exp()) + log_ratio

    def _elbo(self, x: Tensor, uniform: Tensor) -> Tensor:
        """Discrete L_1: log p(x | z) averaged over the Gumbel-max draws of ``uniform [k, B, L, C]`` minus
        the closed-form KL, ``[B]``."""
        logits = self.posterior_logits(x)
        return self.log_likelihood(x, gumbel_max(logits, uniform)).mean(0) - self.kl(logits)

    # -- public API (latent-variable model, exact likelihood) ---------------------------------------------

    def _uniform(self, k: int, batch: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
        size = (k, batch, self.n_latents, self.n_categories)
        return torch.rand(size, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Single-sample estimate of the discrete ELBO per example, ``Tensor[B]`` in nats."""
        return self._elbo(x, self._uniform(1, x.shape[0], x, generator))

    def log_importance_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log p(x, z_j) - log q(z_j | x) for k one-hot z_j ~ q(z | x) (Gumbel-max): ``Tensor[k, B]``."""
        logits = self.posterior_logits(x)
        z = gumbel_max(logits, self._uniform(k, x.shape[0], x, generator))
        return self._discrete_log_weights(x, logits, z)

    def iwae_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """One-draw estimate of L_k per example, ``Tensor[B]``."""
        return log_mean_exp(self.log_importance_weights(x, k, generator), dim=0)

    def log_prob(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Exact log p(x) = logsumexp_z [log p(x | z) - L log C] over all C^L one-hot configurations,
        ``Tensor[B]``; the decoder runs on ``chunk`` configurations at a time."""
        size = self.n_categories**self.n_latents
        if size > MAX_ENUMERATION:
            raise NotImplementedError(
                f"DiscreteVAE.log_prob enumerates all n_categories ** n_latents = {self.n_categories} ** "
                f"{self.n_latents} = {size} latent configurations and allows at most 2 ** 16 = "
                f"{MAX_ENUMERATION}. Estimate log p(x) with iwae_bound(x, k) or "
                "callbacks.elbo_gap.iwae_log_likelihood instead."
            )
        flat = x.flatten(1)  # [B, D]
        configs = torch.tensor(
            list(itertools.product(range(self.n_categories), repeat=self.n_latents)), device=x.device
        )
        totals = []
        for indices in configs.split(chunk):
            logits = upcast(self.decode(one_hot(indices, self.n_categories).to(x.dtype))).flatten(1)  # [M, D]
            with full_precision(logits):  # [B, M]: Σ_d x_d l_d - softplus(l_d)
                totals.append(flat.to(logits.dtype) @ logits.T - softplus(logits).sum(-1))
        log_joint = torch.cat(totals, dim=1) - self.n_latents * math.log(self.n_categories)
        return torch.logsumexp(log_joint, dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = False) -> Tensor:
        """``n`` draws x ~ p(x | z), z ~ p(z) uniform; ``mean=True`` returns E[x | z] (nicer image grids)."""
        index = torch.randint(self.n_categories, (n, self.n_latents), generator=generator, device=self.device)
        probs = torch.sigmoid(self.decode(one_hot(index, self.n_categories).to(self.dtype)))
        return probs if mean else torch.bernoulli(probs, generator=generator)

    # -- training ---------------------------------------------------------------------------------------

    def training_loss(self, batch: Tensor) -> Tensor:
        """-L_k (relaxed for ``"gumbel"``) averaged over the batch, with this step's noise."""
        x = batch
        rank, world = shard_of(self)
        uniform = global_uniform(
            x.shape[0],
            (self.k, self.n_latents, self.n_categories),
            key=step_key(self, _TRAIN_STREAM),
            rank=rank,
            world=world,
            device=x.device,
            dtype=x.dtype,
        ).transpose(0, 1)  # [k, B, L, C]
        logits = self.posterior_logits(x)
        if self.estimator == "score":
            return self._score_loss(x, logits, uniform)
        tau = self.temperature()
        if self.estimator == "gumbel" and self.k > 1:
            return -log_mean_exp(self._relaxed_log_weights(x, logits, uniform, tau)).mean()
        soft = relaxed_log_sample(logits, uniform, tau).exp()
        z = soft if self.estimator == "gumbel" else straight_through(soft)
        if self.k == 1:
            return -(self.log_likelihood(x, z).mean(0) - self.kl(logits)).mean()
        return -log_mean_exp(self._discrete_log_weights(x, logits, z)).mean()

    def _score_loss(self, x: Tensor, logits: Tensor, uniform: Tensor) -> Tensor:
        """REINFORCE: L + (L - b) Σ_j (log q(z_j | x) - stop_grad(...)), z_j exact one-hots (no gradient)."""
        z = gumbel_max(logits.detach(), uniform)
        if self.k == 1:
            bound = self.log_likelihood(x, z)[0] - self.kl(logits)  # closed-form KL: its own φ-gradient
        else:
            bound = log_mean_exp(self._discrete_log_weights(x, logits, z))
        log_q = (z * torch.log_softmax(logits, -1)).sum((-1, -2))  # [k, B]
        surrogate = score_function_surrogate(bound, log_q.sum(0), self.baseline.value)
        batch_mean = bound.detach().mean()
        if self._trainer is not None:
            batch_mean = self.trainer.strategy.reduce(batch_mean, reduce_op="mean")
        self.baseline.update(batch_mean)
        return -(bound + surrogate).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        check_data(self, batch, "unit_interval")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx, hint=_NAN_HINT)
        self.log("train/loss", loss, prog_bar=True)
        if self.estimator != "score":
            self.log("train/temperature", self.temperature())
        return loss

    def _evaluate(self, x: Tensor, batch_idx: int, split: Literal["val", "test"]) -> None:
        """Update and log ``<split>/elbo``, ``<split>/iwae`` (and ``<split>/bpd`` on binary data) with noise
        keyed by ``(seed, batch_idx)`` and global position, so W processes give the one-process value."""
        rank, world = shard_of(self)
        shared = dict(rank=rank, world=world, device=x.device, dtype=x.dtype)
        event = (self.n_latents, self.n_categories)
        u1 = positional_uniform(
            x.shape[0], (1, *event), key=mix_key(self.seed, _ELBO_STREAM, batch_idx), **shared
        )
        uk = positional_uniform(
            x.shape[0], (self.eval_k, *event), key=mix_key(self.seed, _IWAE_STREAM, batch_idx), **shared
        )
        elbo, iwae, bpd = (getattr(self, f"{split}_{name}") for name in ("elbo", "iwae", "bpd"))
        logits = self.posterior_logits(x)
        elbo.update(self.log_likelihood(x, gumbel_max(logits, u1.transpose(0, 1)))[0] - self.kl(logits))
        z = gumbel_max(logits, uk.transpose(0, 1))
        log_p = log_mean_exp(self._discrete_log_weights(x, logits, z))
        iwae.update(log_p)
        self.log(f"{split}/elbo", elbo, prog_bar=split == "val")
        self.log(f"{split}/iwae", iwae)
        if self.levels == 2:
            bpd.update(bits_per_dim(log_p, numel(self.shape)))
            self.log(f"{split}/bpd", bpd)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def configure_optimizers(self):
        return configure_single(self, adam(self.lr))


_DECODER_HINT = (
    "Return Bernoulli logits shaped like the data, one per example (e.g. end with nn.Unflatten(1, shape)). "
)
_NAN_HINT = "Look for non-finite data, a too large learning rate (lower lr) or a too small temperature_min."


def _check_arguments(
    shape, n_latents, n_categories, estimator, temperature, temperature_min, anneal_steps, k, lr, eval_k
) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}; got {estimator!r}")
    for name, value in (("n_latents", n_latents), ("k", k), ("eval_k", eval_k)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")
    if n_categories < 2:
        raise ValueError(f"n_categories must be at least 2; got {n_categories}")
    if not 0 < temperature_min <= temperature:
        raise ValueError(
            f"need 0 < temperature_min <= temperature; got temperature_min={temperature_min}, "
            f"temperature={temperature}"
        )
    if anneal_steps < 0:
        raise ValueError(f"anneal_steps must be >= 0; got {anneal_steps}")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr}")
