"""Variational and importance-weighted auto-encoders (one class: the IWAE is the VAE with ``k > 1``).

Model: p(z) = N(0, I), p(x | z) a Bernoulli or Gaussian decoder, q(z | x) a diagonal or full-covariance
Gaussian encoder. Importance weights w_j = p(x, z_j) / q(z_j | x), z_j ~ q(z | x).

* ELBO (seed 001, "VAE loss"): L_1(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)), the KL in closed form
  through ``torch.distributions`` (seed 004 for full covariance).
* Importance-weighted bound (seed 003; Burda, Grosse & Salakhutdinov, 2016):
  L_k(x) = E[log (1/k) Σ_j w_j], with L_1 <= L_k <= L_{k+1} <= log p(x).
* Gradients: ``estimator="reparam"`` differentiates through z = μ + L ε; ``"score"`` uses REINFORCE with
  a moving-average baseline (seed 001), for comparison or for decoders that cannot be differentiated in z.
* Discrete data (``levels``, linked from the datamodule: 256 for 8-bit images, 2 for binary data): the
  Gaussian likelihood is trained and evaluated on uniformly dequantised data, and ``val/bpd`` / ``test/bpd``
  report the IWAE bound of the discrete data in bits per dimension (:mod:`zoo.pixels`); the Bernoulli
  likelihood reports them on binary data (``levels=2``), where it is a distribution over the levels.
* Linear-Gaussian model (``decoder="linear"``, ``likelihood="gaussian"``): p(x | z) = N(W z + b, diag s²)
  has the exact marginal p(x) = N(b, W Wᵀ + diag s²), offered as :meth:`VAE.log_prob` so every bound can be
  checked against the truth.

Networks are arguments (``encoder``: ``[B, *shape] -> [B, F]`` features, mapped to q's parameters by the
family's :class:`~zoo.gaussian.GaussianHead`; ``decoder``: ``[B, latent_dim] -> [B, *shape]``), checked once
on a dummy batch when the model is built; the string presets build today's networks. Optimiser and schedule
are arguments too (:mod:`zoo.plugins`).

All values are in nats per example.
"""

from __future__ import annotations

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
    MultivariateNormal,
    Normal,
)
from torch.nn.functional import binary_cross_entropy_with_logits
from torchmetrics import MeanMetric

from zoo.gaussian import Gaussian, GaussianHead, check_covariance, full_precision, standard_normal, upcast
from zoo.gradients import MovingAverageBaseline, score_function_surrogate
from zoo.guards import check_data, check_finite
from zoo.networks import check_conv_image, check_role, conv_decoder, conv_encoder, dummy_batch, mlp, numel
from zoo.noise import global_normal, mix_key, positional_normal, randn, shard_of, step_key
from zoo.pixels import (
    bits_per_dim,
    check_levels,
    check_logit_alpha,
    dequantize_eval,
    dequantize_train,
    from_logit,
    to_logit,
)
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments

Architecture = Literal["mlp", "conv", "linear"]
_TRAIN_STREAM, _ELBO_STREAM, _IWAE_STREAM, _DEQUANTIZE_STREAM = 0, 1, 2, 3


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/k) Σ_j exp(log_w_j) along ``dim``, stable for any magnitude (RELIABILITY.md #24); float32 or
    wider also under autocast."""
    with full_precision(log_w):
        return torch.logsumexp(upcast(log_w), dim=dim) - math.log(log_w.shape[dim])


class LinearDecoder(nn.Linear):
    """x = W z + b, returned as ``[B, *shape]``: the linear-Gaussian model's decoder (``decoder="linear"``).
    ``weight`` [D, d] and ``bias`` [D] are ``nn.Linear``'s (same initialisation, same state_dict keys), which
    :meth:`VAE.log_prob` reads."""

    def __init__(self, latent_dim: int, shape: Sequence[int]) -> None:
        super().__init__(latent_dim, numel(shape))
        self.shape = tuple(shape)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(z).unflatten(-1, self.shape)  # [B, D] -> [B, *shape]


class VAE(L.LightningModule):
    """VAE / IWAE on any data with a ``shape``.

    Args:
        shape: shape of one example, linked from the datamodule by the CLI, e.g. ``(1, 8, 8)``.
        latent_dim: dimension of z.
        decoder: the decoder network, ``[B, latent_dim] -> [B, *shape]`` (Bernoulli logits or Gaussian
            means), or the name of a preset: ``"mlp"``; ``"conv"`` (DCGAN-style, for (C, H, H) images, H in
            {16, 28, 32, 64}); ``"linear"`` (x = W z + b, the linear-Gaussian model with
            ``likelihood="gaussian"``, whose :meth:`log_prob` is exact).
        encoder: the encoder network, ``[B, *shape] -> [B, F]`` features (any F, read from a dry run; a
            linear :class:`~zoo.gaussian.GaussianHead` maps them to q's parameters, so both posteriors work).
            None: the preset named by ``decoder`` (``"mlp"`` when ``decoder`` is a network).
        likelihood: ``"bernoulli"`` (data in [0, 1], logits decoder) or ``"gaussian"`` (learned
            per-dimension scale).
        posterior: ``"diagonal"`` or ``"full"`` covariance (Cholesky factor) for q(z | x).
        k: importance samples per example in training; ``k > 1`` trains the IWAE bound L_k.
        estimator: ``"reparam"`` or ``"score"`` (REINFORCE with a moving-average baseline).
        hidden: widths of the presets' hidden layers (ignored for a role given as a network).
        lr: learning rate of the default optimiser, Adam (ignored when ``optimizer`` is given).
        eval_k: importance samples for the ``val/iwae`` and ``test/iwae`` likelihood estimate.
        seed: seed of the training and evaluation noise (see :mod:`zoo.noise`).
        optimizer: a callable ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW,
            lr=3e-4)``, or ``class_path`` / ``init_args`` in a recipe); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler``, stepped after every optimizer step; None: a
            constant learning rate.
        levels: levels of discrete data (256 for 8-bit images, 2 for binary data; the CLI links the
            datamodule's ``levels``), None for continuous data. With the Gaussian likelihood the data are
            dequantised (:func:`zoo.pixels.dequantize`) in :meth:`training_loss` and in evaluation, and
            ``val/bpd`` / ``test/bpd`` report bits per dimension of the discrete data; with the Bernoulli
            likelihood they are reported for ``levels=2``.
        logit_alpha: with ``levels`` and the Gaussian likelihood, the Gaussian is over the pixels in
            RealNVP's logit space (:func:`zoo.pixels.to_logit`, α = 0.05), its log-determinant included, so
            every bound is still one of the pixels' density; None: a Gaussian on the pixels themselves.

    A network given from Python is left out of the saved hyperparameters: reload its checkpoint with
    ``VAE.load_from_checkpoint(path, encoder=MyEncoder())``. From a recipe (``class_path`` / ``init_args``)
    the checkpoint reloads with no arguments.

    Example:
        >>> model = VAE(shape=(2,), latent_dim=2, decoder="linear", likelihood="gaussian")
        >>> x = torch.randn(5, 2)
        >>> model.elbo(x).shape, model.log_importance_weights(x, k=10).shape
        (torch.Size([5]), torch.Size([10, 5]))
        >>> mine = VAE(shape=(2,), latent_dim=2, encoder=nn.Sequential(nn.Linear(2, 8), nn.Tanh()))
        >>> mine.elbo(x).shape
        torch.Size([5])
    """

    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int = 16,
        decoder: Architecture | nn.Module = "mlp",
        likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
        posterior: Literal["diagonal", "full"] = "diagonal",
        k: int = 1,
        estimator: Literal["reparam", "score"] = "reparam",
        hidden: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        eval_k: int = 100,
        seed: int = 0,
        encoder: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        levels: int | None = None,
        logit_alpha: float | None = 0.05,
    ) -> None:
        super().__init__()
        check_levels(levels, "VAE")
        check_logit_alpha(logit_alpha, "VAE")
        shape = tuple(int(s) for s in shape)
        user_decoder = decoder if isinstance(decoder, nn.Module) else None
        preset = "mlp" if user_decoder is not None else decoder  # the kind of the presets built here
        _check_arguments(shape, latent_dim, preset, likelihood, posterior, k, estimator, lr, eval_k)
        self.save_hyperparameters(
            ignore=live_arguments(
                encoder=encoder, decoder=user_decoder, optimizer=optimizer, lr_scheduler=lr_scheduler
            )
        )
        self.shape, self.latent_dim, self.k, self.estimator = shape, latent_dim, k, estimator
        self.likelihood, self.posterior_kind = likelihood, posterior
        self.decoder_kind = preset if user_decoder is None else "custom"  # "linear": log_prob is exact
        self.lr, self.eval_k, self.seed, self.levels = lr, eval_k, seed, levels
        self.logit_alpha = logit_alpha if self.dequantized else None  # the Gaussian over logit-space pixels
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        hidden = tuple(hidden)

        if encoder is None:
            encoder, features = _preset_encoder(preset, shape, hidden)
        else:
            inputs = [dummy_batch(shape, like=encoder)]
            features = check_role("VAE", "encoder", encoder, inputs, ("B", "F")).shape[1]
        if user_decoder is None:
            decoder = _preset_decoder(preset, latent_dim, shape, hidden)
        else:
            inputs = [dummy_batch((latent_dim,), like=decoder)]
            check_role("VAE", "decoder", decoder, inputs, ("B", *shape), hint=_DECODER_HINT)
        self.encoder, self.decoder = encoder, decoder
        self.posterior_head = GaussianHead(features, latent_dim, posterior)
        if likelihood == "gaussian":
            self.log_scale = nn.Parameter(torch.zeros(numel(shape)))
        self.baseline = MovingAverageBaseline() if estimator == "score" else None
        self.val_elbo, self.val_iwae = MeanMetric(), MeanMetric()
        self.test_elbo, self.test_iwae = MeanMetric(), MeanMetric()
        self.val_bpd, self.test_bpd = MeanMetric(), MeanMetric()

    # -- the model ------------------------------------------------------------------------------------

    def posterior(self, x: Tensor) -> Distribution:
        """q(z | x) as a ``torch.distributions`` object, batch shape ``[B]``, event ``[latent_dim]``."""
        return self.posterior_head(self.encoder(x)).distribution()

    def prior(self, like: Tensor) -> Distribution:
        return standard_normal(self.latent_dim, self.posterior_kind, like)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's output for ``z [..., latent_dim]``: logits or means, ``[..., *shape]``."""
        return self.decoder(z.reshape(-1, self.latent_dim)).reshape(*z.shape[:-1], *self.shape)

    def observation(self, z: Tensor) -> Distribution:
        """p(x | z) for ``z [..., latent_dim]``: batch shape ``[...]``, event shape ``self.shape`` (with
        ``logit_alpha``: the Gaussian over the logit-space pixels, :func:`zoo.pixels.to_logit`)."""
        out, n = upcast(self.decode(z)), len(self.shape)
        if self.likelihood == "bernoulli":
            # validate_args=False: grey-level data in [0, 1] is scored by the same cross-entropy.
            return Independent(Bernoulli(logits=out, validate_args=False), n, validate_args=False)
        scale = self.log_scale.exp().reshape(self.shape)
        return Independent(Normal(out, scale, validate_args=False), n, validate_args=False)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) summed over the data dimensions, ``[...]`` for ``z [..., latent_dim]``.

        The closed form of ``observation(z).log_prob(x)`` (Bernoulli: -BCE with logits; Gaussian:
        -((x - m)/s)²/2 - log s - log(2π)/2), written out because it runs every step; the tests check the two
        agree. The decoder runs under autocast, the terms and their sum in float32 (or wider). With
        ``logit_alpha`` the Gaussian is over z = :func:`~zoo.pixels.to_logit` (x), plus log|det dz/dx|.
        """
        out = upcast(self.decode(z))
        log_det = 0.0
        if self.logit_alpha is not None:
            x, log_det = to_logit(upcast(x).flatten(1), self.levels, self.logit_alpha)
            x = x.reshape(-1, *self.shape)
        with full_precision(out):
            if self.likelihood == "bernoulli":
                log_p = -binary_cross_entropy_with_logits(
                    out, x.expand_as(out).to(out.dtype), reduction="none"
                )
            else:
                log_s = self.log_scale.reshape(self.shape)
                log_p = -0.5 * ((x - out) * torch.exp(-log_s)) ** 2 - log_s - 0.5 * math.log(2 * math.pi)
            return log_p.flatten(-len(self.shape)).sum(-1) + log_det

    def _log_weights(self, x: Tensor, eps: Tensor, q: Gaussian | None = None) -> Tensor:
        """log w_j = log p(x | z_j) + log p(z_j) - log q(z_j | x) for z_j = μ + L ε_j; ``eps [k, B, d]``.

        With ``estimator="score"`` z is detached, so gradients reach φ only through log q's parameters.
        """
        q = self.posterior_head(self.encoder(x)) if q is None else q
        z = q.rsample(eps)
        if self.estimator == "score":
            z = z.detach()
        log_px = self.log_likelihood(x, z)
        with full_precision(z):  # z, log q and the prior in float32 (z is float32 already: q.rsample)
            return log_px + self.prior(z).log_prob(z) - q.log_prob(z)  # [k, B]

    def _elbo(self, x: Tensor, eps: Tensor) -> Tensor:
        """L_1 with the KL in closed form and the reconstruction term averaged over ``eps [k, B, d]``."""
        q = self.posterior_head(self.encoder(x))
        return self.log_likelihood(x, q.rsample(eps)).mean(0) - q.kl_to_standard_normal()

    # -- public API (the latent-variable-model capability) ----------------------------------------------

    def _noise(self, k: int, batch: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return randn((k, batch, self.latent_dim), generator, device=like.device, dtype=like.dtype)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Single-sample ELBO estimate per example, ``Tensor[B]`` in nats."""
        return self._elbo(x, self._noise(1, x.shape[0], x, generator))

    def log_importance_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log p(x, z_j) - log q(z_j | x) for k fresh z_j ~ q(z | x): ``Tensor[k, B]``."""
        return self._log_weights(x, self._noise(k, x.shape[0], x, generator))

    def iwae_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """One-draw estimate of L_k per example, ``Tensor[B]``."""
        return log_mean_exp(self.log_importance_weights(x, k, generator), dim=0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, mean: bool = False) -> Tensor:
        """``n`` draws x ~ p(x | z), z ~ p(z); ``mean=True`` returns E[x | z] (nicer image grids)."""
        z = randn((n, self.latent_dim), generator, device=self.device, dtype=self.dtype)
        p = self.observation(z)
        if self.likelihood == "bernoulli":
            return p.mean if mean else torch.bernoulli(p.mean, generator=generator)
        x = p.mean
        if not mean:
            x = x + p.stddev * randn(p.mean.shape, generator, device=z.device, dtype=z.dtype)
        if self.logit_alpha is not None:  # logit space -> pixels
            x = from_logit(x.flatten(1), self.levels, self.logit_alpha)[0].reshape(x.shape)
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; b, W Wᵀ + diag s²) of the linear-Gaussian model, ``Tensor[B]``."""
        if self.decoder_kind != "linear" or self.likelihood != "gaussian":
            decoder = (
                repr(self.decoder_kind) if self.decoder_kind != "custom" else type(self.decoder).__name__
            )
            raise NotImplementedError(
                "VAE.log_prob is exact only for the preset decoder='linear' with likelihood='gaussian'; this "
                f"model has decoder={decoder}, likelihood={self.likelihood!r}. Estimate it with "
                "iwae_bound(x, k) or callbacks.elbo_gap.iwae_log_likelihood."
            )
        w, b = self.decoder.weight, self.decoder.bias  # [D, d], [D]
        x, log_det = upcast(x).flatten(1), 0.0
        if self.logit_alpha is not None:
            x, log_det = to_logit(x, self.levels, self.logit_alpha)
        with full_precision(w):
            covariance = w @ w.T + torch.diag(self.log_scale.exp() ** 2)
            return MultivariateNormal(b, covariance_matrix=covariance).log_prob(x) + log_det

    # -- training ---------------------------------------------------------------------------------------

    @property
    def dequantized(self) -> bool:
        """Whether the data are discrete and modelled by a density: dequantised in training and evaluation."""
        return self.levels is not None and self.likelihood == "gaussian"

    @property
    def reports_bits(self) -> bool:
        """Whether ``val/bpd`` is a likelihood of the discrete data: a dequantised density, or Bernoulli on
        binary data."""
        return self.dequantized or (self.levels == 2 and self.likelihood == "bernoulli")

    def training_loss(self, batch: Tensor) -> Tensor:
        """-L_k averaged over the batch, with this step's noise (the single-objective capability); discrete
        data are dequantised first (``levels`` with the Gaussian likelihood)."""
        x = dequantize_train(self, batch, self.levels, _DEQUANTIZE_STREAM) if self.dequantized else batch
        rank, world = shard_of(self)
        key = step_key(self, _TRAIN_STREAM)
        eps = global_normal(
            x.shape[0],
            (self.k, self.latent_dim),
            key=key,
            rank=rank,
            world=world,
            device=x.device,
            dtype=x.dtype,
        ).transpose(0, 1)  # [k, B, d]
        if self.estimator == "reparam":
            bound = self._elbo(x, eps) if self.k == 1 else log_mean_exp(self._log_weights(x, eps))
            return -bound.mean()
        q = self.posterior_head(self.encoder(x))
        bound = log_mean_exp(self._log_weights(x, eps, q))  # [B]; gradient to θ and through log q's φ
        log_q = q.log_prob(q.rsample(eps).detach())  # [k, B]
        surrogate = score_function_surrogate(bound, log_q.sum(0), self.baseline.value)
        batch_mean = bound.detach().mean()
        if self._trainer is not None:
            batch_mean = self.trainer.strategy.reduce(batch_mean, reduce_op="mean")
        self.baseline.update(batch_mean)
        return -(bound + surrogate).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self.likelihood == "bernoulli":
            check_data(self, batch, "unit_interval", option="--model.likelihood=bernoulli",
                       fix="--model.likelihood=gaussian for real-valued data")  # fmt: skip
        else:
            check_data(self, batch, "real")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, x: Tensor, batch_idx: int, split: Literal["val", "test"]) -> None:
        """Update and log ``<split>/elbo``, ``<split>/iwae`` (and ``<split>/bpd``) with noise keyed by
        ``(seed, batch_idx)`` and global position, so W processes give the one-process value."""
        rank, world = shard_of(self)
        shared = dict(rank=rank, world=world, device=x.device, dtype=x.dtype)
        if self.dequantized:
            x = dequantize_eval(self, x, self.levels, _DEQUANTIZE_STREAM, batch_idx)
        eps1 = positional_normal(
            x.shape[0], (1, self.latent_dim), key=mix_key(self.seed, _ELBO_STREAM, batch_idx), **shared
        )
        epsk = positional_normal(
            x.shape[0],
            (self.eval_k, self.latent_dim),
            key=mix_key(self.seed, _IWAE_STREAM, batch_idx),
            **shared,
        )
        elbo, iwae, bpd = (getattr(self, f"{split}_{name}") for name in ("elbo", "iwae", "bpd"))
        elbo.update(self._elbo(x, eps1.transpose(0, 1)))
        log_p = log_mean_exp(self._log_weights(x, epsk.transpose(0, 1)))
        iwae.update(log_p)
        self.log(f"{split}/elbo", elbo, prog_bar=split == "val")
        self.log(f"{split}/iwae", iwae)
        if self.reports_bits:
            bpd.update(bits_per_dim(log_p, numel(self.shape), self.levels, self.dequantized))
            self.log(f"{split}/bpd", bpd)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def configure_optimizers(self):
        return configure_single(self, adam(self.lr))


_DECODER_HINT = "Return one output per example shaped like the data (e.g. end with nn.Unflatten(1, shape)). "


def _preset_encoder(kind: str, shape: tuple[int, ...], hidden: tuple[int, ...]) -> tuple[nn.Module, int]:
    """The ``kind`` preset's encoder ``[B, *shape] -> [B, F]`` and its feature width F."""
    if kind == "conv":
        return conv_encoder(shape, hidden[-1]), hidden[-1]
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), mlp(numel(shape), hidden[:-1], hidden[-1]), nn.ReLU()), hidden[-1]
    return nn.Flatten(), numel(shape)  # linear: q's parameters are an affine map of x


def _preset_decoder(kind: str, latent_dim: int, shape: tuple[int, ...], hidden: tuple[int, ...]) -> nn.Module:
    """The ``kind`` preset's decoder ``[B, latent_dim] -> [B, *shape]``. The trailing ``nn.Unflatten`` has
    no parameters: the state_dict keys are those of the flat networks genzoo had before."""
    if kind == "conv":
        return conv_decoder(latent_dim, shape).append(nn.Unflatten(1, shape))
    if kind == "mlp":
        return mlp(latent_dim, hidden[::-1], numel(shape)).append(nn.Unflatten(1, shape))
    return LinearDecoder(latent_dim, shape)


def _check_arguments(shape, latent_dim, decoder, likelihood, posterior, k, estimator, lr, eval_k) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if decoder not in ("mlp", "conv", "linear"):
        raise ValueError(
            f"decoder must be a network (nn.Module) or 'mlp', 'conv' or 'linear'; got {decoder!r}"
        )
    if decoder == "conv":
        check_conv_image(shape, "decoder='conv'", "decoder='mlp'")
    if likelihood not in ("bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian'; got {likelihood!r}")
    check_covariance(posterior)
    if estimator not in ("reparam", "score"):
        raise ValueError(f"estimator must be 'reparam' or 'score'; got {estimator!r}")
    for name, value in (("latent_dim", latent_dim), ("k", k), ("eval_k", eval_k)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr}")
