"""The multi-layer perceptron every family's vector presets are built from."""

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


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
