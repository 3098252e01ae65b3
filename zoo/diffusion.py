"""Denoising diffusion probabilistic models (DDPM) with DDIM sampling and an exact-in-expectation ELBO.

Forward process (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", eqs. 2-4, 6-7), for
t = 1..T with ᾱ_t = Π_{s<=t} (1 - β_s), ᾱ_0 = 1:

.. math::
    q(x_t | x_0) = N(\\sqrt{ᾱ_t} x_0, (1 - ᾱ_t) I), \\qquad
    q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I),\\;
    μ̃_t = \\frac{\\sqrt{ᾱ_{t-1}} β_t}{1 - ᾱ_t} x_0 + \\frac{\\sqrt{α_t}(1 - ᾱ_{t-1})}{1 - ᾱ_t} x_t,\\;
    β̃_t = \\frac{1 - ᾱ_{t-1}}{1 - ᾱ_t} β_t.

Reverse model p(x_T) = N(0, I), p(x_{t-1} | x_t) = N(μ_θ(x_t, t), σ_t² I) with μ_θ = μ̃_t(x̂_0(x_t, t), x_t),
where the network predicts ε (Ho et al.), x_0, or v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022, "Progressive
Distillation"); σ_t² = β_t ("fixed_large"), β̃_t ("fixed_small") or learned as
exp(v log β_t + (1 - v) log β̃_t) (Nichol & Dhariwal 2021, "Improved DDPM", eq. 15).

Variational bound, in nats per example (Ho et al. eq. 5; Sohl-Dickstein et al. 2015):

.. math::
    \\log p(x_0) >= E_q[\\log p(x_0 | x_1)] - \\sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x_0) \\| p(x_{t-1} | x_t))
                   - KL(q(x_T | x_0) \\| p(x_T)).

The decoder p(x_0 | x_1) is N(μ_θ(x_1, 1), σ_1² I) for continuous data and the discretised Gaussian of
Ho et al. (sec. 3.3) for images with ``levels`` grey levels (then the bound is on the probability mass of
the 8-bit image, comparable to published bits/dim). Each KL is in closed form; the expectation over x_t is
one draw per term. All T terms are summed by default (chunked); ``elbo_timesteps=K`` replaces the sum over
t = 2..T by a stratified estimate (one t per stratum, weighted by the stratum's size): unbiased, K calls.

Losses (t ~ U{1..T}): ``simple`` is Ho et al.'s ||target - net(x_t, t)||² averaged over dimensions (target
ε, x_0 or v); ``vlb`` is T·L_{t-1} + L_T, an unbiased estimate of the negative bound in nats; ``hybrid`` is
``simple`` + ``vlb_weight`` · T · L_{t-1} / D with the mean detached in the bound term (Nichol & Dhariwal,
sec. 3.1; it trains the learned variances).

Samplers over a subsequence τ of 1..T (``sample_steps`` evenly spaced steps, the whole chain by default):
``ddpm`` is ancestral sampling with the respaced β'_i = 1 - ᾱ_{τ_i} / ᾱ_{τ_{i-1}} (Nichol & Dhariwal,
appendix B); ``ddim`` is Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 with
σ = η √((1-ᾱ_s)/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_s): η = 0 is deterministic, η = 1 is the DDPM chain with σ² = β̃.

Schedules: ``linear`` β from 1e-4 to 0.02 (Ho et al.) scaled by 1000/T (Nichol & Dhariwal's code) so
that other T give about the same ᾱ_T, clipped at 0.999; ``cosine`` ᾱ_t = f(t)/f(0),
f(t) = cos²(((t/T + s)/(1 + s)) π/2), s = 0.008, β clipped at 0.999 (Nichol & Dhariwal eq. 17).
Images (C, H, W) with values in [0, 1] are modelled on 2x - 1 in [-1, 1].

Every random draw (timesteps and noise) in training and evaluation goes through :mod:`zoo.noise`, keyed by
(seed, step) or (seed, batch, term), so 1 and W processes, and resumed runs, compute the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from zoo.gaussian import upcast
from zoo.guards import check_data, check_finite
from zoo.networks import check_role, dummy_batch, is_conv_image, numel
from zoo.networks.denoisers import AttentionBlock, MLPDenoiser, ResBlock, UNet, timestep_embedding
from zoo.noise import (
    global_normal,
    global_uniform,
    mix_key,
    positional_normal,
    positional_uniform,
    randn,
    shard_of,
    step_key,
)
from zoo.pixels import bits_per_dim, check_levels
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments

__all__ = [  # the denoisers live in zoo.networks.denoisers; re-exported here for code that imported them
    "AttentionBlock",
    "Diffusion",
    "MLPDenoiser",
    "ResBlock",
    "UNet",
    "beta_schedule",
    "discretized_gaussian_log_prob",
    "gaussian_log_prob",
    "normal_kl",
    "timestep_embedding",
]

Schedule = Literal["linear", "cosine"]
Parameterization = Literal["eps", "x0", "v"]
Loss = Literal["auto", "simple", "vlb", "hybrid"]
Sampler = Literal["ddpm", "ddim"]
Variance = Literal["fixed_large", "fixed_small", "learned"]
Network = Literal["auto", "mlp", "unet"]
Decoder = Literal["auto", "gaussian", "discretized"]
_TRAIN_T, _TRAIN_EPS, _ELBO_T, _ELBO_EPS, _ELBO_DEC = 0, 1, 2, 3, 4
MAX_ROWS = 1 << 15  # ELBO chunking: at most this many (term, example) rows per network call


# -- schedules ----------------------------------------------------------------------------------------------


def beta_schedule(kind: str, timesteps: int) -> Tensor:
    """β_1..β_T in float64 (see the module docstring for both schedules)."""
    if kind == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
        return betas.clamp(max=0.999)  # T < 50 would reach β >= 1 (ᾱ_T = 0)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be 'linear' or 'cosine'; got {kind!r}")


# -- Gaussian pieces ----------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1
    )


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, e^logvar) elementwise."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor, levels: int) -> Tensor:
    """log P(bin of x) under N(mean, e^logvar) for x on the grid of ``levels`` values in [-1, 1] (Ho et al.
    sec. 3.3): the bin is x ± 1/(levels - 1), the two edge bins extend to ∓∞. Exact in log space
    (``log_ndtr``), using the tail on the side of the mean where the difference of CDFs is not cancelled."""
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * logvar)
    upper = torch.where(x >= 1 - 1e-3, torch.full_like(x, math.inf), (x - mean + half) * inv_std)
    lower = torch.where(x <= -1 + 1e-3, torch.full_like(x, -math.inf), (x - mean - half) * inv_std)
    # left of the mean (upper < ... ) use log(Φ(b) - Φ(a)); right of it use log(Φ(-a) - Φ(-b))
    left = (x - mean) < 0
    b = torch.where(left, upper, -lower)
    a = torch.where(left, lower, -upper)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log(-torch.expm1((log_a - log_b).clamp(max=-1e-12)))


# -- the family ---------------------------------------------------------------------------------------------


class Diffusion(L.LightningModule):
    """DDPM / DDIM on any data with a ``shape``: an MLP denoiser for vectors, a small U-Net for images, or the
    user's own denoiser.

    Networks, optimiser and schedule are arguments. The one network role is the ``denoiser``:
    ``net(x_t [B, *shape], t [B]) -> [B, *shape]``, with ``t`` the integer (int64) timesteps 1..T and x_t in
    model space (images in [-1, 1]); it predicts ε, x_0 or v (``parameterization``). With
    ``variance="learned"`` it returns twice the channels, ``[B, 2C, H, W]`` / ``[B, 2D]``: the prediction's
    C (or D), then the variance head's C (Nichol & Dhariwal). It is checked once, here, on a dummy batch of
    two at t = (1, T).

    Args:
        shape: shape of one example, linked from the datamodule by the CLI, e.g. ``(2,)`` or ``(1, 28, 28)``.
        timesteps: T, the length of the diffusion chain.
        schedule: ``"linear"`` (Ho et al.) or ``"cosine"`` (Nichol & Dhariwal).
        parameterization: what the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        loss: ``"simple"``, ``"vlb"`` (the negative bound in nats) or ``"hybrid"`` (needs learned variances);
            ``"auto"`` (default): ``"hybrid"`` with learned variances, ``"simple"`` with fixed ones.
        variance: σ_t² of the reverse steps: ``"fixed_large"`` (β_t), ``"fixed_small"`` (β̃_t, with β̃_1
            replaced by β̃_2 as in Ho et al.'s code) or ``"learned"`` (interpolated between them; default).
        sampler: ``"ddpm"`` (ancestral) or ``"ddim"`` (default).
        sample_steps: steps of the sampler (evenly spaced over 1..T), at most T (a chain shorter than the
            default 100 is sampled at every step); ``None``: all T.
        eta: DDIM's η (0: deterministic; 1: DDPM with σ² = β̃).
        denoiser: your own denoiser (see above); ``None`` builds the ``network`` preset. When given,
            ``network``, ``hidden`` and ``attention`` are ignored.
        network: the preset denoiser: ``"auto"`` (U-Net for (C, H, H) images with H in {16, 28, 32, 64}, MLP
            otherwise), ``"mlp"`` or ``"unet"`` (images with H, W divisible by 4).
        hidden: MLP widths (all the time-conditioned layers), or U-Net channels at H, H/2 and H/4 pixels.
        attention: a self-attention block at H/4 in the U-Net.
        decoder: p(x_0 | x_1): ``"gaussian"`` (continuous data), ``"discretized"`` (images with ``levels``
            grey levels in [0, 1]); ``"auto"``: discretised for (C, H, W) data with ``levels``, Gaussian
            otherwise. ``val/bpd`` / ``test/bpd`` (the bound in bits per dimension of the discrete data,
            :mod:`zoo.pixels`) are logged with the discretised decoder.
        levels: grey levels of the data (256 for 8-bit images, the default; 17 for sklearn's Digits); the
            CLI links the datamodule's ``levels``. None: continuous data (the Gaussian decoder).
        elbo_timesteps: terms of the bound's sum over t = 2..T in ``val/elbo``, ``test/elbo`` and
            :meth:`elbo`: ``None`` all T - 1 (exact sum, one draw each), else a stratified unbiased estimate.
        vlb_weight: λ of the hybrid loss (Nichol & Dhariwal: 0.001).
        lr: learning rate of the default optimiser, Adam; ignored when ``optimizer`` is given.
        optimizer: a callable ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW, lr=3e-4)``
            or ``class_path`` / ``init_args`` in a recipe); ``None``: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler``, stepped after every optimizer step (``None``:
            a constant learning rate); see :mod:`zoo.plugins`.
        seed: seed of the training and evaluation noise (see :mod:`zoo.noise`).

    The defaults are the toy recipes' (``configs/diffusion_25gaussians.yaml``): learned variances with the
    hybrid loss reach a bound 0.5 nats from the exact log p(x) of 25 Gaussians where fixed β_t with the
    simple loss stayed 1.6 nats away, and DDIM with 100 steps puts more samples near the modes than the
    1000-step ancestral chain (``benchmarks/README.md``).

    Example:
        >>> model = Diffusion(shape=(2,), timesteps=50, hidden=(32, 32))
        >>> x = torch.randn(5, 2)
        >>> model.elbo(x).shape, model.log_importance_weights(x, k=3).shape, model.sample(4).shape
        (torch.Size([5]), torch.Size([3, 5]), torch.Size([4, 2]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        timesteps: int = 1000,
        schedule: Schedule = "linear",
        parameterization: Parameterization = "eps",
        loss: Loss = "auto",
        variance: Variance = "learned",
        sampler: Sampler = "ddim",
        sample_steps: int | None = 100,
        eta: float = 0.0,
        denoiser: nn.Module | None = None,
        network: Network = "auto",
        hidden: Sequence[int] = (128, 128, 128),
        attention: bool = False,
        decoder: Decoder = "auto",
        levels: int | None = 256,
        elbo_timesteps: int | None = None,
        vlb_weight: float = 0.001,
        lr: float = 1e-3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        hidden = tuple(int(h) for h in hidden)
        network = ("unet" if is_conv_image(shape) else "mlp") if network == "auto" else network
        if decoder == "auto":
            decoder = "discretized" if len(shape) == 3 and levels is not None else "gaussian"
        loss = ("hybrid" if variance == "learned" else "simple") if loss == "auto" else loss
        _check_arguments(
            shape, timesteps, schedule, parameterization, loss, variance, sampler, sample_steps, eta,
            network if denoiser is None else None, hidden, decoder, levels, elbo_timesteps, vlb_weight, lr,
        )  # fmt: skip
        self.save_hyperparameters(
            ignore=live_arguments(denoiser=denoiser, optimizer=optimizer, lr_scheduler=lr_scheduler)
        )
        self.shape, self.timesteps, self.parameterization, self.loss_kind = (
            shape,
            timesteps,
            parameterization,
            loss,
        )
        sample_steps = None if sample_steps is None else min(sample_steps, timesteps)
        self.variance, self.sampler, self.sample_steps, self.eta = variance, sampler, sample_steps, eta
        self.decoder_kind, self.levels, self.elbo_timesteps = decoder, levels, elbo_timesteps
        self.vlb_weight, self.lr, self.seed, self.images = vlb_weight, lr, seed, len(shape) == 3
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        out_factor = 2 if variance == "learned" else 1
        out_shape = (out_factor * shape[0], *shape[1:])  # learned variances: the variance head's channels
        if denoiser is not None:
            t = torch.tensor([1, timesteps])  # int64, as in training, evaluation and sampling
            learned = variance == "learned"
            twice = ", twice the channels (the prediction's, then the variance head's)" if learned else ""
            hint = f"t is int64 in 1..T={timesteps}; it returns its {parameterization} prediction{twice}. "
            if learned:
                hint += "Without a variance head, pass variance='fixed_large' or 'fixed_small'. "
            inputs = [dummy_batch(shape, like=denoiser), t]
            check_role("Diffusion", "denoiser", denoiser, inputs, ("B", *out_shape), hint=hint)
            self.net = denoiser
        else:
            t_scale = 1000.0 / timesteps  # the embedding sees t on a 0..1000 scale for any T
            if network == "unet":
                self.net = UNet(shape[0], hidden, out_shape[0], t_scale, attention)
            else:
                self.net = MLPDenoiser(numel(shape), hidden, numel(out_shape), t_scale, out_shape)
        # The schedule is a pure function of the hyperparameters: plain float64 tensors, not buffers (so
        # `.float()` / `.half()` never round them and the state_dict holds only what is learned).
        betas = beta_schedule(schedule, timesteps)
        self._betas = betas
        self._alpha_bar = torch.cat(
            [torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]
        )  # [T+1]
        self.val_elbo, self.test_elbo = MeanMetric(), MeanMetric()
        self.val_bpd, self.test_bpd = MeanMetric(), MeanMetric()

    @property
    def denoiser(self) -> nn.Module:
        """The denoiser (the ``denoiser`` argument or the preset), registered as ``net``: the name its weights
        carry in checkpoints, so those from before the role existed load unchanged."""
        return self.net

    def __setattr__(self, name: str, value) -> None:
        # ``model.denoiser = module`` replaces ``net`` (nn.Module would register a second, unused module)
        super().__setattr__("net" if name == "denoiser" else name, value)

    # -- schedule lookups ---------------------------------------------------------------------------------

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t for integer ``t`` in 0..T (float64, on ``t``'s device)."""
        return self._alpha_bar.to(t.device)[t]

    def _respaced(self, t: Tensor, s: Tensor) -> dict[str, Tensor]:
        """float64 coefficients of one step t -> s < t of the (respaced) chain: β' = 1 - ᾱ_t/ᾱ_s, β̃', the
        posterior-mean coefficients, and log σ² bounds (s = t - 1 gives the original chain)."""
        ab_t, ab_s = self.alpha_bar(t), self.alpha_bar(s)
        beta = 1 - ab_t / ab_s
        beta_tilde = beta * (1 - ab_s) / (1 - ab_t)
        # β̃ at the first step is 0: Ho et al. clip its log to the next step's value
        # (the next step of the same chain; β itself when there is none, as with a one-step sampler)
        t2 = t + (t - s)
        ab_t2 = self.alpha_bar(torch.clamp(t2, max=self.timesteps))
        beta2 = 1 - ab_t2 / ab_t
        next_tilde = torch.where(t2 <= self.timesteps, beta2 * (1 - ab_t) / (1 - ab_t2), beta)
        beta_tilde_clipped = torch.where(s == 0, next_tilde, beta_tilde)
        return {
            "ab_t": ab_t,
            "ab_s": ab_s,
            "coef_x0": ab_s.sqrt() * beta / (1 - ab_t),
            "coef_xt": (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t),
            "beta_tilde": beta_tilde,
            "log_large": beta.log(),
            "log_small": beta_tilde_clipped.log(),
        }

    @staticmethod
    def _bcast(value: Tensor, like: Tensor) -> Tensor:
        """``[B]`` float64 coefficient -> ``like``'s dtype, broadcastable against ``like [B, ...]``."""
        return value.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    # -- the model ----------------------------------------------------------------------------------------

    def to_model_space(self, x: Tensor) -> Tensor:
        """Data -> the space the chain runs in (images [0, 1] -> [-1, 1])."""
        return 2 * x - 1 if self.images else x

    def to_data_space(self, x: Tensor) -> Tensor:
        return (x + 1) / 2 if self.images else x

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, a draw of q(x_t | x_0) (model space)."""
        ab = self.alpha_bar(t)
        return self._bcast(ab.sqrt(), x0) * x0 + self._bcast((1 - ab).sqrt(), x0) * eps

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) for t in 1..T (variance ``[B]``, 0 at t = 1)."""
        c = self._respaced(t, t - 1)
        return self._bcast(c["coef_x0"], x0) * x0 + self._bcast(c["coef_xt"], xt) * xt, c["beta_tilde"]

    def predict(
        self, xt: Tensor, t: Tensor, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x̂_0, ε̂, v) from the network at ``t [B]`` (or from its output ``out``); v in [-1, 1] is the
        variance interpolation (learned variance) or ``None``. For images x̂_0 is clipped to [-1, 1] and ε̂
        recomputed from it (Ho et al.)."""
        if out is None:
            out = upcast(
                self.net(xt, t)
            )  # the network may run in a half type under autocast; the rest in fp32
        v = None
        if self.variance == "learned":
            out = out.reshape(xt.shape[0], 2, *self.shape)
            out, v = out[:, 0], torch.tanh(out[:, 1])
        out = out.reshape(xt.shape)
        ab = self.alpha_bar(t)
        sa, s1 = self._bcast(ab.sqrt(), xt), self._bcast((1 - ab).sqrt(), xt)
        if self.parameterization == "eps":
            x0 = (xt - s1 * out) / sa
        elif self.parameterization == "x0":
            x0 = out
        else:  # v = √ᾱ ε - √(1-ᾱ) x0  =>  x0 = √ᾱ x_t - √(1-ᾱ) v
            x0 = sa * xt - s1 * out
        if self.images:
            x0 = x0.clamp(-1, 1)
        eps = (xt - sa * x0) / s1
        return x0, eps, v

    def _reverse(
        self, xt: Tensor, t: Tensor, s: Tensor, detach_mean: bool = False, out: Tensor | None = None
    ):
        """p(x_s | x_t) of the (respaced) chain: mean, log-variance (broadcastable), and (x̂_0, ε̂)."""
        x0, eps, v = self.predict(xt, t, out)
        if detach_mean:
            x0, eps = x0.detach(), eps.detach()
        c = self._respaced(t, s)
        mean = self._bcast(c["coef_x0"], xt) * x0 + self._bcast(c["coef_xt"], xt) * xt
        large, small = self._bcast(c["log_large"], xt), self._bcast(c["log_small"], xt)
        if self.variance == "fixed_large":
            logvar = large
        elif self.variance == "fixed_small":
            logvar = small
        else:
            frac = (v + 1) / 2
            logvar = frac * large + (1 - frac) * small
        return mean, logvar, x0, eps

    # -- the bound ----------------------------------------------------------------------------------------

    def decoder_log_prob(self, x0: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
        """log p(x_0 | x_1) summed over dimensions, ``[B]`` (model space; discretised for images)."""
        logvar = logvar.expand_as(x0)
        if self.decoder_kind == "discretized":
            log_p = discretized_gaussian_log_prob(x0, mean, logvar, self.levels)
        else:
            log_p = gaussian_log_prob(x0, mean, logvar)
        return log_p.flatten(1).sum(1)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in closed form, ``[B]``."""
        ab = self.alpha_bar(torch.full((x0.shape[0],), self.timesteps, device=x0.device))
        mean = self._bcast(ab.sqrt(), x0) * x0
        logvar = self._bcast((1 - ab).log(), x0).expand_as(x0)
        return normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)

    def vlb_terms(
        self, x0: Tensor, t: Tensor, eps: Tensor, detach_mean: bool = False, out: Tensor | None = None
    ) -> Tensor:
        """L_{t-1} per example (model space ``x0``), ``[B]``: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t >= 2, -log p(x_0 | x_1) for t = 1, with x_t = q_sample(x_0, t, ε) (``out``: the network's output
        at x_t when the caller has it)."""
        xt = self.q_sample(x0, t, eps)
        mean, logvar, _, _ = self._reverse(xt, t, t - 1, detach_mean, out)
        true_mean, true_var = self.q_posterior(x0, xt, t)
        true_logvar = self._bcast(torch.where(t > 1, true_var, torch.ones_like(true_var)).log(), x0)
        kl = normal_kl(true_mean, true_logvar.expand_as(x0), mean, logvar.expand_as(x0)).flatten(1).sum(1)
        return torch.where(t > 1, kl, -self.decoder_log_prob(x0, mean, logvar))

    def _elbo(
        self,
        x: Tensor,
        terms: Tensor,
        weights: Tensor,
        noise: Callable[[int, Tensor], Tensor],
        chunk_rows: int = MAX_ROWS,
    ) -> Tensor:
        """-Σ_j w_j L_{t_j - 1} - L_T per example for timesteps ``terms [K, B]`` with weights ``weights [K]``;
        ``noise(j, x0)`` gives term j's ε ``[B, *shape]``. Chunked: at most ``chunk_rows`` rows per call."""
        x0 = self.to_model_space(x)
        batch = x0.shape[0]
        total = -self.prior_kl(x0)
        per_chunk = max(1, chunk_rows // max(batch, 1))
        for start in range(0, len(terms), per_chunk):
            idx = list(range(start, min(start + per_chunk, len(terms))))
            t = terms[idx].to(x0.device).reshape(-1)  # [c * B], term-major
            eps = torch.cat([noise(j, x0) for j in idx])
            x_rep = x0.repeat(len(idx), *([1] * (x0.dim() - 1)))
            losses = self.vlb_terms(x_rep, t, eps).reshape(len(idx), batch)
            total = total - (weights[idx].to(losses)[:, None] * losses).sum(0)
        return total

    def _terms(self, batch: int, draw: Callable[[int], Tensor], count: int | None) -> tuple[Tensor, Tensor]:
        """Timesteps ``[K, B]`` and weights ``[K]`` of the bound: t = 1 (decoder, weight 1), then all of 2..T
        (``count=None``), or for each example one uniform draw from each of ``count``
        near-equal strata of 2..T, weighted by the stratum's size. ``draw(K)`` returns uniforms ``[B, K]``."""
        if count is None:
            t = torch.arange(1, self.timesteps + 1)[:, None].expand(self.timesteps, batch)
            return t, torch.ones(self.timesteps, dtype=torch.float64)
        if not 1 <= count <= self.timesteps - 1:
            raise ValueError(
                f"the bound's terms must number 1..T-1={self.timesteps - 1} (None: all); got {count}"
            )
        k, n = count, self.timesteps - 1
        edges = torch.div(torch.arange(k + 1) * n, k, rounding_mode="floor")  # strata [e_i, e_i+1) of 0..n-1
        sizes = edges[1:] - edges[:-1]
        offset = torch.minimum((draw(k).cpu().T * sizes[:, None]).floor().long(), sizes[:, None] - 1)
        t = 2 + edges[:-1, None] + offset  # [K, B]
        first = torch.ones(1, batch, dtype=torch.long)
        return torch.cat([first, t]), torch.cat([torch.ones(1, dtype=torch.float64), sizes.double()])

    # -- public API (the latent-variable-model capability) -----------------------------------------------

    def elbo(self, x: Tensor, generator: torch.Generator | None = None, timesteps: int | None = -1) -> Tensor:
        """The variational bound per example, ``Tensor[B]`` in nats (probability mass for discretised images).

        ``timesteps``: terms of the sum over 2..T (``-1``: the module's ``elbo_timesteps``; ``None``: all)."""
        device = generator.device if generator is not None else None
        terms, weights = self._terms(
            x.shape[0],
            lambda k: torch.rand(x.shape[0], k, generator=generator, dtype=torch.float64, device=device),
            self.elbo_timesteps if timesteps == -1 else timesteps,
        )
        return self._elbo(x, terms, weights, lambda j, x0: randn(x0.shape, generator, x0.device, x0.dtype))

    def log_importance_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log p(x_0, x_{1:T}) - log q(x_{1:T} | x_0) for k forward-chain trajectories, ``Tensor[k, B]``.

        Its mean over trajectories is the ELBO; log-mean-exp over k is the IWAE bound (Burda et al.)."""
        x0 = self.to_model_space(x).unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        log_w = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        prev = x0
        for step in range(1, self.timesteps + 1):
            t = torch.full((x0.shape[0],), step, device=x0.device)
            beta = self._bcast(self._betas.to(x0.device)[t - 1], x0)
            xt = (1 - beta).sqrt() * prev + beta.sqrt() * randn(x0.shape, generator, x0.device, x0.dtype)
            log_w = log_w - gaussian_log_prob(xt, (1 - beta).sqrt() * prev, beta.log()).flatten(1).sum(1)
            mean, logvar, _, _ = self._reverse(xt, t, t - 1)
            if step == 1:
                log_w = log_w + self.decoder_log_prob(x0, mean, logvar)
            else:
                log_w = log_w + gaussian_log_prob(prev, mean, logvar.expand_as(prev)).flatten(1).sum(1)
            prev = xt
        zero = torch.zeros_like(prev)
        log_w = log_w + gaussian_log_prob(prev, zero, zero).flatten(1).sum(1)
        return log_w.reshape(k, x.shape[0])

    def sample_timesteps(self, steps: int | None = None) -> list[int]:
        """The sampler's τ: ``steps`` evenly spaced timesteps from 1 to T (all T when ``None``)."""
        steps = self.timesteps if steps is None else steps
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..timesteps={self.timesteps}; got {steps}")
        return sorted(
            {round(v) for v in torch.linspace(1, self.timesteps, steps, dtype=torch.float64).tolist()}
        )

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        mean: bool = False,
        sampler: Sampler | None = None,
        eta: float | None = None,
    ) -> Tensor:
        """``n`` draws of the reverse chain in data space, ``[n, *shape]`` (images in [0, 1]).

        ``steps``/``sampler``/``eta`` default to the module's. The last step returns p(x_0 | x_1)'s mean for
        images or with ``mean=True``, else (continuous data) a draw of the Gaussian decoder."""
        sampler = self.sampler if sampler is None else sampler
        eta = self.eta if eta is None else eta
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim'; got {sampler!r}")
        taus = self.sample_timesteps(self.sample_steps if steps is None else steps)
        dtype, device = self.dtype, self.device
        x = randn((n, *self.shape), generator, device, dtype)
        for i in range(len(taus) - 1, -1, -1):
            t = torch.full((n,), taus[i], device=device)
            s = torch.full((n,), taus[i - 1] if i > 0 else 0, device=device)
            z = randn(x.shape, generator, device, dtype) if i > 0 else None
            if sampler == "ddpm":
                mu, logvar, _, _ = self._reverse(x, t, s)
                if i > 0:
                    x = mu + torch.exp(0.5 * logvar) * z
                else:
                    x = mu
                    if not (mean or self.images):
                        x = x + torch.exp(0.5 * logvar) * randn(x.shape, generator, device, dtype)
            else:
                x0, eps, _ = self.predict(x, t)
                ab_t, ab_s = self.alpha_bar(t), self.alpha_bar(s)
                sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).sqrt()
                direction = (1 - ab_s - sigma**2).clamp(min=0).sqrt()
                x = self._bcast(ab_s.sqrt(), x) * x0 + self._bcast(direction, x) * eps
                if i > 0:
                    x = x + self._bcast(sigma, x) * z
        return self.to_data_space(x)

    # -- training ---------------------------------------------------------------------------------------

    def _train_draws(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """This step's t ~ U{1..T} (t = 1 + floor(T U), U from :func:`zoo.noise.global_uniform`) and ε for
        this rank's rows of the global batch: DDP-exact and resumable (keyed by the global step)."""
        rank, world = shard_of(self)
        shared = dict(rank=rank, world=world, device=x0.device)
        u = global_uniform(x0.shape[0], (), key=step_key(self, _TRAIN_T), **shared)
        t = 1 + torch.clamp((self.timesteps * u.double()).floor().long(), 0, self.timesteps - 1)
        key = step_key(self, _TRAIN_EPS)
        return t, global_normal(x0.shape[0], self.shape, key=key, dtype=x0.dtype, **shared)

    def loss_terms(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Per-example training loss for model-space ``x0`` at ``t`` with noise ``eps``, ``[B]``."""
        if self.loss_kind == "vlb":
            return self.timesteps * self.vlb_terms(x0, t, eps) + self.prior_kl(x0)
        xt = self.q_sample(x0, t, eps)
        raw = upcast(self.net(xt, t))
        out = raw.reshape(xt.shape[0], 2, *self.shape)[:, 0] if self.variance == "learned" else raw
        out = out.reshape(xt.shape)
        if self.parameterization == "eps":
            target = eps
        elif self.parameterization == "x0":
            target = x0
        else:
            ab = self.alpha_bar(t)
            target = self._bcast(ab.sqrt(), x0) * eps - self._bcast((1 - ab).sqrt(), x0) * x0
        loss = ((out - target) ** 2).flatten(1).mean(1)
        if self.loss_kind == "hybrid":
            vlb = self.vlb_terms(x0, t, eps, detach_mean=True, out=raw)
            loss = loss + self.vlb_weight * self.timesteps * vlb / numel(self.shape)
        return loss

    def training_loss(self, batch: Tensor) -> Tensor:
        """The batch mean of the chosen loss with this step's t and ε (the single-objective capability)."""
        x0 = self.to_model_space(batch)
        t, eps = self._train_draws(x0)
        return self.loss_terms(x0, t, eps).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self.decoder_kind == "discretized":
            check_data(self, batch, "unit_interval", option="--model.decoder=discretized",
                       fix="--model.decoder=gaussian")  # fmt: skip
        else:
            check_data(self, batch, "real")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(
        self, x: Tensor, batch_idx: int, metrics: tuple[MeanMetric, MeanMetric], prefix: str
    ) -> None:
        rank, world = shard_of(self)
        shared = dict(rank=rank, world=world, device=x.device)

        def draw(k: int) -> Tensor:  # one uniform per stratum and example, keyed by global position
            key = mix_key(self.seed, _ELBO_T, batch_idx)
            return positional_uniform(x.shape[0], (k,), key=key, dtype=torch.float64, **shared)

        terms, weights = self._terms(x.shape[0], draw, self.elbo_timesteps)

        def noise(j: int, x0: Tensor) -> Tensor:  # term j's ε, keyed by global position
            key = mix_key(self.seed, _ELBO_EPS, batch_idx, j)
            return positional_normal(x0.shape[0], self.shape, key=key, dtype=x0.dtype, **shared)

        elbo = self._elbo(x, terms, weights, noise)
        metrics[0].update(elbo)
        self.log(f"{prefix}/elbo", metrics[0], prog_bar=prefix == "val")
        if self.decoder_kind == "discretized":  # the bound on log P(8-bit image), in bits per dimension
            metrics[1].update(bits_per_dim(elbo, numel(self.shape)))
            self.log(f"{prefix}/bpd", metrics[1])

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, (self.val_elbo, self.val_bpd), "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, (self.test_elbo, self.test_bpd), "test")

    def configure_optimizers(self):
        """``optimizer`` (default: Adam at ``lr``) over the denoiser; ``lr_scheduler`` steps every step."""
        return configure_single(self, adam(self.lr))


def _check_arguments(
    shape, timesteps, schedule, parameterization, loss, variance, sampler, sample_steps, eta, network, hidden,
    decoder, levels, elbo_timesteps, vlb_weight, lr,
) -> None:  # fmt: skip
    choices = {
        "schedule": (schedule, ("linear", "cosine")),
        "parameterization": (parameterization, ("eps", "x0", "v")),
        "loss": (loss, ("simple", "vlb", "hybrid")),
        "variance": (variance, ("fixed_large", "fixed_small", "learned")),
        "sampler": (sampler, ("ddpm", "ddim")),
        "decoder": (decoder, ("gaussian", "discretized")),
    }
    if network is not None:  # None: the user's denoiser replaces the preset
        choices["network"] = (network, ("mlp", "unet"))
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(
                f"{name} must be one of {', '.join(map(repr, allowed))} (or 'auto'); got {value!r}"
            )
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if timesteps < 2:
        raise ValueError(f"timesteps must be an integer >= 2; got {timesteps}")
    if sample_steps is not None and not sample_steps >= 1:
        raise ValueError(
            f"sample_steps must be >= 1 (at most T are used; null for all T); got {sample_steps}"
        )
    if elbo_timesteps is not None and not 1 <= elbo_timesteps <= timesteps - 1:
        raise ValueError(
            f"elbo_timesteps must be in 1..timesteps-1={timesteps - 1} (or null for the exact sum); "
            f"got {elbo_timesteps}"
        )
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like); got {eta}")
    if network is not None and (not hidden or any(h < 1 for h in hidden)):
        raise ValueError(f"hidden must be a non-empty list of positive widths; got {list(hidden)}")
    if network == "unet":
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
            raise ValueError(
                f"network='unet' needs images (C, H, W) with H, W divisible by 4; got shape={shape}"
            )
        if any(h % 8 for h in hidden):
            raise ValueError(
                f"network='unet' needs channel counts divisible by 8 (GroupNorm); got {list(hidden)}"
            )
    check_levels(levels, "Diffusion")
    if decoder == "discretized" and levels is None:
        raise ValueError("decoder='discretized' needs the data's levels (256 for 8-bit images); got None")
    if loss == "hybrid" and variance != "learned":
        raise ValueError(
            "loss='hybrid' trains the learned variances (the mean is detached in its bound term); "
            f"use variance='learned' with it, or loss='simple' / 'vlb' with variance={variance!r}"
        )
    if not vlb_weight >= 0:
        raise ValueError(f"vlb_weight must be >= 0; got {vlb_weight}")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr}")
