"""Shard-independent noise: N processes draw exactly the noise one process would."""

from __future__ import annotations

import torch

from zoo.noise import global_normal, mix_key, positional_normal


def test_global_normal_shards_reassemble_the_one_process_noise() -> None:
    full = global_normal(12, (3, 2), key=7)
    for world in (2, 3, 4):
        shards = [global_normal(12 // world, (3, 2), key=7, rank=r, world=world) for r in range(world)]
        for rank, shard in enumerate(shards):
            assert torch.equal(shard, full[rank::world])


def test_positional_normal_handles_uneven_shards() -> None:
    full = positional_normal(41, (5,), key=3)
    rank0 = positional_normal(21, (5,), key=3, rank=0, world=2)
    rank1 = positional_normal(20, (5,), key=3, rank=1, world=2)
    assert torch.equal(rank0, full[0::2]) and torch.equal(rank1, full[1::2])


def test_positional_normal_is_standard_normal() -> None:
    z = positional_normal(20_000, (50,), key=11).double().flatten()  # 1e6 numbers
    se = 1 / 1000
    assert abs(z.mean()) < 4 * se
    assert abs(z.var() - 1) < 4 * (2**0.5) * se
    assert abs((z**4).mean() - 3) < 4 * (96**0.5) * se
    # neighbouring positions and keys are uncorrelated
    a, b = positional_normal(20_000, (2,), key=1), positional_normal(20_000, (2,), key=2)
    assert abs(torch.corrcoef(torch.stack([a[:, 0], a[:, 1], b[:, 0]]))[0, 1:]).max() < 0.03


def test_keys_differ_and_are_deterministic() -> None:
    assert mix_key(0, 1) == mix_key(0, 1)
    assert len({mix_key(0, s) for s in range(1000)}) == 1000
    assert 0 <= mix_key(2**40, -5) < 2**63
