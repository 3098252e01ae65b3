"""Shared networks: MLPs for vectors and small images, DCGAN-style convolutions for 28x28 images.

Families import these; none defines its own copy. Every builder maps flat features to flat features so a
family only reshapes at its two ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

from torch import nn


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation=nn.ReLU) -> nn.Sequential:
    """``in -> hidden[0] -> ... -> out`` with ``activation`` between layers (none after the last)."""
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def is_28x28_image(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and tuple(shape[1:]) == (28, 28)


def conv_encoder(shape: Sequence[int], out_features: int, width: int = 32) -> nn.Sequential:
    """``(C, 28, 28) -> out``: two stride-2 convolutions (28 -> 14 -> 7), then a linear layer."""
    channels = shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1),  # (B, w, 14, 14)
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, 2, 1),  # (B, 2w, 7, 7)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, out_features),
    )


def conv_decoder(in_features: int, shape: Sequence[int], width: int = 32) -> nn.Sequential:
    """``in -> (C * 28 * 28,)``: a linear layer to 7x7 maps, then two stride-2 transposed convolutions."""
    channels = shape[0]
    return nn.Sequential(
        nn.Linear(in_features, 2 * width * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (2 * width, 7, 7)),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1),  # (B, w, 14, 14)
        nn.ReLU(),
        nn.ConvTranspose2d(width, channels, 4, 2, 1),  # (B, C, 28, 28)
        nn.Flatten(),
    )


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
