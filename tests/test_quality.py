"""ModeCoverage: hand-counted samples, the exact-sample rate 1 - exp(-9/2), shard merging, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks import ModeCoverage
from callbacks.quality import mode_coverage
from datamodules import Toy2D

RING = Toy2D("8gaussians").centers  # radius 2, std 0.02: high quality within 0.06


def hand_made() -> torch.Tensor:
    """3 good samples at mode 0, 2 at mode 2, 1 at 0.07 from mode 1 (not good), 1 at the origin (not good)."""
    c = RING.double()
    return torch.stack([
        c[0] + torch.tensor([0.05, 0.0], dtype=torch.float64),
        c[0] + torch.tensor([0.0, -0.03], dtype=torch.float64),
        c[0],
        c[2] + torch.tensor([0.02, 0.02], dtype=torch.float64),
        c[2] - torch.tensor([0.0, 0.059], dtype=torch.float64),
        c[1] + torch.tensor([0.07, 0.0], dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
    ])  # fmt: skip


def test_hand_made_samples_give_the_counted_numbers() -> None:
    out = mode_coverage(hand_made(), RING, std=0.02)
    assert out["counts"].tolist() == [3, 0, 2, 0, 0, 0, 0, 0]
    assert int(out["modes_covered"]) == 2
    assert float(out["high_quality"]) == pytest.approx(5 / 7, abs=1e-12)
    metric = ModeCoverage(RING, std=0.02)
    metric.update(hand_made())
    values = metric.compute()
    assert int(values["modes_covered"]) == 2 and float(values["high_quality"]) == pytest.approx(
        5 / 7, abs=1e-12
    )


def test_min_count_and_the_boundary_at_exactly_n_std() -> None:
    out = mode_coverage(hand_made(), RING, std=0.02, min_count=3)
    assert int(out["modes_covered"]) == 1  # only mode 0 has 3 good samples
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    on_edge = torch.tensor([[1.5, 0.0], [0.0, 1.5000001]])  # exactly 3 * 0.5, then just outside
    assert mode_coverage(on_edge, centers, std=0.5)["counts"].tolist() == [1, 0]
    assert mode_coverage(on_edge, centers, std=0.5, n_std=4.0)["counts"].tolist() == [2, 0]


def test_exact_samples_are_high_quality_at_the_chi_rate() -> None:
    """Exact draws of the ring: P(||x - μ|| <= 3σ) = 1 - exp(-9/2) = 0.98889 for a 2-D isotropic Gaussian;
    n = 40,000 gives a binomial standard error of 5.2e-4, the tolerance is 4 of them."""
    n = 40_000
    data = Toy2D("8gaussians")
    out = mode_coverage(data.sample(n, torch.Generator().manual_seed(0)), data.centers, data.std)
    expected = 1 - math.exp(-4.5)
    se = math.sqrt(expected * (1 - expected) / n)
    assert int(out["modes_covered"]) == 8
    assert float(out["high_quality"]) == pytest.approx(expected, abs=4 * se)


def test_shards_merge_to_the_value_of_their_union() -> None:
    """Sum states: merging uneven shards (as DDP's sum reduction does) equals one metric over all samples."""
    samples = Toy2D("25gaussians").sample(1001, torch.Generator().manual_seed(1)) * 1.02
    centers = Toy2D("25gaussians").centers
    whole = ModeCoverage(centers, std=0.05)
    whole.update(samples)
    shards = [ModeCoverage(centers, std=0.05) for _ in range(3)]
    for i, shard in enumerate(shards):
        for chunk in samples[i::3].split(100):
            shard.update(chunk)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge_state(shard)
    a, b = whole.compute(), merged.compute()
    assert torch.equal(a["modes_covered"], b["modes_covered"])
    assert torch.equal(a["high_quality"], b["high_quality"])
    assert 0 < float(a["high_quality"]) < 1  # the scaling by 1.02 pushes the outer modes' samples out


def test_reset_forgets_earlier_samples() -> None:
    metric = ModeCoverage(RING, std=0.02)
    metric.update(hand_made())
    metric.reset()
    metric.update(RING[:1])
    assert int(metric.compute()["modes_covered"]) == 1 and float(metric.compute()["high_quality"]) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(centers=torch.zeros(3), std=0.1), r"\[M, D\] tensor"),
        (dict(centers=RING, std=0.0), "std must be positive; got 0.0"),
        (dict(centers=RING, std=0.1, n_std=-1.0), "n_std must be positive"),
        (dict(centers=RING, std=0.1, min_count=0), "min_count must be a positive integer; got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ModeCoverage(**kwargs)


def test_samples_of_the_wrong_dimension_are_refused() -> None:
    with pytest.raises(ValueError, match="samples have dimension 3, the centers 2"):
        ModeCoverage(RING, std=0.02).update(torch.zeros(4, 3))


def _rank_worker(rank: int, world: int, store: str, samples: torch.Tensor, centers: torch.Tensor, out: str):
    # A file store, not a TCP port: a port picked free here can be taken by another test's processes before
    # rank 0 binds it (this test failed that way once on a busy machine).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        metric = ModeCoverage(centers, std=0.02)
        for chunk in samples[rank::world].split(64):  # rank 0 holds 501 samples, rank 1 holds 500
            metric.update(chunk)
        values = metric.compute()  # all-gathers the sum states
        torch.save({k: v.clone() for k, v in values.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_with_uneven_shards_give_the_one_process_numbers(tmp_path) -> None:
    """A real process group (gloo, 2 ranks, uneven shards): every rank's compute() equals the metric over
    all samples on one process."""
    data = Toy2D("8gaussians")
    samples = data.sample(1001, torch.Generator().manual_seed(3))
    samples[::7] += 0.1  # some samples leave their mode
    samples[:125] = data.centers[0]  # mode 0 crowded, so the counts differ per mode
    one = ModeCoverage(data.centers, std=data.std)
    one.update(samples)
    expected = one.compute()
    out = str(tmp_path / "values")
    args = (2, str(tmp_path / "store"), samples, data.centers, out)
    mp.start_processes(_rank_worker, args=args, nprocs=2, start_method="spawn")
    for rank in range(2):
        values = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.equal(values["modes_covered"], expected["modes_covered"])
        assert torch.equal(values["high_quality"], expected["high_quality"])
    assert 0.5 < float(expected["high_quality"]) < 0.95 and int(expected["modes_covered"]) == 8
