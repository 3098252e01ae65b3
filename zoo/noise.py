"""Noise that does not depend on how a batch is split across processes.

Under DDP each process sees a shard of the global batch. If every process drew its noise from its own
random stream, N processes would train a different (equally valid) model from one process on the same
data and seed, and nothing could be checked number for number. genzoo's datamodules shard a global batch
in DistributedSampler's interleaved order: the example at global position ``p`` lives on rank ``p % W``
at local position ``p // W``. The two functions below give every example the noise it would get in a
one-process run:

* :func:`global_normal` (training; every rank holds the same number of examples): every rank draws the
  noise of the whole global batch from one generator seeded by ``key`` and keeps its rows ``rank::W``.
  Costs one ``randn`` of the global batch, which is the cheapest exact choice.
* :func:`positional_normal` (evaluation, where the last shard may be shorter): a counter-based generator
  (SplitMix64 finaliser + Box-Muller) maps ``(key, global position, element)`` to a standard normal, so
  it needs no knowledge of the other ranks' batch sizes. Slower (~25 integer ops per number), so it is
  kept off the training hot path.

:func:`global_uniform` and :func:`positional_uniform` are their uniform twins (for Gumbel noise,
-log(-log U), in :mod:`zoo.discrete_vae`).

All are pure functions of ``key``: keying by ``(seed, global_step)`` makes a resumed run draw exactly the
noise of an uninterrupted one, with no generator state to checkpoint (RELIABILITY.md #10).

:func:`step_key` is the one place a family gets its training key. Under a Trainer it is that keying. Outside
one (a plain PyTorch loop, Fabric, a user's own module) ``global_step`` never moves, so keying by it would
hand every call the SAME noise and the model would overfit those draws, silently; there every call draws a
fresh key from torch's default generator instead, so successive calls differ and ``torch.manual_seed`` makes
them reproducible, as for any torch module. :func:`pinned_noise` keys it by a fixed step instead, for a
block of code that needs the same draws on every call (an L-BFGS closure, a comparison of two modules).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_MASK63 = (1 << 63) - 1


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mixer; wraps like uint64."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def mix_key(*parts: int) -> int:
    """Combine integers (seed, step, stream, ...) into one 63-bit key (SplitMix64 in Python ints)."""
    m64 = (1 << 64) - 1
    h = 0
    for part in parts:
        h = (h + (int(part) + 1) * 0x9E3779B97F4A7C15) & m64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m64
        h ^= h >> 31
    return h & _MASK63


def shard_of(module) -> tuple[int, int]:
    """``(rank, world_size)`` of a LightningModule's trainer, ``(0, 1)`` when it has none."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def attached(module) -> bool:
    """Whether ``module`` runs under a Lightning Trainer: its own, or its parent's when it is nested as a
    submodule of another LightningModule (Lightning hands the trainer down to child LightningModules)."""
    return getattr(module, "_trainer", None) is not None


def step_key(module, *stream: int) -> int:
    """The key of this training step's noise for ``stream`` (one integer or several).

    * Under a Trainer: ``mix_key(module.seed, *stream, module.global_step)``, a pure function of the step, so
      W processes draw together the noise of one and a resumed run the noise of an uninterrupted one.
    * Outside a Trainer: ``mix_key(module.seed, *stream, fresh)`` with ``fresh`` drawn from torch's default
      CPU generator on every call: new noise each call, reproducible under ``torch.manual_seed``.
    """
    pinned = getattr(module, "_pinned_step", None)
    if pinned is not None:
        return mix_key(module.seed, *stream, pinned)
    if attached(module):
        return mix_key(module.seed, *stream, module.global_step)
    fresh = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
    return mix_key(module.seed, *stream, fresh)


@contextlib.contextmanager
def pinned_noise(*modules, step: int = 0) -> Iterator[None]:
    """Within the block, each module's training noise is keyed as under a Trainer at ``global_step=step``:
    every call draws the same noise (e.g. an L-BFGS closure, which must see one objective; or an eager and a
    compiled copy compared number for number). Submodules are pinned too."""
    pinned = [m for module in modules for m in module.modules() if hasattr(m, "seed")]
    for m in pinned:
        m._pinned_step = int(step)
    try:
        yield
    finally:
        for m in pinned:
            m._pinned_step = None


def step_choice(module, n: int) -> int:
    """An index in ``range(n)`` for this training step: ``global_step mod n`` under a Trainer (e.g. MADE's
    mask set, cycled), uniform from torch's default generator on every call outside one."""
    pinned = getattr(module, "_pinned_step", None)
    if pinned is not None:
        return pinned % n
    if attached(module):
        return module.global_step % n
    return int(torch.randint(0, n, ()))


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> Tensor:
    """``torch.randn`` drawn in float32 whatever ``dtype`` asks for, then cast: a float64 run sees the same
    noise as a float32 one, so the two can be compared number for number."""
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def global_normal(
    batch: int,
    event_shape: tuple[int, ...],
    *,
    key: int,
    rank: int = 0,
    world: int = 1,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Standard normal noise ``[batch, *event_shape]`` for this rank's rows of a global batch.

    Requires every rank to hold ``batch`` examples (true for training shards, which DistributedSampler
    pads to equal size). Identical to ``randn(batch * world, ...)[rank::world]`` under one generator.
    """
    return _global_rows(torch.randn, batch, event_shape, key, rank, world, device, dtype)


def positional_normal(
    batch: int,
    event_shape: tuple[int, ...],
    *,
    key: int,
    rank: int = 0,
    world: int = 1,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Standard normal noise ``[batch, *event_shape]`` keyed by global position, for uneven shards.

    Element ``e`` of the example at global position ``p = rank + world * j`` is a function of
    ``(key, p, e)`` only: Box-Muller on two uniforms taken from the top 53 bits of SplitMix64 outputs.
    """
    n = math.prod(event_shape)
    uniform = _positional_uniform53(batch, 2 * n, key, rank, world, device)
    u1, u2 = uniform[:, :n], uniform[:, n:]
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return normal.to(dtype).reshape(batch, *event_shape)


def global_uniform(
    batch: int,
    event_shape: tuple[int, ...],
    *,
    key: int,
    rank: int = 0,
    world: int = 1,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Uniform noise on [0, 1) ``[batch, *event_shape]`` for this rank's rows of a global batch: the uniform
    twin of :func:`global_normal` (``torch.rand`` in float32, then cast), e.g. for Gumbel noise."""
    return _global_rows(torch.rand, batch, event_shape, key, rank, world, device, dtype)


def positional_uniform(
    batch: int,
    event_shape: tuple[int, ...],
    *,
    key: int,
    rank: int = 0,
    world: int = 1,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Uniform noise in (0, 1) ``[batch, *event_shape]`` keyed by global position: the uniform twin of
    :func:`positional_normal` (element ``e`` of global position ``p`` is the top 53 bits of SplitMix64 of
    ``(key, p, e)``), exact for uneven evaluation shards."""
    uniform = _positional_uniform53(batch, math.prod(event_shape), key, rank, world, device)
    return uniform.to(dtype).reshape(batch, *event_shape)


def _global_rows(draw, batch: int, event_shape, key: int, rank: int, world: int, device, dtype) -> Tensor:
    """This rank's rows of ``draw((batch * world, *event_shape))`` (``torch.randn`` or ``torch.rand``) under
    one generator seeded with ``key``, drawn in float32 whatever ``dtype`` asks for, then cast (as
    :func:`randn`)."""
    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed(key)
    noise = draw((batch * world, *event_shape), generator=generator, device=device, dtype=torch.float32)
    noise = noise.to(dtype)
    return noise[rank::world] if world > 1 else noise


def _positional_uniform53(batch: int, n: int, key: int, rank: int, world: int, device) -> Tensor:
    """``[batch, n]`` float64 uniforms in (0, 1), never 0: element ``e`` of the example at global position
    ``p = rank + world * j`` is the top 53 bits of SplitMix64 of counter ``p * n + e`` under ``key``."""
    position = rank + world * torch.arange(batch, device=device, dtype=torch.int64)
    counter = (position * n)[:, None] + torch.arange(n, device=device, dtype=torch.int64)
    bits = _splitmix((counter + 1) * _GOLDEN + key)
    return (_shr(bits, 11).to(torch.float64) + 0.5) / float(1 << 53)
