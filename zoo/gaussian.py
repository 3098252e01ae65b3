"""Gaussians over a latent space: the amortised posterior head, the matching prior, reparameterisation.

Full covariance uses a Cholesky factor L (lower triangular, positive diagonal), Σ = L Lᵀ, so sampling is
z = μ + L ε (seed 003, "reparameterisation for full-covariance Gaussians") and every density and KL is
computed by ``torch.distributions`` (whose Gaussian KL is the closed form of seed 004). Argument validation
is off on these hot-path objects: their parameters are valid by construction (softplus scales, Cholesky
factors with a positive diagonal) and checking them costs ~2% of a small model's training step.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, kl_divergence
from torch.nn.functional import softplus

Covariance = Literal["diagonal", "full"]
MIN_SCALE = 1e-4


def check_covariance(covariance: str) -> None:
    if covariance not in ("diagonal", "full"):
        raise ValueError(f"posterior must be 'diagonal' or 'full'; got {covariance!r}")


class GaussianHead(nn.Module):
    """Features ``[..., in_features]`` -> a Gaussian over R^dim with batch shape ``[...]``.

    ``diagonal``: N(μ, diag σ²) as ``Independent(Normal)``, 2·dim outputs.
    ``full``: N(μ, L Lᵀ) as ``MultivariateNormal(scale_tril=L)``, dim + dim(dim+1)/2 outputs.
    """

    def __init__(self, in_features: int, dim: int, covariance: Covariance = "diagonal") -> None:
        super().__init__()
        check_covariance(covariance)
        self.dim, self.covariance = dim, covariance
        n_scale = dim if covariance == "diagonal" else dim * (dim + 1) // 2
        self.linear = nn.Linear(in_features, dim + n_scale)
        if covariance == "full":
            self.register_buffer("_tril", torch.tril_indices(dim, dim, offset=-1), persistent=False)

    def forward(self, features: Tensor) -> Distribution:
        out = self.linear(features)
        loc, raw = out[..., : self.dim], out[..., self.dim :]
        if self.covariance == "diagonal":
            return Independent(
                Normal(loc, softplus(raw) + MIN_SCALE, validate_args=False), 1, validate_args=False
            )
        diag = softplus(raw[..., : self.dim]) + MIN_SCALE
        scale_tril = torch.diag_embed(diag)
        scale_tril[..., self._tril[0], self._tril[1]] = raw[..., self.dim :]
        return MultivariateNormal(loc, scale_tril=scale_tril, validate_args=False)


def standard_normal(dim: int, covariance: Covariance, like: Tensor) -> Distribution:
    """N(0, I) in the same family as the posterior, so ``kl_divergence`` finds its closed form."""
    zeros = like.new_zeros(dim)
    if covariance == "diagonal":
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return MultivariateNormal(zeros, scale_tril=eye, validate_args=False)


def kl_to_standard_normal(q: Distribution) -> Tensor:
    """KL(q || N(0, I)) per batch element.

    Diagonal q: the closed form 1/2 Σ_i (σ_i² + μ_i² - 1 - log σ_i²) (seed 001, "KL between diagonal
    Gaussians"), written out because it runs every training step. Full covariance: ``torch.distributions``'
    ``kl_divergence``, i.e. seed 004's 1/2 (tr Σ + μᵀμ - d - log det Σ). Tests check both against the library
    and the seed's formula.
    """
    if isinstance(q, MultivariateNormal):
        return kl_divergence(q, standard_normal(q.loc.shape[-1], "full", q.loc))
    loc, scale = q.base_dist.loc, q.base_dist.scale
    return 0.5 * (scale**2 + loc**2 - 1.0 - 2.0 * torch.log(scale)).sum(-1)


def reparameterize(q: Distribution, eps: Tensor) -> Tensor:
    """z = μ + L ε for the Gaussians of :class:`GaussianHead`; ``eps`` is ``[*sample, *batch, dim]``.

    Same result as ``q.rsample`` would give for that ε, but with noise the caller controls (see
    :mod:`zoo.noise`).
    """
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal):
        return q.base_dist.loc + q.base_dist.scale * eps
    raise TypeError(f"reparameterize supports diagonal or full Gaussians, got {type(q).__name__}")
