"""The contract of a network given to a family: checked once, when the family is built.

A family names each network it takes by its role (``encoder``, ``decoder``, ``generator``, ``discriminator``,
``critic``, ``denoiser``, ``energy``, ``embedding``, ``flow``) and the shapes that role must map. A network
that breaks the contract fails in the family's constructor, on a dummy batch of two, with an error naming the
family, the role, the input, the shape it must return and the shape it returned: not three layers deep in the
first training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Dim = int | str  # an exact size, or a name for any size ("B" is the batch)
DRY_RUN_BATCH = 2


def dummy_batch(shape: Sequence[int], like: nn.Module | None = None) -> Tensor:
    """``[2, *shape]`` of 0.5: a value inside every likelihood's support (pixels in [0, 1], reals)."""
    parameter = next(like.parameters(), None) if like is not None else None
    device = parameter.device if parameter is not None else None
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.full((DRY_RUN_BATCH, *shape), 0.5, device=device, dtype=dtype)


def describe(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _matches(actual: Sequence[int], expected: Sequence[Dim]) -> bool:
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected, strict=True):
        if e == "B":
            if a != DRY_RUN_BATCH:
                return False
        elif isinstance(e, int) and a != e:
            return False
    return True


def check_role(
    family: str,
    role: str,
    network: nn.Module,
    inputs: Sequence[Tensor],
    *expected: Sequence[Dim],
    hint: str = "",
    name: str | None = None,
) -> Tensor:
    """Run ``network(*inputs)`` once (no gradients, eval mode, then the mode restored) and check that its
    output has one of the ``expected`` shapes (``"B"`` = the dummy batch of 2, other names = any size).
    Returns the output, so the family can read free sizes from it (e.g. an encoder's feature width F).

    Raises ``ValueError`` naming the family, the role, the network (``name``, default its class name), the
    input shapes, what the role must return and what the network returned (or the exception it raised).
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"{family}: {role} must be a torch.nn.Module; got {type(network).__name__}")
    name = name or type(network).__name__
    given = ", ".join(describe(("B", *t.shape[1:])) for t in inputs)
    must = " or ".join(describe(e) for e in expected)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(*inputs)
    except Exception as error:
        raise ValueError(
            f"{family}: the {role} ({name}) failed on a dummy input {given} (B = "
            f"{DRY_RUN_BATCH}); it must map {given} to {must}. {hint}"
            f"It raised {type(error).__name__}: {error}"
        ) from error
    finally:
        network.train(was_training)
    if not isinstance(out, Tensor) or not any(_matches(out.shape, e) for e in expected):
        got = describe(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{family}: the {role} ({name}) must map {given} to {must} (B = "
            f"{DRY_RUN_BATCH} here); it returned {got}. {hint}".rstrip()
        )
    return out
