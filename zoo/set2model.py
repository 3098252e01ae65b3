"""Set2Model networks: fit a diagonal Gaussian mixture to each set of embeddings, score queries by their
log-likelihood under it, and train the embedding discriminatively THROUGH the fit.

Vakhitov, Kuzmin & Lempitsky, "Set2Model Networks: Learning Discriminatively To Learn Generative Models"
(CVIU 2018); the supplement is seed 000 (its eq. 1, eq. 2, Table 1 and the Corollary).

* Fit (:func:`fit_gmm`): batched EM for S sets of N embeddings in D dimensions, K diagonal components,
  deterministic (farthest-point initialisation), scales floored at ``min_scale``.
* Gradient (:class:`ImplicitGMM`): the converged fit θ*(x) is a stationary point of the log-likelihood,
  F(θ*, x) = ∇_θ l(θ* | x) = 0, so by the implicit function theorem dθ*/dx = -H⁻¹ ∂F/∂x with H the
  Hessian of l (seed eq. 2). The backward pass solves ONE linear system with H at the fit (block-diagonal
  with 2x2 blocks when every responsibility is 0/1, the seed's Corollary; dense otherwise) and one
  mixed second derivative of l: its memory does not grow with ``em_steps``.
* Hessian (:func:`gmm_hessian`): eq. 2 with Table 1, corrected (the seed's case i ≠ u carries a spurious
  1/h²; see the function), plus the mixture-weight rows the seed leaves out.
* :class:`Set2Model`: the LightningModule. Logistic loss on the query log-likelihoods, σ(α·log p(q) + β)
  with a learned scale α > 0 and bias β (members 1, non-members 0); retrieval mAP on held-out classes.
  With one component and a fixed unit isotropic scale (``covariance="fixed"``) it is a prototypical
  network (Snell et al. 2017): log p(q) = -|q - mean(set)|²/2 + const.

Mixed precision (``bf16-mixed``, ``16-mixed``): only the embedding network runs in the half type; the
embeddings are cast to float32 and the EM fit, its implicit backward (an eigensolve: no half-type kernels,
and 8 significant bits would swamp its stationarity conditions) and the query log-likelihoods run with
autocast off.

Set2Model is a discriminative learner of generative models of SETS; it is not a generative model of
images, so it offers no ``sample(n)`` and does not claim the ``Samplable`` capability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits
from torchmetrics import MeanMetric, Metric

from zoo.gaussian import full_precision, upcast
from zoo.guards import check_data, check_finite
from zoo.networks import check_role, dummy_batch, mlp, numel
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments

LOG_2PI = math.log(2 * math.pi)


class Mixture(NamedTuple):
    """A diagonal Gaussian mixture per set: ``weights [S, K]`` (rows sum to 1), ``means`` and ``scales``
    ``[S, K, D]``."""

    weights: Tensor
    means: Tensor
    scales: Tensor


# --------------------------------------------------------------------------------------------- likelihood


def component_log_density(x: Tensor, means: Tensor, scales: Tensor) -> Tensor:
    """log Π_j g(θ_ij | x_j) for x ``[S, N, D]`` and every component i: ``[S, N, K]`` (Table 1's g)."""
    z = (x.unsqueeze(2) - means.unsqueeze(1)) / scales.unsqueeze(1)  # (S, N, K, D)
    return (-0.5 * z.square() - scales.log().unsqueeze(1) - 0.5 * LOG_2PI).sum(-1)


def log_likelihood(
    x: Tensor, weights: Tensor, means: Tensor, scales: Tensor, mask: Tensor | None = None
) -> Tensor:
    """The mixture log-likelihood of each set (seed eq. 1): l = Σ_n log Σ_i v_i Π_j g(θ_ij | x_nj), ``[S]``.

    ``mask [S, N]`` (True = observed) drops padded elements.
    """
    log_h = torch.logsumexp(weights.log().unsqueeze(1) + component_log_density(x, means, scales), dim=-1)
    return (log_h if mask is None else log_h * mask).sum(-1)


def log_likelihood_unconstrained(
    x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor, mask=None
) -> Tensor:
    """:func:`log_likelihood` in the coordinates of the implicit solve: v = softmax(a), σ = exp(s)."""
    log_joint = torch.log_softmax(logits, -1).unsqueeze(1) + component_log_density(x, means, log_scales.exp())
    log_h = torch.logsumexp(log_joint, dim=-1)
    return (log_h if mask is None else log_h * mask).sum(-1)


def responsibilities(x: Tensor, weights: Tensor, means: Tensor, scales: Tensor) -> Tensor:
    """r_ni = v_i Π_j g(θ_ij | x_nj) / h(θ | x_n), ``[S, N, K]`` (the seed's r_i)."""
    return torch.softmax(weights.log().unsqueeze(1) + component_log_density(x, means, scales), dim=-1)


def _table1(x: Tensor, means: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Table 1 divided by g: φ = (g'_μ, g'_σ)/g ``[S, N, K, D, 2]`` and ψ = g''/g ``[S, N, K, D, 2, 2]``.

    With e = x - μ: g'_μ/g = e/σ², g'_σ/g = (e²/σ² - 1)/σ, g''_μμ/g = -1/σ² + e²/σ⁴,
    g''_σσ/g = σ⁻²(2 - 5e²/σ² + e⁴/σ⁴), g''_σμ/g = -3e/σ³ + e³/σ⁵. (All six entries of Table 1 agree with
    autograd; tests/test_set2model.py checks them.)
    """
    e = x.unsqueeze(2) - means.unsqueeze(1)  # (S, N, K, D)
    s = scales.unsqueeze(1)
    u = (e / s).square()
    phi = torch.stack([e / s**2, (u - 1) / s], -1)
    mm = -1 / s**2 + e**2 / s**4
    ss = (2 - 5 * u + u**2) / s**2
    sm = -3 * e / s**3 + e**3 / s**5
    psi = torch.stack([torch.stack([mm, sm], -1), torch.stack([sm, ss], -1)], -2)
    return phi, psi


def _masked(r: Tensor, mask: Tensor | None) -> Tensor:
    return r if mask is None else r * mask.unsqueeze(-1).to(r.dtype)


def gmm_hessian(
    x: Tensor,
    weights: Tensor,
    means: Tensor,
    scales: Tensor,
    mask: Tensor | None = None,
    coords: Literal["seed", "unconstrained"] = "unconstrained",
) -> Tensor:
    """Hessian of the mixture log-likelihood l (seed eq. 1) of each set, ``[S, P, P]``, by seed eq. 2.

    Parameters are ordered as in the seed's Theorem, θ = [θ_1, ..., θ_K] with θ_i = [θ_i1, ..., θ_iD] and
    θ_ij = (μ_ij, σ_ij): index ``2 (i D + j) + c``, c = 0 for μ, 1 for σ.

    ``coords="seed"``: w.r.t. (μ, σ) only, P = 2KD, as the Theorem states it ("except the weights").
    Per observation, with r_i the responsibility and φ, ψ Table 1's g'/g, g''/g (:func:`_table1`)::

        i = u, j ≠ s:  (r_i - r_i²) φ_ijk φ_ist
        i = u, j = s:  r_i ψ_ij,kt - r_i² φ_ijk φ_ijt
        i ≠ u:         -r_i r_u φ_ijk φ_ust

    The third case is where the seed is misprinted: it reads -(1/h²) r_i r_u φ φ, but r_i = v_i Π g / h
    already carries the 1/h, and the seed's own derivation (its eq. 8-10) starts from -(1/h²) v_i Π g ...
    v_u Π g, which IS -r_i r_u φ φ; writing r's AND keeping 1/h² counts the normaliser twice (the printed
    entry is the true one divided by h², h the density of the observation; tests compare both with
    autograd). The code sums the
    three cases as three terms: δ_iu r_i φφᵀ (cases 1-2) + δ_iu δ_js r_i (ψ - φφᵀ) (case 2's extra)
    - (rφ)(rφ)ᵀ (all cases).

    ``coords="unconstrained"``: w.r.t. the coordinates of the implicit solve, μ, s = log σ and the logits a
    of v = softmax(a), P = 2KD + K, logits last. Chain rule: H_ss = σ² H_σσ + σ ∂l/∂σ, H_μs = σ H_μσ, and
    for the weights (derived here, the seed has no weight rows), per observation,
    ∂²/∂a_u∂a_w = r_u (δ_uw - r_w) - v_u (δ_uw - v_w), ∂²/∂a_u∂θ_ijc = r_u (δ_ui - r_i) φ_ijc.
    """
    S, K, D = means.shape
    phi, psi = _table1(x, means, scales)
    r = _masked(responsibilities(x, weights, means, scales), mask)  # (S, N, K), zero where padded
    eye_k = torch.eye(K, dtype=x.dtype, device=x.device)
    eye_d = torch.eye(D, dtype=x.dtype, device=x.device)
    rphi = r[..., None, None] * phi  # (S, N, K, D, 2)
    # (S, K, D, 2, K, D, 2): δ_iu Σ_n r_ni φ_nijk φ_nuet
    same_component = torch.einsum("snidk,snuet,iu->sidkuet", rphi, phi, eye_k)
    centred = psi - phi.unsqueeze(-1) * phi.unsqueeze(-2)  # ψ - φφᵀ: the Hessian of log g
    same_coordinate = torch.einsum("sni,snidkt,iu,de->sidkuet", r, centred, eye_k, eye_d)
    cross = torch.einsum("snidk,snuet->sidkuet", rphi, rphi)
    P = 2 * K * D
    h = (same_component + same_coordinate - cross).reshape(S, P, P)
    if coords == "seed":
        return h
    if coords != "unconstrained":
        raise ValueError(f"coords={coords!r} is not allowed; choose 'seed' or 'unconstrained'")
    # (μ, σ) -> (μ, s = log σ): J = diag(1, σ) per (i, j), plus the gradient term on the s diagonal.
    jac = torch.stack([torch.ones_like(scales), scales], -1).reshape(S, P)
    grad_sigma = (rphi[..., 1]).sum(1)  # ∂l/∂σ, (S, K, D)
    h = h * jac.unsqueeze(-1) * jac.unsqueeze(-2)
    extra = torch.stack([torch.zeros_like(scales), scales * grad_sigma], -1).reshape(S, P)
    h = h + torch.diag_embed(extra)
    # weights as logits
    n = r.sum(1)  # (S, K), N_u = Σ_n r_nu
    total = n.sum(-1, keepdim=True)  # number of observed elements
    v = weights
    h_aa = (
        torch.diag_embed(n)
        - torch.einsum("snu,snw->suw", r, r)
        - total.unsqueeze(-1) * (torch.diag_embed(v) - v.unsqueeze(-1) * v.unsqueeze(-2))
    )
    # ∂²/∂a_u ∂θ_ijc = Σ_n r_nu (δ_ui - r_ni) φ_nijc, then the σ column times σ
    h_ax = torch.einsum("snidc,iu->suidc", rphi, eye_k) - torch.einsum("snu,snidc->suidc", r, rphi)
    h_ax = h_ax.reshape(S, K, P) * jac.unsqueeze(1)
    top = torch.cat([h, h_ax.transpose(1, 2)], -1)
    bottom = torch.cat([h_ax, h_aa], -1)
    return torch.cat([top, bottom], 1)


def gmm_hessian_blocks(
    x: Tensor, weights: Tensor, means: Tensor, scales: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The unconstrained Hessian (:func:`gmm_hessian`) when every responsibility is 0 or 1 (the seed's
    Corollary): only the 2x2 blocks of one component and coordinate survive, ``[S, K, D, 2, 2]`` over
    (μ_ij, s_ij), and the logits' K x K block -N (diag v - v vᵀ), ``[S, K, K]``. Cost O(S N K D)."""
    phi, psi = _table1(x, means, scales)
    r = _masked(responsibilities(x, weights, means, scales), mask)
    blocks = torch.einsum("sni,snidkt->sidkt", r, psi - phi.unsqueeze(-1) * phi.unsqueeze(-2))
    grad_sigma = (r[..., None] * phi[..., 1]).sum(1)
    jac = torch.stack([torch.ones_like(scales), scales], -1)  # (S, K, D, 2)
    blocks = blocks * jac.unsqueeze(-1) * jac.unsqueeze(-2)
    blocks[..., 1, 1] += scales * grad_sigma
    total = r.sum((1, 2))[:, None, None]
    v = weights
    logits = -total * (torch.diag_embed(v) - v.unsqueeze(-1) * v.unsqueeze(-2))
    return blocks, logits


# -------------------------------------------------------------------------------------------------- EM


def _m_step(x: Tensor, r: Tensor, min_scale: float, fixed_scale: float | None) -> Mixture:
    """Maximise the expected complete-data log-likelihood given responsibilities ``r`` (zero where padded).

    v_i = N_i / N, μ_i = Σ_n r_ni x_n / N_i, σ_ij = max(sqrt(Σ_n r_ni (x_nj - μ_ij)² / N_i), min_scale)
    (the constrained maximiser: l is unimodal in σ_ij for fixed r, μ).
    """
    n = r.sum(1)  # (S, K)
    safe = n.clamp_min(torch.finfo(x.dtype).tiny)
    weights = n / n.sum(-1, keepdim=True)
    means = torch.einsum("snk,snd->skd", r, x) / safe.unsqueeze(-1)
    if fixed_scale is not None:
        return Mixture(weights, means, torch.full_like(means, fixed_scale))
    var = torch.einsum("snk,snkd->skd", r, (x.unsqueeze(2) - means.unsqueeze(1)).square()) / safe.unsqueeze(
        -1
    )
    return Mixture(weights, means, var.clamp_min(min_scale**2).sqrt())


def farthest_point_init(x: Tensor, n_components: int, mask: Tensor | None = None) -> Tensor:
    """Indices ``[S, K]`` of K elements per set: first the one nearest the set's mean, then repeatedly the
    one farthest from those chosen (deterministic; ties go to the lowest index)."""
    S, N, _ = x.shape
    valid = torch.ones(S, N, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    w = valid.to(x.dtype).unsqueeze(-1)
    centre = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    dist = (x - centre).square().sum(-1).masked_fill(~valid, math.inf)
    chosen = [dist.argmin(-1)]
    nearest = torch.full((S, N), math.inf, dtype=x.dtype, device=x.device)
    for _ in range(1, n_components):
        last = x[torch.arange(S, device=x.device), chosen[-1]]  # (S, D)
        nearest = torch.minimum(nearest, (x - last.unsqueeze(1)).square().sum(-1))
        chosen.append(nearest.masked_fill(~valid, -math.inf).argmax(-1))
    return torch.stack(chosen, -1)


def em_fit(
    x: Tensor,
    n_components: int,
    em_steps: int,
    min_scale: float,
    mask: Tensor | None = None,
    fixed_scale: float | None = None,
) -> Mixture:
    """Plain EM, differentiable by autograd when run with grad (the unrolled reference of the tests).

    Initialisation: hard-assign every element to the nearest of :func:`farthest_point_init`'s points, one
    M-step. Then ``em_steps`` E- and M-steps.
    """
    S = x.shape[0]
    with torch.no_grad():
        idx = farthest_point_init(x, n_components, mask)
        seeds = x[torch.arange(S, device=x.device).unsqueeze(-1), idx]  # (S, K, D)
        nearest = (x.unsqueeze(2) - seeds.unsqueeze(1)).square().sum(-1).argmin(-1)
    r = _masked(torch.nn.functional.one_hot(nearest, n_components).to(x.dtype), mask)
    fit = _m_step(x, r, min_scale, fixed_scale)
    for _ in range(em_steps):
        log_w = fit.weights.clamp_min(torch.finfo(x.dtype).tiny).log()
        r = torch.softmax(log_w.unsqueeze(1) + component_log_density(x, fit.means, fit.scales), -1)
        fit = _m_step(x, _masked(r, mask), min_scale, fixed_scale)
    return fit


# ------------------------------------------------------------------------------------ implicit gradient


def _softness(x, fit: Mixture, mask) -> Tensor:
    """max over elements of 1 - max_i r_ni, per set, summed over the non-maximal r (no cancellation)."""
    r = responsibilities(x, *fit)
    top = torch.nn.functional.one_hot(r.argmax(-1), r.shape[-1]).bool()
    soft = r.masked_fill(top, 0).sum(-1)
    if mask is not None:
        soft = soft * mask
    return soft.amax(-1)


def _cutoff(eigenvalues: Tensor) -> Tensor:
    """Per set: |λ| below P ε max|λ| counts as zero (torch.linalg.pinv's default rtol)."""
    n = eigenvalues.shape[-1]
    return eigenvalues.abs().amax(-1) * n * torch.finfo(eigenvalues.dtype).eps


def _eig_solve(lam: Tensor, vec: Tensor, b: Tensor, cutoff: Tensor) -> Tensor:
    """Pseudo-inverse solve V diag(1/λ) Vᵀ b of a symmetric system, eigenvalues below ``cutoff`` dropped."""
    inv = torch.where(lam.abs() > cutoff, 1 / lam, torch.zeros_like(lam))
    return ((vec * inv.unsqueeze(-2)) @ (vec.transpose(-1, -2) @ b.unsqueeze(-1))).squeeze(-1)


def implicit_solve(
    x: Tensor, fit: Mixture, rhs: Tensor, frozen: Tensor, mask: Tensor | None, hard: Tensor
) -> Tensor:
    """Solve H w = rhs per set in the unconstrained coordinates (layout of :func:`gmm_hessian`).

    ``frozen [S, K, D]``: log-scales held fixed (clamped at ``min_scale`` or a fixed scale): their rows and
    columns are replaced by -1 on the diagonal, their right-hand side is zero, so w = 0 there (the fit does
    not move them). The softmax gauge: l is invariant under a -> a + c 1, so H [1_a; 0] = 0 and H is
    singular; the right-hand side is orthogonal to that null vector (the softmax VJP sums to zero), and
    adding -(N/K) 1 1ᵀ to the logits block picks the unique solution with Σ_u w_a,u = 0. Sets flagged
    ``hard`` use :func:`gmm_hessian_blocks` (2x2 blocks and one K x K solve); the others the dense H.
    The solve is a pseudo-inverse through the symmetric eigendecomposition (eigenvalues below P ε max|λ|
    dropped, as ``torch.linalg.pinv``): a component that owns no element (N_i ≈ 0) has a zero block, and
    the pseudo-inverse leaves it where it is instead of failing; otherwise it is the exact solve.
    """
    _, K, D = fit.means.shape
    P = 2 * K * D
    out = torch.empty_like(rhs)
    count = (torch.ones_like(x[..., 0]) if mask is None else mask.to(x.dtype)).sum(-1)  # (S,)
    gauge = (count / K)[:, None, None] * torch.ones(K, K, dtype=x.dtype, device=x.device)
    sel = lambda t, i: None if t is None else t[i]  # noqa: E731
    for flag in (True, False):
        i = (hard == flag).nonzero().squeeze(-1)
        if len(i) == 0:
            continue
        xi, fi = x[i], Mixture(*(t[i] for t in fit))
        fz, b = frozen[i], rhs[i]
        if flag:
            blocks, logits = gmm_hessian_blocks(xi, *fi, sel(mask, i))
            blocks[..., 1, :] = blocks[..., 1, :].masked_fill(fz.unsqueeze(-1), 0)
            blocks[..., :, 1] = blocks[..., :, 1].masked_fill(fz.unsqueeze(-1), 0)
            blocks[..., 1, 1] = blocks[..., 1, 1].masked_fill(fz, -1)
            lam_x, vec_x = torch.linalg.eigh(blocks)  # (s, K, D, 2), (s, K, D, 2, 2)
            lam_a, vec_a = torch.linalg.eigh(logits - gauge[i])
            cut = _cutoff(torch.cat([lam_x.flatten(1), lam_a], -1))
            wx = _eig_solve(lam_x, vec_x, b[:, :P].reshape(-1, K, D, 2), cut[:, None, None, None])
            wa = _eig_solve(lam_a, vec_a, b[:, P:], cut[:, None])
            out[i] = torch.cat([wx.reshape(-1, P), wa], -1)
        else:
            h = gmm_hessian(xi, *fi, sel(mask, i))
            drop = torch.cat([torch.stack([torch.zeros_like(fz), fz], -1).reshape(-1, P),
                              torch.zeros(len(i), K, dtype=torch.bool, device=x.device)], -1)  # fmt: skip
            h = h.masked_fill(drop.unsqueeze(-1) | drop.unsqueeze(-2), 0)
            h = h - torch.diag_embed(drop.to(h.dtype))
            h[:, P:, P:] -= gauge[i]
            lam, vec = torch.linalg.eigh(h)
            out[i] = _eig_solve(lam, vec, b, _cutoff(lam)[:, None])
    return out


class ImplicitGMM(torch.autograd.Function):
    """``fit_gmm`` as an autograd node: EM forward (no graph), implicit-function-theorem backward."""

    @staticmethod
    def forward(ctx, x, mask, n_components, em_steps, min_scale, fixed_scale, hard_tol):
        with torch.no_grad():
            fit = em_fit(x, n_components, em_steps, min_scale, mask, fixed_scale)
        ctx.save_for_backward(x, mask, *fit)
        ctx.min_scale, ctx.fixed_scale, ctx.hard_tol = min_scale, fixed_scale, hard_tol
        return fit.weights, fit.means, fit.scales

    @staticmethod
    def backward(ctx, g_weights, g_means, g_scales):
        with full_precision(ctx.saved_tensors[0]):  # the eigensolve and the solve in float32, autocast or not
            return ImplicitGMM._backward(ctx, g_weights, g_means, g_scales)

    @staticmethod
    def _backward(ctx, g_weights, g_means, g_scales):
        x, mask, weights, means, scales = ctx.saved_tensors
        fit = Mixture(weights, means, scales)
        S, K, D = means.shape
        zeros = torch.zeros_like
        g_weights = zeros(weights) if g_weights is None else g_weights
        g_means = zeros(means) if g_means is None else g_means
        g_scales = zeros(scales) if g_scales is None else g_scales
        if ctx.fixed_scale is not None:
            frozen = torch.ones_like(scales, dtype=torch.bool)
        else:  # clamped at the floor: an active constraint, held fixed (float rounding of sqrt(min²) aside)
            frozen = scales <= ctx.min_scale * (1 + 4 * torch.finfo(x.dtype).eps)
        # VJPs of v = softmax(a) and σ = exp(s): gradients w.r.t. the unconstrained coordinates
        g_a = weights * (g_weights - (weights * g_weights).sum(-1, keepdim=True))
        g_s = (g_scales * scales).masked_fill(frozen, 0)
        rhs = torch.cat([torch.stack([g_means, g_s], -1).reshape(S, -1), g_a], -1)
        tol = torch.finfo(x.dtype).eps if ctx.hard_tol is None else ctx.hard_tol
        hard = _softness(x, fit, mask) <= tol
        w = implicit_solve(x, fit, rhs, frozen, mask, hard)
        w_x = w[:, : 2 * K * D].reshape(S, K, D, 2)
        w_a = w[:, 2 * K * D :]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            a = weights.log().detach().requires_grad_(True)
            m = means.detach().requires_grad_(True)
            s = scales.log().detach().requires_grad_(True)
            ll = log_likelihood_unconstrained(xg, a, m, s, mask).sum()
            da, dm, ds = torch.autograd.grad(ll, (a, m, s), create_graph=True)
            z = (da * w_a).sum() + (dm * w_x[..., 0]).sum() + (ds * w_x[..., 1]).sum()
            (g_x,) = torch.autograd.grad(z, xg)
        return -g_x, None, None, None, None, None, None


def fit_gmm(
    embeddings: Tensor,
    n_components: int,
    em_steps: int = 30,
    min_scale: float = 0.05,
    mask: Tensor | None = None,
    fixed_scale: float | None = None,
    hard_tol: float | None = None,
) -> Mixture:
    """Fit a diagonal Gaussian mixture to each of S sets by EM; differentiable by implicit differentiation.

    Args:
        embeddings: ``[S, N, D]``; each set needs at least ``n_components`` distinct observed elements.
        n_components: K.
        em_steps: EM iterations after the farthest-point initialisation. The gradient is exact at a
            stationary point of l: the fewer steps, the more it is the gradient of the limit, not of the
            returned (unconverged) fit.
        min_scale: floor on every σ_ij (a single element has σ = 0 and unbounded likelihood). A floored
            σ is an active constraint: its derivative is zero and the implicit system drops it.
        mask: ``[S, N]`` bool, True where an element is observed (sets of different sizes).
        fixed_scale: if given, every σ_ij is this constant and not fitted (the prototype baseline).
        hard_tol: a set whose responsibilities are all within ``hard_tol`` of 0/1 is solved with the
            block-diagonal Hessian (seed's Corollary); default the dtype's machine epsilon, so the
            neglected terms, of order r (1 - r), are at rounding level. ``-1`` forces the dense solve.

    Returns:
        :class:`Mixture` ``(weights [S, K], means [S, K, D], scales [S, K, D])``.

    Gradients w.r.t. ``embeddings`` come from the implicit function theorem at the returned fit, in the
    unconstrained coordinates (logits a, μ, log σ) where the stationarity conditions are F = ∇ l = 0: the
    backward pass solves H w = J_θᵀ ḡ and returns -∂(wᵀ F)/∂x (:class:`ImplicitGMM`,
    :func:`implicit_solve` for the softmax gauge). Nothing of the EM iterations is stored. Under
    ``torch.no_grad()`` it is plain EM.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [S, N, D], got shape {tuple(embeddings.shape)}")
    if n_components < 1 or em_steps < 0 or not min_scale > 0:
        raise ValueError(
            "need n_components >= 1, em_steps >= 0, min_scale > 0; "
            f"got {n_components}, {em_steps}, {min_scale}"
        )
    if mask is not None:
        mask = mask.to(device=embeddings.device, dtype=torch.bool)
    x = upcast(embeddings)  # under mixed precision: EM, the fit and its backward in float32
    with full_precision(x):
        return Mixture(*ImplicitGMM.apply(x, mask, n_components, em_steps, min_scale, fixed_scale, hard_tol))


# ------------------------------------------------------------------------------------------- retrieval


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of ranking each row of ``scores [B, Q]`` (higher first) against binary
    ``labels [B, Q]``: AP = (1/#pos) Σ_{k: label_k = 1} precision@k, ``[B]``. Ties keep query order
    (stable sort); a row without positives gives NaN."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    hits = labels.gather(-1, order).to(scores.dtype)
    rank = torch.arange(1, hits.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
    return (hits * hits.cumsum(-1) / rank).sum(-1) / hits.sum(-1)


class RetrievalMAP(Metric):
    """Mean over episodes of :func:`average_precision`; sum and count states, so W processes give the
    one-process value (RELIABILITY.md #22). Every episode lives whole on one process."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        ap = average_precision(scores.detach().double(), labels)
        self.total += ap.sum()
        self.count += ap.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


# ------------------------------------------------------------------------------------------------ model

Covariance = Literal["diagonal", "fixed"]


class Set2Model(L.LightningModule):
    """Set2Model network on episodes ``(sets [B, n, *shape], queries [B, Q, *shape], labels [B, Q])``
    (:class:`datamodules.Episodes`).

    embed: x -> f(x) ∈ R^E (the ``embedding`` role: an MLP preset, or the user's network). fit: a
    K-component diagonal mixture per set of embeddings (:func:`fit_gmm`). score: log p(f(q) | mixture),
    nats. Loss (the paper's): the mean over queries of the logistic loss of logit = α log p(f(q)) + β,
    α = exp(log α) > 0 and β learned, label 1 for a member of the set's class. Validation / test:
    ``val/loss`` (nats per query), ``val/map`` (retrieval mAP of the queries ranked by log-likelihood), and
    ``val/map_mean`` (the same embedding ranked by Euclidean distance to the set's mean, the prototype
    read-out, for a side-by-side number in every run).

    Args:
        shape: one image's shape (linked by the CLI from the datamodule).
        embedding_dim: E of the MLP preset. With an ``embedding`` given, E is its output width, read from
            a dry run (``embedding_dim`` is then ignored; :attr:`embedding_dim` holds the E in use).
        n_components: K mixture components per set.
        em_steps: EM iterations per fit (forward only; the backward pass does not depend on it).
        hidden: the MLP preset's hidden widths (ignored when ``embedding`` is given).
        lr: learning rate of the default optimiser (Adam); ignored when ``optimizer`` is given.
        covariance: ``"diagonal"`` fits σ per component and coordinate (floored at ``min_scale``);
            ``"fixed"`` holds σ = 1 (with ``n_components=1``: a prototypical network, the baseline).
        min_scale: floor on σ (embedding units).
        seed: for the preset's initial weights only (``torch.manual_seed`` around its construction).
        embedding: the ``embedding`` role, the user's network ``[B, *shape] -> [B, E]`` (checked on a
            dummy batch here; ``class_path`` / ``init_args`` in a recipe); None: the MLP preset
            (``hidden``, ``embedding_dim``). Its output is cast to float32 before the EM fit.
        optimizer: a callable ``params -> Optimizer`` (``OptimizerCallable``); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler`` (``LRSchedulerCallable``), stepped every
            optimizer step; None: a constant learning rate.

    Example:
        >>> own = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))  # [B, 1, 8, 8] -> [B, 8]
        >>> model = Set2Model(shape=(1, 8, 8), embedding=own)
        >>> model.embedding_dim, model.embed(torch.zeros(3, 5, 1, 8, 8)).shape
        (8, torch.Size([3, 5, 8]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        embedding_dim: int = 16,
        n_components: int = 2,
        em_steps: int = 20,
        hidden: Sequence[int] = (256, 256),
        lr: float = 1e-3,
        covariance: Covariance = "diagonal",
        min_scale: float = 0.1,
        seed: int = 0,
        embedding: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("embedding_dim", embedding_dim, 1), ("n_components", n_components, 1),
                                 ("em_steps", em_steps, 0), ("seed", seed, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if covariance not in ("diagonal", "fixed"):
            raise ValueError(f"covariance={covariance!r} is not allowed; choose 'diagonal' or 'fixed'")
        if not lr > 0 or not min_scale > 0:
            raise ValueError(f"lr and min_scale must be > 0, got lr={lr!r}, min_scale={min_scale!r}")
        self.save_hyperparameters(
            ignore=live_arguments(embedding=embedding, optimizer=optimizer, lr_scheduler=lr_scheduler)
        )
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        self.shape = tuple(shape)
        self._preset = embedding is None  # the MLP preset takes flattened images
        if embedding is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = mlp(numel(self.shape), tuple(hidden), embedding_dim)
            # No bias on the last layer: the loss is invariant to translating every embedding (the fitted
            # mixtures move along), so that bias would get a gradient of pure rounding noise, which Adam
            # normalises into steps of size lr (and 1 and 2 processes would drift apart).
            self.net[-1].register_parameter("bias", None)
        else:
            out = check_role("Set2Model", "embedding", embedding, [dummy_batch(self.shape, like=embedding)],
                             ("B", "E"), hint="One embedding vector per image. ")  # fmt: skip
            self.net, embedding_dim = embedding, int(out.shape[1])
        self.embedding_dim = embedding_dim
        # α starts at 1/E: a log-likelihood in E dimensions spreads over O(E) nats.
        self.log_alpha = nn.Parameter(torch.tensor(-math.log(embedding_dim)))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_map, self.test_map = RetrievalMAP(), RetrievalMAP()
        self.val_map_mean, self.test_map_mean = RetrievalMAP(), RetrievalMAP()

    def embed(self, x: Tensor) -> Tensor:
        """``[..., *shape] -> [..., E]``."""
        lead = x.shape[: x.ndim - len(self.shape)]
        flat = x.reshape(-1, numel(self.shape)) if self._preset else x.reshape(-1, *self.shape)
        return upcast(self.net(flat)).reshape(*lead, -1)

    def fit_embeddings(self, z: Tensor, mask: Tensor | None = None) -> Mixture:
        """:func:`fit_gmm` with this model's settings on embeddings ``[S, n, E]``."""
        fixed = 1.0 if self.hparams.covariance == "fixed" else None
        return fit_gmm(
            z, self.hparams.n_components, self.hparams.em_steps, self.hparams.min_scale, mask, fixed
        )

    def fit(self, set_x: Tensor, mask: Tensor | None = None) -> Mixture:
        """The mixture fitted to each set of images ``[S, n, *shape]`` (differentiable, implicitly)."""
        return self.fit_embeddings(self.embed(set_x), mask)

    def score(self, mixture: Mixture, queries: Tensor) -> Tensor:
        """log p(f(q) | mixture) in nats for images ``queries [S, Q, *shape]``, ``[S, Q]``."""
        z = self.embed(queries)
        with full_precision(z):
            log_joint = mixture.weights.log().unsqueeze(1) + component_log_density(
                z, mixture.means, mixture.scales
            )
            return torch.logsumexp(log_joint, -1)

    def logits(self, scores: Tensor) -> Tensor:
        return self.log_alpha.exp() * scores + self.bias

    def training_loss(self, batch) -> Tensor:
        """Mean logistic loss over the batch's queries (nats per query)."""
        sets, queries, labels = batch
        scores = self.score(self.fit(sets), queries)
        return binary_cross_entropy_with_logits(self.logits(scores), labels.to(scores.dtype))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        check_data(self, batch[0].flatten(0, 1), "real")  # the set images, [B * n, *shape]
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, loss_metric: MeanMetric, map_metric: RetrievalMAP, mean_metric: RetrievalMAP):
        sets, queries, labels = batch
        z_set, z_query = self.embed(sets), self.embed(queries)
        scores = self.score(self.fit_embeddings(z_set), queries)
        loss = binary_cross_entropy_with_logits(
            self.logits(scores), labels.to(scores.dtype), reduction="none"
        )
        loss_metric.update(loss.mean(-1), weight=loss.shape[-1])
        map_metric.update(scores, labels)
        mean_metric.update(-(z_query - z_set.mean(1, keepdim=True)).square().sum(-1), labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_map, self.val_map_mean)
        self.log("val/loss", self.val_loss)
        self.log("val/map", self.val_map, prog_bar=True)
        self.log("val/map_mean", self.val_map_mean)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_map, self.test_map_mean)
        self.log("test/loss", self.test_loss)
        self.log("test/map", self.test_map)
        self.log("test/map_mean", self.test_map_mean)

    def configure_optimizers(self):
        return configure_single(self, adam(self.hparams.lr))
