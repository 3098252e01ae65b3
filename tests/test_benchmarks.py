"""The benchmark scripts still run: each one, cut to a few steps, exits 0 and writes the JSON its README
section reads (their numbers at these sizes mean nothing; tests assert numbers elsewhere). They read their
recipes from configs/ through benchmarks/recipes.py, so a renamed option or config breaks them here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

RUNS = {
    "flows": ["flows.py", "--epochs", "1", "--transforms", "maf", "--data", "8gaussians"],
    "gan_8gaussians": ["gan_8gaussians.py", "--epochs", "1"],
    "diffusion": ["diffusion.py", "--epochs", "1", "--n_eval", "64", "--n_samples", "500", "--threads", "1"],
    "vae_overhead": ["vae_overhead.py", "--epochs", "2", "--repeats", "1"],
    "bits_per_dim_mnist": ["bits_per_dim_mnist.py", "--steps", "2", "--test_batches", "1"],
    "diffusion_mnist": ["diffusion_mnist.py", "--steps", "2", "--terms", "1", "--curve_every", "1",
                        "--curve_images", "8", "--test_images", "32", "--threads", "1"],
}  # fmt: skip
KEYS = {
    "flows": {"machine", "runs"},
    "gan_8gaussians": {"per_epoch", "first_epoch_at_8_modes_and_90pct"},
    "diffusion": {"kl_bound_nats", "samples_10k"},
    "vae_overhead": {"median", "best", "epoch_s_per_run"},
    "diffusion_mnist": {"test_bpd", "test_bpd_se", "curve", "optimizer_steps"},
    "bits_per_dim_mnist": {"data", "rows"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_writes_its_json(name: str, tmp_path: Path) -> None:
    if name in ("diffusion_mnist", "bits_per_dim_mnist") and not MNIST.exists():
        pytest.skip("../shared/data/mnist is absent")
    out = tmp_path / "out.json"
    script, *args = RUNS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert KEYS[name] <= set(written), sorted(written)
    if name == "diffusion_mnist":
        assert written["optimizer_steps"] == 2 and out.with_suffix(".png").exists()
    if name == "bits_per_dim_mnist":
        assert [row["family"] for row in written["rows"][:2]] == ["VAE", "Flow"]
        assert all(row["test_bpd"] > 0 for row in written["rows"])
