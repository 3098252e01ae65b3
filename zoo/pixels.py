"""Pixel conventions for likelihoods on discrete data: dequantisation and bits per dimension.

genzoo's image datamodules yield ``x = k / (L - 1)`` in [0, 1] for integer levels ``k`` in ``0 .. L-1`` and
say how many levels ``L`` the data had (their ``levels``: 256 for 8-bit images, 2 for binarised data, None for
continuous data). A likelihood family is handed the same ``levels`` (linked by the CLI) and reports its
negative log-likelihood of the DISCRETE data in bits per dimension, the unit of the published tables
(PixelCNN, van den Oord et al. 2016; RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018; DDPM, Ho et al.
2020):

.. math::  \\mathrm{bpd}(x) = -\\log_2 P(k) / D, \\qquad D = \\text{number of dimensions}.

* A **discrete** likelihood (Bernoulli on binary data, the categorical of MADE / PixelCNN, the discretised
  Gaussian decoder of diffusion) gives log P(k) itself: bpd = -log P / (D ln 2).
* A **continuous** density p(y) (flows, Gaussian-likelihood VAEs) is trained and evaluated on
  **uniformly dequantised** data (Uria et al. 2013; Theis, van den Oord & Bethge 2016, sec. 3.1): each level
  ``x = k / (L - 1)`` becomes a draw from its cell of width ``h = 1 / (L - 1)`` centred on it,
  y = x + (u - 1/2) h, u ~ U[0, 1)^D. The model of the discrete data is P(k) = ∫_cell p(y) dy, and by
  Jensen's inequality

  .. math::  \\log P(k) = \\log \\mathbb{E}_u[p(x + (u - 1/2) h)] + D \\log h
             \\ge \\mathbb{E}_u[\\log p(y)] - D \\log (L - 1),

  so bpd = (-log p(y) / D + log (L - 1)) / ln 2 is an upper bound on the discrete model's bits/dim, the
  number RealNVP and Glow report. RealNVP writes the same cells as y = (k + u) / L in [0, 1); the two
  coordinates differ by an affine map whose log-determinant cancels the change of cell volume, so the
  bits/dim are the same number. genzoo centres the cells on the datamodule's values so that the diagnostics,
  which see undequantised batches, evaluate a density at the middle of each cell, not on its edge. (A
  uniform density on the D cells' union, [-h/2, 1 + h/2]^D, scores exactly log2 L = 8 bits/dim on 8-bit data,
  which is also the uniform categorical's value: the test of the convention.)

All log-likelihoods go in in nats, per example (the families' unit); ``dims`` is D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.noise import global_uniform, mix_key, positional_uniform, shard_of, step_key


def check_levels(levels: int | None, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``levels`` is None or an integer >= 2."""
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 2):
        raise ValueError(
            f"{owner}: levels={levels!r} is not a number of discrete data levels; give an integer >= 2 "
            "(256 for 8-bit images, 2 for binary data) or None for continuous data"
        )


def dequantize(x: Tensor, levels: int, u: Tensor) -> Tensor:
    """Uniform dequantisation: ``x = k / (L - 1)`` -> ``y = x + (u - 1/2) / (L - 1)``, for ``u`` in [0, 1).

    A uniform draw from the cell of width 1 / (L - 1) centred on each level, in ``x``'s dtype.
    """
    return x + (u.to(x.dtype) - 0.5) / (levels - 1)


def bits_per_dim(log_p: Tensor, dims: int, levels: int | None = None, dequantized: bool = False) -> Tensor:
    """Bits per dimension of log-likelihoods ``log_p`` (nats per example) of ``dims``-dimensional data.

    ``dequantized=False``: ``log_p`` is the log-probability of the discrete data; bpd = -log_p / (D ln 2).
    ``dequantized=True``: ``log_p`` is a continuous density at the dequantised
    ``y = x + (u - 1/2) / (levels - 1)`` (:func:`dequantize`); bpd = (-log_p / D + ln(levels - 1)) / ln 2, the
    discretisation-corrected value (module docstring).
    """
    per_dim = -log_p / dims
    if dequantized:
        if levels is None:
            raise ValueError("bits_per_dim of a dequantised density needs the number of levels")
        per_dim = per_dim + math.log(levels - 1)
    return per_dim / math.log(2.0)


def dequantize_train(module, x: Tensor, levels: int, stream: int) -> Tensor:
    """:func:`dequantize` with this training step's noise: keyed by ``(seed, stream, global_step)`` under a
    Trainer and drawn for the GLOBAL batch (so W processes dequantise as one), fresh outside one
    (:func:`zoo.noise.step_key`)."""
    rank, world = shard_of(module)
    u = global_uniform(
        x.shape[0], x.shape[1:], key=step_key(module, stream), rank=rank, world=world, device=x.device,
        dtype=x.dtype,
    )  # fmt: skip
    return dequantize(x, levels, u)


def dequantize_eval(module, x: Tensor, levels: int, stream: int, batch_idx: int) -> Tensor:
    """:func:`dequantize` with evaluation noise keyed by ``(module.seed, stream, batch_idx)`` and each
    example's global position, so uneven evaluation shards on W processes see the one-process noise."""
    rank, world = shard_of(module)
    key = mix_key(module.seed, stream, batch_idx)
    u = positional_uniform(
        x.shape[0], x.shape[1:], key=key, rank=rank, world=world, device=x.device, dtype=x.dtype
    )
    return dequantize(x, levels, u)


def to_logit(x: Tensor, levels: int, alpha: float) -> tuple[Tensor, Tensor]:
    """RealNVP's logit space for dequantised pixels (Dinh et al. 2017, sec. 4.1): ``x [B, D]`` on the cells'
    union [-h/2, 1 + h/2] (h = 1 / (levels - 1)) -> ``z = logit(s)``, ``s = alpha + (1 - 2 alpha) x'`` with
    ``x' = (x + h/2) / (1 + h)`` in [0, 1] (RealNVP's (k + u) / 256). Returns ``(z, log|det dz/dx|)``, the
    log-determinant summed over D, ``[B]``:

    .. math::  \\log|dz/dx| = \\sum_d [\\log((1 - 2\\alpha) / (1 + h)) - \\log s_d - \\log(1 - s_d)].

    A density q(z) is then the density q(z) |dz/dx| of the pixels: bits/dim include the transform.
    """
    h = 1.0 / (levels - 1)
    s = alpha + (1 - 2 * alpha) * (x + h / 2) / (1 + h)
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    log_det = math.log((1 - 2 * alpha) / (1 + h)) - log_s - log_1ms
    return log_s - log_1ms, log_det.sum(-1)


def from_logit(z: Tensor, levels: int, alpha: float) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`to_logit`: ``z [B, D]`` -> ``(x, log|det dx/dz|)`` (= -log|det dz/dx| at x)."""
    h = 1.0 / (levels - 1)
    s = torch.sigmoid(z)
    x = (s - alpha) / (1 - 2 * alpha) * (1 + h) - h / 2
    log_det = (
        torch.nn.functional.logsigmoid(z)
        + torch.nn.functional.logsigmoid(-z)
        - math.log((1 - 2 * alpha) / (1 + h))
    )
    return x, log_det.sum(-1)


def check_logit_alpha(alpha: float | None, owner: str) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``alpha`` is None or in (0, 1/2)."""
    if alpha is not None and not 0 < alpha < 0.5:
        raise ValueError(f"{owner}: logit_alpha={alpha!r} must lie in (0, 0.5) (RealNVP: 0.05), or be None")
