"""Gaussians over a latent space: the amortised posterior head, the matching prior, reparameterisation.

Full covariance uses a Cholesky factor L (lower triangular, positive diagonal), Σ = L Lᵀ, so sampling is
z = μ + L ε (seed 003, "reparameterisation for full-covariance Gaussians") and every density and KL is
computed by ``torch.distributions`` (whose Gaussian KL is the closed form of seed 004). Argument validation
is off on these hot-path objects: their parameters are valid by construction (softplus scales, Cholesky
factors with a positive diagonal) and checking them costs ~2% of a small model's training step.

Mixed precision (``bf16-mixed``, ``16-mixed``): the networks run in the half type under autocast, but the
posterior's parameters, z = μ + L ε, densities (a triangular solve for full covariance) and KL terms are
computed in float32 with autocast off (:func:`upcast`, :func:`full_precision`): half types have 8 (bf16) or
11 (fp16) bits of mantissa, the CPU has no bf16 triangular solve, and ``index_put`` refuses mixed dtypes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence
from torch.nn.functional import softplus

Covariance = Literal["diagonal", "full"]
MIN_SCALE = 1e-4


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is in a half type (what autocast returns), else unchanged (float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextmanager
def full_precision(like: Tensor) -> Iterator[None]:
    """Autocast off on ``like``'s device: inside, every op runs in the dtype of its inputs (give it
    :func:`upcast` ones). Use it for Cholesky factors, triangular solves, log-sum-exps and KL terms."""
    with torch.autocast(like.device.type, enabled=False):
        yield


def check_covariance(covariance: str) -> None:
    if covariance not in ("diagonal", "full"):
        raise ValueError(f"posterior must be 'diagonal' or 'full'; got {covariance!r}")


class Gaussian(NamedTuple):
    """A Gaussian over R^d by its parameters: ``loc [..., d]`` and ``scale``, either σ ``[..., d]`` (diagonal
    covariance diag σ²) or a lower-triangular Cholesky factor L ``[..., d, d]`` (full covariance L Lᵀ).

    The training step works on these tensors directly (building ``torch.distributions`` objects costs ~60 µs a
    step, more than the rest of a small model's posterior); :meth:`distribution` gives the library object for
    densities and for everything else.
    """

    loc: Tensor
    scale: Tensor

    @property
    def is_full(self) -> bool:
        return self.scale.dim() == self.loc.dim() + 1

    def distribution(self) -> Distribution:
        """``MultivariateNormal(scale_tril=L)`` or ``Independent(Normal(μ, σ), 1)`` (validation off: the
        parameters are valid by construction)."""
        if self.is_full:
            return MultivariateNormal(self.loc, scale_tril=self.scale, validate_args=False)
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1, validate_args=False)

    def rsample(self, eps: Tensor) -> Tensor:
        """z = μ + L ε (seed 003) for standard-normal ``eps [*sample, *batch, d]``: what ``rsample`` would
        return for that ε, with noise the caller controls (:mod:`zoo.noise`). In float32 under autocast."""
        with full_precision(self.loc):
            eps = upcast(eps)
            if self.is_full:
                return self.loc + (self.scale @ eps.unsqueeze(-1)).squeeze(-1)
            return self.loc + self.scale * eps

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) per batch element, ``z [*sample, *batch, d]``, in float32 under autocast (a triangular
        solve for full covariance)."""
        with full_precision(self.loc):
            return self.distribution().log_prob(upcast(z))

    def kl_to_standard_normal(self) -> Tensor:
        """KL(q || N(0, I)) per batch element.

        Diagonal: the closed form 1/2 Σ_i (σ_i² + μ_i² - 1 - log σ_i²) (seed 001, "KL between diagonal
        Gaussians"). Full covariance: ``torch.distributions``' ``kl_divergence``, i.e. seed 004's
        1/2 (tr Σ + μᵀμ - d - log det Σ). Tests check both against the library and the seed's formula.
        """
        with full_precision(self.loc):
            if self.is_full:
                prior = standard_normal(self.loc.shape[-1], "full", self.loc)
                return kl_divergence(self.distribution(), prior)
            return 0.5 * (self.scale**2 + self.loc**2 - 1.0 - 2.0 * torch.log(self.scale)).sum(-1)


class GaussianHead(nn.Module):
    """Features ``[..., in_features]`` -> the :class:`Gaussian` q over R^dim with batch shape ``[...]``.

    ``diagonal``: σ = softplus(·) + 1e-4, 2·dim outputs. ``full``: L with a softplus diagonal and a free
    strictly-lower triangle, dim + dim(dim+1)/2 outputs.
    """

    def __init__(self, in_features: int, dim: int, covariance: Covariance = "diagonal") -> None:
        super().__init__()
        check_covariance(covariance)
        self.dim, self.covariance = dim, covariance
        n_scale = dim if covariance == "diagonal" else dim * (dim + 1) // 2
        self.linear = nn.Linear(in_features, dim + n_scale)
        if covariance == "full":
            self.register_buffer("_tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)

    def forward(self, features: Tensor) -> Gaussian:
        out = upcast(self.linear(features))  # the parameters of q in float32 under mixed precision
        with full_precision(out):
            loc, raw = out[..., : self.dim], out[..., self.dim :]
            if self.covariance == "diagonal":
                return Gaussian(loc, softplus(raw) + MIN_SCALE)
            scale_tril = torch.diag_embed(softplus(raw[..., : self.dim]) + MIN_SCALE)
            scale_tril[..., self._tril[0], self._tril[1]] = raw[..., self.dim :]
            return Gaussian(loc, scale_tril)


def standard_normal(dim: int, covariance: Covariance, like: Tensor) -> Distribution:
    """N(0, I) in the same family as the posterior, so ``kl_divergence`` finds its closed form."""
    zeros = like.new_zeros(dim)
    if covariance == "diagonal":
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return MultivariateNormal(zeros, scale_tril=eye, validate_args=False)
