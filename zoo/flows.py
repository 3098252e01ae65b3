"""Normalising flows: x = F(u), u ~ N(0, I), with F a composition of invertible layers.

Change of variables (Rezende & Mohamed 2015; seed 002 Q3): for x = F(u),

    log q(x) = log N(u; 0, I) - log |det ∂F/∂u|.

* ``"coupling"``: RealNVP affine coupling (Dinh et al. 2017), x_b' = x_b · exp(s(x_a)) + t(x_a) with the
  halves a / b swapped between layers; ``"maf"``: masked autoregressive flow (Papamakarios et al. 2017), each
  coordinate an affine function of the previous ones through a MADE network, the order reversed between
  layers; ``"spline"``: neural spline flow (Durkan et al. 2019), the MAF with each affine map replaced by a
  monotonic rational-quadratic spline of 8 bins on [-5, 5] (identity outside), zuko's ``NSF`` layer for
  layer. All three come from zuko (``zuko.flows.GeneralCouplingTransform``, ``MaskedAutoregressiveTransform``,
  with zuko's ``MonotonicAffineTransform``: log-scales soft-clipped to ±log 1000, or
  ``MonotonicRQSTransform``). Their density direction
  x -> u is one network pass per layer, so ``log_prob(x)`` is exact and cheap; sampling a MAF takes D passes
  per layer. In 2-D the MAF differs from the coupling flow only by an extra learned affine map of the first
  coordinate per layer.
* ``"planar"``: f(z) = z + û h(wᵀz + b), h = tanh, log|det| = log|1 + ûᵀ h'(wᵀz + b) w|;
  ``"radial"``: f(z) = z + β (z - z0) / (α + r), r = |z - z0|, log|det| = (D-1) log(1 + β/(α+r)) +
  log(1 + β α/(α+r)²) (Rezende & Mohamed 2015, eqs. 10-14 and appendix A). They are invertible (under the
  constraints below) but not in closed form, so only x ~ q with its log q(x) is available:
  :meth:`Flow.sample_and_log_prob`, and they train only with ``objective="reverse"`` (seed 002 Q3.2,
  scenario 1).

Any zuko flow is a family too: ``Flow(shape, flow=zuko.flows.NSF(features=D, transforms=5))`` (NAF, MAF,
NICE, ...; the ``flow`` role) gets the objectives, metrics, guards, keyed noise and CLI below around it.
Its ``flow()`` must be a distribution over ``[D]``, D = prod(shape), with ``log_prob``; for reverse KL and
sampling, a ``NormalizingFlow`` whose base is a factorised Normal (or has an ``icdf``, e.g. ``BoxUniform``),
so that genzoo's keyed base noise u ~ N(0, I) is mapped into the base and pushed through the flow's inverse
transform with its log-determinant.

Objectives (seed 002 Q3.2). ``"forward"`` minimises KL(p_data || q) = E_data[-log q(x)] + const, which needs
samples of the data and log q(x); ``"reverse"`` minimises KL(q || p) = E_{u ~ N}[log q(F(u)) - log p(F(u))],
which needs no data, only the target's log-density (up to a constant). Q3.1: because F is a bijection,
KL(P_X || P_F(U)) = KL(P_F⁻¹(X) || P_U), the same number computed in data space or in base space
(tests/test_flows.py checks it on one set of samples).

Targets for ``"reverse"``: the 2-D potentials U1-U4 of Rezende & Mohamed (2015, table 1), normalised here by
quadrature (:func:`potential_log_prob`), a callable log-density, or the datamodule's exact ``log_prob``.

Discrete data (``levels``, linked from the datamodule: 256 for 8-bit images): the forward objective trains
the density on uniformly dequantised data and ``val/bpd`` / ``test/bpd`` report bits per dimension of the
discrete data (:mod:`zoo.pixels`), the convention of RealNVP and Glow.

All values are in nats per example.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import zuko
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal
from torch.nn.functional import softplus
from torchmetrics import MeanMetric
from zuko.distributions import NormalizingFlow
from zuko.lazy import LazyDistribution

from zoo.guards import check_data, check_finite
from zoo.networks import check_role, dummy_batch, numel
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
from zoo.plugins import (
    LRSchedulerCallable,
    OptimizerCallable,
    adam,
    configure_single,
    linear_decay,
    live_arguments,
)

TransformKind = Literal["coupling", "maf", "spline", "planar", "radial"]
Objective = Literal["forward", "reverse"]
TRANSFORMS = ("coupling", "maf", "spline", "planar", "radial")
INVERTIBLE = ("coupling", "maf", "spline")
SPLINE_BINS = 8  # zuko's NSF default: K = 8 rational-quadratic bins per coordinate
_TRAIN_STREAM, _EVAL_STREAM, _DEQUANTIZE_STREAM = 0, 1, 2

# -- the 2-D potentials of Rezende & Mohamed (2015), table 1: p(z) ∝ exp(-U(z)) ------------------------------


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def _two_wells(a: Tensor, b: Tensor) -> Tensor:
    """-log(exp(-a²/2) + exp(-b²/2)), stable."""
    return -torch.logaddexp(-0.5 * a**2, -0.5 * b**2)


def _wall(z1: Tensor) -> Tensor:
    """A soft wall at |z1| ≈ 4: U2-U4 do not depend on z1 far from the origin, so exp(-U) has no finite
    integral over R²; the paper plots them on [-4, 4]². (z1/4)⁸/2 is < 0.05 nats inside |z1| < 3."""
    return 0.5 * (z1 / 4) ** 8


def _u1(z: Tensor) -> Tensor:
    z1 = z[..., 0]
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    return ring + _two_wells((z1 - 2) / 0.6, (z1 + 2) / 0.6)


def _u2(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 + _wall(z1)


def _u3(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    return _two_wells((z2 - _w1(z1)) / 0.35, (z2 - _w1(z1) + w2) / 0.35) + _wall(z1)


def _u4(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
    return _two_wells((z2 - _w1(z1)) / 0.4, (z2 - _w1(z1) + w3) / 0.35) + _wall(z1)


POTENTIALS: dict[str, Callable[[Tensor], Tensor]] = {"U1": _u1, "U2": _u2, "U3": _u3, "U4": _u4}


@functools.cache
def potential_log_normalizer(name: str, half_width: float = 8.0, points: int = 1601) -> float:
    """log Z = log ∫ exp(-U(z)) dz by the midpoint rule on ``points²`` cells over [-half_width, half_width]²,
    in float64. The defaults (spacing 0.01, ≥ 25 cells across the narrowest well, width 0.35) agree with a
    grid twice as fine to < 1e-6 nats (tests/test_flows.py)."""
    h = 2 * half_width / points
    grid = -half_width + h * (torch.arange(points, dtype=torch.float64) + 0.5)
    z = torch.cartesian_prod(grid, grid)
    return float(torch.logsumexp(-POTENTIALS[name](z), 0) + 2 * math.log(h))


def potential_log_prob(name: str, z: Tensor) -> Tensor:
    """Normalised log p(z) = -U(z) - log Z of potential ``name`` (U1-U4), ``[B, 2] -> [B]``."""
    if name not in POTENTIALS:
        raise ValueError(f"unknown potential {name!r}; choose one of {', '.join(POTENTIALS)}")
    return -POTENTIALS[name](z) - potential_log_normalizer(name)


# -- planar and radial layers (Rezende & Mohamed 2015), written in the sampling direction u -> x -------------


class PlanarLayer(nn.Module):
    """f(z) = z + û tanh(wᵀz + b) with û = u + (m(wᵀu) - wᵀu) w / |w|², m(a) = -1 + softplus(a), so that
    wᵀû = m(wᵀu) > -1 and f is invertible for any raw (u, w, b) (R&M 2015, appendix A.1; the division is by
    the SQUARED norm, RELIABILITY.md #25)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.u = nn.Parameter(0.1 * torch.randn(dim))
        self.w = nn.Parameter(0.1 * torch.randn(dim))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        wu = self.w @ self.u
        return self.u + (softplus(wu) - 1 - wu) * self.w / (self.w @ self.w)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [B, D] -> (f(z) [B, D], log|det ∂f/∂z| [B])``."""
        u_hat = self.u_hat()
        a = z @ self.w + self.b  # (B,)
        h = torch.tanh(a)
        x = z + h[:, None] * u_hat
        # 1 + (1 - h²) wᵀû > 0 because wᵀû > -1 and 0 < 1 - h² <= 1
        return x, torch.log1p((1 - h**2) * (self.w @ u_hat))


class RadialLayer(nn.Module):
    """f(z) = z + β h(α, r) (z - z0), h = 1/(α + r), r = |z - z0|, with α = softplus(α') > 0 and
    β = -α + softplus(β') > -α, which makes f invertible (R&M 2015, appendix A.2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.z0 = nn.Parameter(torch.randn(dim))
        self.alpha_raw = nn.Parameter(torch.zeros(()))
        self.beta_raw = nn.Parameter(0.1 * torch.randn(()))  # β != 0, so z0 and α get gradients at once

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [B, D] -> (f(z) [B, D], log|det ∂f/∂z| [B])``."""
        alpha = softplus(self.alpha_raw)
        beta = softplus(self.beta_raw) - alpha
        diff = z - self.z0
        r = diff.norm(dim=-1)
        bh = beta / (alpha + r)  # β h, > -1 for r > 0
        x = z + bh[:, None] * diff
        log_det = (z.shape[-1] - 1) * torch.log1p(bh) + torch.log1p(beta * alpha / (alpha + r) ** 2)
        return x, log_det


# -- the family ---------------------------------------------------------------------------------------------


class Flow(L.LightningModule):
    """A normalising flow on any data with a ``shape`` (flattened to D = prod(shape) features).

    Args:
        shape: shape of one example, linked from the datamodule by the CLI, e.g. ``(2,)``.
        transform: the preset flow: ``"coupling"`` (RealNVP affine), ``"maf"``, ``"spline"`` (neural spline
            flow, zuko's NSF), ``"planar"`` or ``"radial"``. Ignored when ``flow`` is given.
        n_layers: number of layers composed (preset only).
        hidden: widths of the conditioner networks (coupling, MAF, spline); unused by planar / radial and
            ignored when ``flow`` is given.
        objective: ``"forward"`` (maximum likelihood on the data) or ``"reverse"`` (KL(q || p) against
            ``target`` from the flow's own samples; the batch only sets how many samples a step draws).
            Planar and radial flows need ``"reverse"``.
        target: for ``"reverse"``: ``"U1"``-``"U4"`` (2-D potentials, normalised by quadrature), a callable
            ``log p(x) [B, *shape] -> [B]`` (a module-level function, so checkpoints can pickle it), or
            ``None``: the datamodule's exact ``log_prob`` (``Toy2D`` 8 / 25 Gaussians, checkerboard).
        lr: learning rate of the default optimiser (Adam); ignored when ``optimizer`` is given.
        lr_final_factor: with no ``lr_scheduler``, the learning rate decays linearly to
            ``lr * lr_final_factor`` over the run (``LinearLR`` stepped every batch, saved in checkpoints; as
            ``zoo.GAN``); 1 keeps it constant.
        seed: seed of the training and evaluation noise (see :mod:`zoo.noise`).
        flow: the ``flow`` role: any zuko lazy distribution over ``[D]`` (``zuko.flows.NSF(features=D)``,
            ``NAF``, ``MAF``, ...; ``flow()`` returns the distribution), checked at construction. None builds
            the ``transform`` preset.
        optimizer: a callable ``params -> Optimizer`` (``functools.partial(torch.optim.SGD, lr=0.1)``, or
            ``class_path`` / ``init_args`` in a recipe); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler``, stepped every optimizer step; None: the
            ``lr_final_factor`` decay.
        levels: levels of discrete data (256 for 8-bit images; the CLI links the datamodule's ``levels``),
            None for continuous data. The forward objective and ``val/nll`` then see uniformly dequantised
            data (:func:`zoo.pixels.dequantize`), and ``val/bpd`` reports bits per dimension.
        logit_alpha: with ``levels``, the flow models the pixels in RealNVP's logit space
            (:func:`zoo.pixels.to_logit`, α = 0.05 as in RealNVP), its log-determinant included in every
            density; None models the pixels directly (affine layers then squeeze the always-blank pixels'
            scale to zero, and a held-out image with ink there scores thousands of bits/dim).

    Logged: ``train/loss``; forward: ``val/nll`` = E_data[-log q(x)] (and ``val/bpd`` with ``levels``);
    reverse: ``val/reverse_kl`` = E_q[log q(x) - log p(x)] (the KL itself when the target is normalised);
    on data with an exact density (when the data is the model's target) ``val/kl`` = KL(p_data || q) =
    E_data[log p_data(x) - log q(x)] (and ``val/nll`` for an invertible flow); the same under ``test/``.

    Example:
        >>> flow = Flow(shape=(2,), transform="maf", n_layers=2, hidden=(16,))
        >>> x, log_q = flow.sample_and_log_prob(5, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(flow.log_prob(x), log_q, atol=1e-4)
        True
        >>> nsf = Flow(shape=(2,), flow=zuko.flows.NSF(features=2, transforms=2, hidden_features=(16,)))
        >>> nsf.log_prob(x).shape
        torch.Size([5])
    """

    def __init__(
        self,
        shape: Sequence[int],
        transform: TransformKind = "coupling",
        n_layers: int = 8,
        hidden: Sequence[int] = (64, 64),
        objective: Objective = "forward",
        target: str | Callable[[Tensor], Tensor] | None = None,
        lr: float = 1e-3,
        lr_final_factor: float = 1.0,
        seed: int = 0,
        flow: LazyDistribution | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        levels: int | None = None,
        logit_alpha: float | None = 0.05,
    ) -> None:
        super().__init__()
        check_levels(levels, "Flow")
        check_logit_alpha(logit_alpha, "Flow")
        shape = tuple(int(s) for s in shape)
        _check_arguments(shape, transform, n_layers, hidden, objective, target, lr, lr_final_factor, flow)
        self.save_hyperparameters(
            ignore=live_arguments(flow=flow, optimizer=optimizer, lr_scheduler=lr_scheduler)
        )
        self.shape, self.dim, self.kind = shape, numel(shape), transform
        self.objective, self.target, self.lr, self.seed = objective, target, lr, seed
        self.levels = levels
        self.logit_alpha = logit_alpha if levels is not None else None  # pixels modelled in logit space
        self.lr_final_factor = float(lr_final_factor)
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        if flow is None:
            self.flow = None
            self.layers = nn.ModuleList(_layers(transform, self.dim, n_layers, tuple(hidden)))
        else:
            _check_flow(flow, shape, objective)
            self.flow, self.layers = flow, nn.ModuleList()
        self._data_log_prob: Callable[[Tensor], Tensor] | None = None
        names = ("nll", "kl", "reverse_kl", "bpd")
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in names})
        self.test_metrics = nn.ModuleDict({name: MeanMetric() for name in names})

    # -- the model -------------------------------------------------------------------------------------------

    @property
    def invertible(self) -> bool:
        """Whether ``log_prob(x)`` exists (coupling, MAF, spline, a zuko flow): the density direction is
        available in closed form."""
        return self.flow is not None or self.kind in INVERTIBLE

    def _zuko_transform(self):
        """The composed zuko transform of a preset in the density direction x -> u."""
        return zuko.transforms.ComposedTransform(*(layer() for layer in self.layers))

    @staticmethod
    def base_log_prob(u: Tensor) -> Tensor:
        """log N(u; 0, I) for ``u [B, D]``: ``[B]``."""
        return -0.5 * (u**2).sum(-1) - 0.5 * u.shape[-1] * math.log(2 * math.pi)

    def push(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``u [B, D]`` from N(0, I) -> ``(x [B, D], log q(x) [B])`` = (F(u), log N(u) - log|det ∂F/∂u|).
        A zuko flow's base: u is first mapped into it (z = loc + scale · u, or icdf(Φ(u))), then
        x = T⁻¹(z) and log q(x) = log p_base(z) - log|det ∂T⁻¹/∂z|. With ``logit_alpha`` the flow's output
        is in logit space and x = :func:`~zoo.pixels.from_logit` of it, its log-determinant subtracted."""
        return self._to_pixels(*self._push(u))

    def _to_pixels(self, z: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """The flow's output ``z [B, D]`` with its log q(z) -> the pixels x = :func:`~zoo.pixels.from_logit`
        (z) and log q(x) = log q(z) - log|det dx/dz| with ``logit_alpha``; unchanged without."""
        if self.logit_alpha is None:
            return z, log_q
        x, log_det = from_logit(z, self.levels, self.logit_alpha)
        return x, log_q - log_det

    def _push(self, u: Tensor) -> tuple[Tensor, Tensor]:
        if self.flow is not None:
            distribution = self.flow()
            z = _from_standard_normal(distribution.base, u)
            x, ladj = distribution.transform.inv.call_and_ladj(z)
            if distribution.reinterpreted:
                ladj = ladj.sum(tuple(range(-distribution.reinterpreted, 0)))
            return x, distribution.base.log_prob(z) - ladj
        if self.invertible:
            x, ladj = self._zuko_transform().inv.call_and_ladj(u)
            return x, self.base_log_prob(u) - ladj
        x, log_det = u, torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for layer in self.layers:
            x, step = layer(x)
            log_det = log_det + step
        return x, self.base_log_prob(u) - log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log q(x) = log N(F⁻¹(x)) + log|det ∂F⁻¹/∂x| in nats, ``[B, *shape] -> [B]`` (with
        ``logit_alpha``: of z = :func:`~zoo.pixels.to_logit` (x), plus log|det dz/dx|)."""
        x = x.flatten(1)
        if self.logit_alpha is None:
            return self._log_prob(x)
        z, log_det = to_logit(x, self.levels, self.logit_alpha)
        return self._log_prob(z) + log_det

    def _log_prob(self, x: Tensor) -> Tensor:
        if self.flow is not None:
            return self.flow().log_prob(x)
        if not self.invertible:
            raise NotImplementedError(
                f"Flow(transform={self.kind!r}).log_prob(x) is not available: {self.kind} flows are not "
                "invertible in closed form (seed 002 Q3), so log q(x) of a given x cannot be computed. "
                "Use sample_and_log_prob(n), which returns samples with their exact log q, or "
                "transform='coupling' / 'maf' / 'spline' for a density of any x."
            )
        u, ladj = self._zuko_transform().call_and_ladj(x)
        return self.base_log_prob(u) + ladj

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` draws x ~ q and their log q(x): ``([n, *shape], [n])``, differentiable (reparameterised)."""
        if self.flow is not None:
            distribution = self.flow()
            if not _pushable(distribution):  # e.g. a mixture: zuko's own sampler, seeded from the generator
                z = _own_sample(distribution, n, generator)
                x, log_q = self._to_pixels(z, distribution.log_prob(z))
                return x.reshape(n, *self.shape), log_q
        u = randn((n, self.dim), generator, device=self.device, dtype=self.dtype)
        x, log_q = self.push(u)
        return x.reshape(n, *self.shape), log_q

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws x = F(u), u ~ N(0, I): ``[n, *shape]``."""
        return self.sample_and_log_prob(n, generator)[0]

    def target_log_prob(self, x: Tensor) -> Tensor:
        """log p(x) of the reverse objective's target, ``[B, *shape] -> [B]``."""
        if isinstance(self.target, str):
            return potential_log_prob(self.target, x.flatten(1))
        if callable(self.target):
            return self.target(x)
        if self._data_log_prob is None:
            raise ValueError(
                "Flow(objective='reverse', target=None) takes the target density from the datamodule's "
                "exact log_prob, and there is none here (Toy2D '8gaussians', '25gaussians' and "
                "'checkerboard' have one). Pass target='U1'..'U4' or a callable log-density."
            )
        return self._data_log_prob(x)

    # -- training --------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Take the data's exact ``log_prob`` when the datamodule has one (for ``val/kl``, and as the reverse
        objective's target when ``target=None``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "has_log_prob", callable(getattr(datamodule, "log_prob", None))):
            self._data_log_prob = datamodule.log_prob
        if self.objective == "reverse" and self.target is None and self._data_log_prob is None:
            self.target_log_prob(torch.zeros(1, *self.shape))  # raises the explanation

    def training_loss(self, batch: Tensor) -> Tensor:
        """The objective averaged over the batch (the single-objective capability): forward,
        E_data[-log q(x)] (on dequantised data with ``levels``); reverse, E_q[log q(x) - log p(x)] over
        ``len(batch)`` draws. The noise is keyed by ``(seed, global_step)`` under a Trainer, fresh on every
        call outside one (:func:`zoo.noise.step_key`)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        if self.objective == "forward":
            if self.levels is not None:
                x = dequantize_train(self, x, self.levels, _DEQUANTIZE_STREAM)
            return -self.log_prob(x).mean()
        rank, world = shard_of(self)
        u = global_normal(
            x.shape[0], (self.dim,), key=step_key(self, _TRAIN_STREAM),
            rank=rank, world=world, device=x.device, dtype=x.dtype,
        )  # fmt: skip
        y, log_q = self.push(u)
        return (log_q - self.target_log_prob(y.reshape(-1, *self.shape))).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        check_data(self, batch[0] if isinstance(batch, list | tuple) else batch, "real")
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Tensor, batch_idx: int, stage: str, metrics: nn.ModuleDict) -> None:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        data_is_target = self.objective == "forward" or self.target is None
        if self.invertible and data_is_target:
            if self.levels is not None:
                x = dequantize_eval(self, x, self.levels, _DEQUANTIZE_STREAM, batch_idx)
            log_q = self.log_prob(x)
            metrics["nll"].update(-log_q)
            self.log(f"{stage}/nll", metrics["nll"], prog_bar=stage == "val")
            if self.levels is not None:
                metrics["bpd"].update(bits_per_dim(log_q, self.dim, self.levels, dequantized=True))
                self.log(f"{stage}/bpd", metrics["bpd"])
            if self._data_log_prob is not None:
                metrics["kl"].update(self._data_log_prob(x) - log_q)
                self.log(f"{stage}/kl", metrics["kl"])
        if self.objective == "reverse":
            rank, world = shard_of(self)
            u = positional_normal(
                x.shape[0], (self.dim,), key=mix_key(self.seed, _EVAL_STREAM, batch_idx),
                rank=rank, world=world, device=x.device, dtype=x.dtype,
            )  # fmt: skip
            y, log_q = self.push(u)
            metrics["reverse_kl"].update(log_q - self.target_log_prob(y.reshape(-1, *self.shape)))
            self.log(f"{stage}/reverse_kl", metrics["reverse_kl"], prog_bar=stage == "val")

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val", self.val_metrics)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test", self.test_metrics)

    def configure_optimizers(self):
        """``optimizer`` (default Adam at ``lr``) and ``lr_scheduler``; with no ``lr_scheduler`` and
        ``lr_final_factor != 1`` a ``LinearLR`` to ``lr * lr_final_factor`` over
        ``trainer.estimated_stepping_batches`` steps. Schedules step every batch."""
        decay = None
        if self.lr_final_factor != 1.0:
            decay = functools.partial(linear_decay, self.trainer, final_factor=self.lr_final_factor)
        return configure_single(self, adam(self.lr), decay)


# -- the flow role: any zuko lazy distribution --------------------------------------------------------------


class ZukoFlow(LazyDistribution):
    """``zuko.flows.<name>(features=features, **options)``: any zuko flow by name, for recipes.

    jsonargparse (4.53) reads the signatures of zuko's autoregressive flows (MAF, NSF, NAF, UNAF, SOSPF,
    BPF) through ``MaskedAutoregressiveTransform.__new__`` and ``**kwargs`` down to ``zuko.nn.MLP``, and fills
    in defaults (``normalize``, ``bias``, ``stack``) that the ``MaskedMLP`` it really builds does not take; so
    ``class_path: zuko.flows.NSF`` fails when the CLI instantiates it (RealNVP and NICE fail to parse). Here
    the flow's keyword arguments are one plain dict, which jsonargparse hands over untouched::

        flow:
          class_path: zoo.flows.ZukoFlow
          init_args: {name: NSF, features: 2, options: {transforms: 8, hidden_features: [64, 64]}}

    From Python, pass the zuko flow itself (``flow=zuko.flows.NSF(2, transforms=8)``).
    """

    def __init__(self, name: str, features: int, options: dict[str, Any] | None = None) -> None:
        super().__init__()
        make = getattr(zuko.flows, name, None)
        if not (isinstance(make, type) and issubclass(make, LazyDistribution)):
            flows = sorted(
                n
                for n, c in vars(zuko.flows).items()
                if isinstance(c, type) and issubclass(c, zuko.lazy.Flow)
            )
            raise ValueError(f"ZukoFlow: no zuko flow named {name!r}; zuko.flows has {', '.join(flows)}")
        self.flow = make(features=features, **(options or {}))

    def forward(self, c: Tensor | None = None) -> Distribution:
        return self.flow(c)


class _LogProb(nn.Module):
    """The ``flow`` role's dry run: ``x [B, D] -> flow().log_prob(x) [B]``."""

    def __init__(self, flow: LazyDistribution) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)


def _check_flow(flow: nn.Module, shape: tuple[int, ...], objective: str) -> None:
    """The ``flow`` role's contract: a zuko lazy distribution whose ``flow()`` is a distribution over
    ``[D]``, D = prod(shape), with ``log_prob [B, D] -> [B]``; for reverse KL one genzoo can push its keyed
    base noise through (:func:`_pushable`)."""
    dim, name = numel(shape), type(flow).__name__
    example = f"e.g. zuko.flows.NSF(features={dim}, transforms=5)"
    if not isinstance(flow, LazyDistribution):
        raise ValueError(
            "Flow: the flow must be a zuko lazy distribution (zuko.flows.Flow / LazyDistribution, "
            f"{example}); got {name}"
        )
    try:
        distribution = flow()
    except Exception as error:
        raise ValueError(
            f"Flow: the flow ({name}) failed to build its distribution with flow() (no context; genzoo's "
            f"flows are unconditional). It raised {type(error).__name__}: {error}"
        ) from error
    event = tuple(distribution.event_shape)
    if event != (dim,):
        raise ValueError(
            f"Flow: the flow ({name}) must be a distribution over [{dim}] (D = {dim} features, the data's "
            f"shape {shape} flattened); it is one over {list(event)}. Build it with features={dim} "
            f"({example})."
        )
    check_role(
        "Flow", "flow", _LogProb(flow), [dummy_batch((dim,), like=flow)], ("B",), name=name,
        hint=f"flow().log_prob of x [B, {dim}] must be [B] (genzoo's flows are unconditional: context=0). ",
    )  # fmt: skip
    if objective == "reverse" and not _pushable(distribution):
        raise ValueError(
            f"Flow: the flow ({name}) cannot be trained with objective='reverse' here: reverse KL pushes "
            "genzoo's keyed base noise through the flow's inverse, which needs a zuko NormalizingFlow whose "
            f"base is a factorised Normal or has an icdf; flow() is {_describe(distribution)}."
        )


def _describe(distribution: Distribution) -> str:
    if isinstance(distribution, NormalizingFlow):
        return f"a NormalizingFlow on a {type(_factors(distribution.base)).__name__} base"
    return f"a {type(distribution).__name__}, not a NormalizingFlow"


def _factors(base: Distribution) -> Distribution:
    """The factorised distribution inside ``Independent`` wrappers (zuko's DiagNormal, BoxUniform)."""
    while isinstance(base, Independent):
        base = base.base_dist
    return base


def _has_icdf(distribution: Distribution) -> bool:
    return type(distribution).icdf is not Distribution.icdf


def _pushable(distribution: Distribution) -> bool:
    """Whether genzoo's base noise u ~ N(0, I) maps into this distribution's base (see :meth:`Flow.push`)."""
    if not isinstance(distribution, NormalizingFlow):
        return False
    base = _factors(distribution.base)
    return isinstance(base, Normal) or _has_icdf(base)


def _from_standard_normal(base: Distribution, u: Tensor) -> Tensor:
    """u ~ N(0, I) -> z ~ base, reparameterised: loc + scale · u for a (factorised) Normal, icdf(Φ(u))
    otherwise (exact in distribution; differentiable in the base's parameters)."""
    factors = _factors(base)
    if isinstance(factors, Normal):
        return factors.loc + factors.scale * u
    return factors.icdf(torch.special.ndtr(u))


def _own_sample(distribution: Distribution, n: int, generator: torch.Generator | None) -> Tensor:
    """zuko's own sampler for a distribution :func:`_pushable` rejects, made reproducible from ``generator``
    by seeding a forked global generator from it."""
    seed = int(torch.randint(0, 1 << 62, (), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sampler = distribution.rsample if distribution.has_rsample else distribution.sample
        return sampler((n,))


def _layers(kind: str, dim: int, n_layers: int, hidden: tuple[int, ...]) -> list[nn.Module]:
    if kind == "planar":
        return [PlanarLayer(dim) for _ in range(n_layers)]
    if kind == "radial":
        return [RadialLayer(dim) for _ in range(n_layers)]
    if kind == "coupling":  # the conditioning half alternates between layers
        mask = torch.arange(dim) < dim // 2
        return [
            zuko.flows.GeneralCouplingTransform(
                dim, mask=mask if i % 2 == 0 else ~mask, hidden_features=hidden
            )
            for i in range(n_layers)
        ]
    spline = {}  # maf: affine maps; spline: zuko's NSF, monotonic rational-quadratic splines of K bins
    if kind == "spline":
        spline = {
            "univariate": functools.partial(zuko.transforms.MonotonicRQSTransform, slope=1e-3),
            "shapes": [(SPLINE_BINS,), (SPLINE_BINS,), (SPLINE_BINS - 1,)],  # widths, heights, knot slopes
        }
    order = torch.arange(dim)  # the autoregressive order reverses between layers
    return [
        zuko.flows.MaskedAutoregressiveTransform(
            dim, order=order if i % 2 == 0 else order.flip(0), hidden_features=hidden, **spline
        )
        for i in range(n_layers)
    ]


def _check_arguments(
    shape, transform, n_layers, hidden, objective, target, lr, lr_final_factor, flow=None
) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {', '.join(map(repr, TRANSFORMS))}; got {transform!r}")
    if flow is None and transform in INVERTIBLE and numel(shape) < 2:
        raise ValueError(f"transform={transform!r} needs at least 2 features; got shape={shape}")
    if objective not in ("forward", "reverse"):
        raise ValueError(f"objective must be 'forward' or 'reverse'; got {objective!r}")
    if objective == "forward" and flow is None and transform not in INVERTIBLE:
        raise ValueError(
            f"transform={transform!r} cannot be trained with objective='forward': maximum likelihood needs "
            "log q(x) of the data, and planar / radial flows are not invertible in closed form "
            "(seed 002 Q3). "
            "Use objective='reverse' with a target density, or transform='coupling' / 'maf' / 'spline'."
        )
    if objective == "forward" and target is not None:
        raise ValueError("target is the reverse objective's density; with objective='forward' leave it None")
    if isinstance(target, str) and target not in POTENTIALS:
        raise ValueError(
            f"unknown target {target!r}; choose one of {', '.join(POTENTIALS)} or pass a callable"
        )
    if isinstance(target, str) and tuple(shape) != (2,):
        raise ValueError(f"target={target!r} is a 2-D potential; it needs shape=(2,), got {shape}")
    if target is not None and not isinstance(target, str) and not callable(target):
        raise ValueError(f"target must be a potential name, a callable log-density or None; got {target!r}")
    if isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer; got {n_layers}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive; got {tuple(hidden)}")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr}")
    if not 0 < lr_final_factor <= 1:
        raise ValueError(f"lr_final_factor must be in (0, 1]; got {lr_final_factor}")
