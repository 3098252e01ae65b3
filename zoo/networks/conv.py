"""DCGAN-style convolutional presets for images of any channel count and H = W in {16, 28, 32, 64}.

An encoder halves the side with stride-2 4x4 convolutions (Radford, Metz & Chintala 2016) until it reaches
the base grid (4x4; 7x7 for 28x28 images), doubling the width each time; a linear layer maps the flattened
grid to features. The decoder mirrors it: a linear layer to the base grid, then stride-2 4x4 transposed
convolutions. Without batch normalisation: R1 / R2 need each example's own input gradient, and a VAE's
bound must not depend on the other examples of its batch.

=========  ==========  ===============================  ====================
side       base grid   encoder widths (width = w)       levels (stride-2)
=========  ==========  ===============================  ====================
16         4x4         w, 2w                            2
28         7x7         w, 2w                            2
32         4x4         w, 2w, 4w                        3
64         4x4         w, 2w, 4w, 8w                    4
=========  ==========  ===============================  ====================

The 28x28 networks are the ones genzoo had before the other sizes, layer for layer (so MNIST recipes and
their checkpoints are unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

CONV_SIDES: tuple[int, ...] = (16, 28, 32, 64)
_LEVELS = {16: 2, 28: 2, 32: 3, 64: 4}


def is_conv_image(shape: Sequence[int]) -> bool:
    """Whether the conv presets build for ``shape``: ``(C, H, W)`` with H = W in :data:`CONV_SIDES`."""
    return len(shape) == 3 and shape[1] == shape[2] and shape[1] in _LEVELS


def check_conv_image(shape: Sequence[int], option: str, fallback: str) -> None:
    """Raise a ``ValueError`` naming ``option`` (e.g. ``"decoder='conv'"``) and ``fallback`` when the conv
    presets do not build for ``shape``."""
    if not is_conv_image(shape):
        sides = ", ".join(map(str, CONV_SIDES))
        raise ValueError(
            f"{option} needs images of shape (C, H, W) with H = W in {{{sides}}}; got shape={tuple(shape)}. "
            f"Use {fallback}, or pass your own network."
        )


def conv_levels(shape: Sequence[int]) -> tuple[int, int]:
    """``(number of stride-2 levels, side of the base grid)`` for an image ``shape``."""
    levels = _LEVELS[shape[1]]
    return levels, shape[1] // 2**levels


def conv_encoder(shape: Sequence[int], out_features: int, width: int = 32) -> nn.Sequential:
    """``(C, H, W) -> out_features``: stride-2 convolutions (w, 2w, 4w, ...) to the base grid, then a linear
    layer. For 28x28: 28 -> 14 -> 7, widths w and 2w."""
    levels, base = conv_levels(shape)
    layers: list[nn.Module] = []
    channels = shape[0]
    for i in range(levels):
        layers += [nn.Conv2d(channels, width * 2**i, 4, 2, 1), nn.ReLU()]
        channels = width * 2**i
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * base * base, out_features))


def conv_decoder(in_features: int, shape: Sequence[int], width: int = 32) -> nn.Sequential:
    """``in_features -> (C * H * W,)`` flat: a linear layer to the base grid at the widest width, then
    stride-2 transposed convolutions halving the width, the last one to C channels."""
    levels, base = conv_levels(shape)
    top = width * 2 ** (levels - 1)
    layers: list[nn.Module] = [nn.Linear(in_features, top * base * base), nn.ReLU()]
    layers.append(nn.Unflatten(1, (top, base, base)))
    channels = top
    for i in reversed(range(levels)):
        out = shape[0] if i == 0 else width * 2 ** (i - 1)
        layers.append(nn.ConvTranspose2d(channels, out, 4, 2, 1))
        if i > 0:
            layers.append(nn.ReLU())
        channels = out
    return nn.Sequential(*layers, nn.Flatten())
