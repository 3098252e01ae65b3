"""Diffusion denoisers: ``net(x_t [B, *shape], t [B]) -> [B, out_channels, *shape[1:]]``, ``t`` the integer
timesteps 1..T (int64). The presets of :class:`zoo.Diffusion`'s ``denoiser`` role; any module with this
signature can take their place.

* :class:`MLPDenoiser`: for vectors (and any shape, flattened): x -> Linear, then per hidden layer
  SiLU(Linear(h) + W_i e(t)), then Linear, reshaped to ``out_shape``;
* :class:`UNet`: the DDPM U-Net of Ho, Jain & Abbeel (2020, appendix B) scaled down to two stride-2 levels,
  for images (C, H, W) of any channel count with H, W divisible by 4 (e.g. 16, 28, 32, 64: H -> H/2 -> H/4),
  built from :class:`ResBlock` and, optionally, one :class:`AttentionBlock` at the lowest resolution.

Both embed t with :func:`timestep_embedding` (sinusoidal, Vaswani et al. 2017) through a 2-layer SiLU MLP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from zoo.networks.basic import mlp

__all__ = ["AttentionBlock", "MLPDenoiser", "ResBlock", "UNet", "timestep_embedding"]

GROUPS = 8  # GroupNorm groups of the U-Net (fewer when a layer has fewer channels)


def timestep_embedding(t: Tensor, dim: int, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding of scaled timesteps ``t [B]`` -> ``[B, dim]`` (Vaswani et al. 2017; Ho et al.)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    angles = (t.float() * scale)[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(embedding, (0, dim % 2))


class MLPDenoiser(nn.Module):
    """MLP for vector data: x -> Linear, then per hidden layer SiLU(Linear(h) + W_i e(t)), then Linear.

    The time embedding e(t) is the sinusoidal embedding through a 2-layer MLP (as in Ho et al.'s U-Net).
    The output ``[B, out_dim]`` is reshaped to ``[B, *out_shape]`` when ``out_shape`` is given (its
    product must be ``out_dim``)."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        out_dim: int,
        t_scale: float,
        out_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if out_shape is not None and math.prod(out_shape) != out_dim:
            raise ValueError(f"out_shape {tuple(out_shape)} must hold out_dim={out_dim} values")
        width = hidden[0]
        self.t_scale, self.embed_dim = t_scale, width
        self.out_shape = (out_dim,) if out_shape is None else tuple(int(s) for s in out_shape)
        self.time = mlp(width, [width], width, activation=nn.SiLU)
        self.inp = nn.Linear(dim, width)
        sizes = [width, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.time_proj = nn.ModuleList(nn.Linear(width, b) for b in hidden)
        self.out = nn.Linear(hidden[-1], out_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = F.silu(self.time(timestep_embedding(t, self.embed_dim, self.t_scale).to(x.dtype)))  # (B, width)
        h = self.inp(x.flatten(1))
        for layer, proj in zip(self.layers, self.time_proj, strict=True):
            h = F.silu(layer(h) + proj(e))
        return self.out(h).reshape(x.shape[0], *self.out_shape)  # (B, *out_shape)


class ResBlock(nn.Module):
    """DDPM residual block: GN-SiLU-Conv, + Linear(e(t)), GN-SiLU-Conv, 1x1 skip when channels change."""

    def __init__(self, c_in: int, c_out: int, embed: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(embed, c_out)
        self.norm2, self.conv2 = (
            nn.GroupNorm(min(groups, c_out), c_out),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map with a residual (Ho et al., at 16x16)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv, self.proj = nn.Conv2d(channels, 3 * channels, 1), nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # (B, C, HW) each
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, appendix B) scaled down: one ResBlock per resolution H -> H/2 -> H/4
    (28 -> 14 -> 7, 32 -> 16 -> 8, ...; H and W divisible by 4) with ``channels`` = (c1, c2, c3), each a
    multiple of 8 (GroupNorm's groups), strided-conv down / nearest-up + conv up, skip connections by
    concatenation, GroupNorm, sinusoidal time embedding through a 2-layer MLP, and optionally one
    self-attention block at H/4 (the lowest resolution). Any ``in_channels`` / ``out_channels``."""

    def __init__(
        self, in_channels: int, channels: Sequence[int], out_channels: int, t_scale: float, attention: bool
    ) -> None:
        super().__init__()
        c1, c2, c3 = (list(channels) + [channels[-1]] * 3)[:3]
        embed, groups = 4 * c1, GROUPS
        self.t_scale, self.c1 = t_scale, c1
        self.time = mlp(c1, [embed], embed, activation=nn.SiLU)
        self.inp = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, embed, groups)  # H
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)  # H -> H/2
        self.down2 = ResBlock(c1, c2, embed, groups)  # H/2
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)  # H/2 -> H/4
        self.mid1 = ResBlock(c2, c3, embed, groups)  # H/4
        self.attn = AttentionBlock(c3, groups) if attention else nn.Identity()
        self.mid2 = ResBlock(c3, c3, embed, groups)
        self.up2 = nn.Conv2d(c3, c3, 3, padding=1)  # after H/4 -> H/2
        self.dec2 = ResBlock(c3 + c2, c2, embed, groups)
        self.up1 = nn.Conv2d(c2, c2, 3, padding=1)  # after H/2 -> H
        self.dec1 = ResBlock(c2 + c1, c1, embed, groups)
        self.out = nn.Sequential(
            nn.GroupNorm(min(groups, c1), c1), nn.SiLU(), nn.Conv2d(c1, out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = F.silu(self.time(timestep_embedding(t, self.c1, self.t_scale).to(x.dtype)))  # (B, 4 c1)
        h1 = self.down1(self.inp(x), e)  # (B, c1, H, W)
        h2 = self.down2(self.pool1(h1), e)  # (B, c2, H/2, W/2)
        h = self.mid2(self.attn(self.mid1(self.pool2(h2), e)), e)  # (B, c3, H/4, W/4)
        h = self.dec2(torch.cat([self.up2(F.interpolate(h, scale_factor=2.0)), h2], 1), e)  # (B, c2, H/2, ..)
        h = self.dec1(torch.cat([self.up1(F.interpolate(h, scale_factor=2.0)), h1], 1), e)  # (B, c1, H, W)
        return self.out(h)  # (B, out_channels, H, W)
