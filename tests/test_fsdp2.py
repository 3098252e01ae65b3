"""Sharded training (``--trainer.strategy fsdp2``, zoo/sharding.py): every family on 2 gloo processes under
FSDP2 gives the weights and logged numbers of the DDP run of the same recipe, a sharded run resumes bit for
bit, and its checkpoint loads, samples and tests in one process.

One 2-process job (tests/fsdp2_launch.py) trains every run under ``ddp`` and then under ``fsdp2``, a few
steps each: the adversarial hard cases (R1, R2 with ``n_critic = 2``, EMA, user networks, the f-GAN, the
Dirac-GAN), the eigenvalue tracker's Jacobian- and Hessian-vector products, the ELBO-gap monitor's
refinement, the divergence estimator's refitted critic, Set2Model's implicit backward, a rank-0
``SampleGrid``, and every other family. Tolerance: that of the DDP parity tests (atol 1e-6, rtol 1e-5 on
weights, 1e-4 on logged values); on this machine the two strategies agreed bit for bit (gloo averages 2
gradients in the same order either way).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import ROOT, cli_env
from fsdp2_launch import RUNS

from zoo import GAN

# the sharded units each run must have (parameter-name prefixes); [] = nothing to shard (all replicated)
SHARDED = {
    "gan_r1": ["generator.", "discriminator."],
    "gan_r2_ncritic": ["generator.", "discriminator."],
    "gan_ema": ["generator.", "discriminator."],
    "gan_user_networks_r1": ["generator.", "discriminator."],
    "gan_eigen": ["generator.", "discriminator."],
    "gan_divergence": ["generator.", "discriminator."],
    "fgan_kl_dv_r1": ["generator.", "critic."],
    "dirac_gan_r1": [],  # three scalars: fully_shard cannot split a 0-d tensor
    "vae_full": ["encoder.", "decoder.", "posterior_head."],
    "vae_elbo_gap_refined": ["encoder.", "decoder.", "posterior_head."],
    "vae_user_networks": ["encoder.", "decoder.", "posterior_head."],
    "vae_hessian": ["encoder.", "decoder.", "posterior_head."],
    "discrete_vae_gumbel_k3": ["encoder.", "decoder."],
    "diffusion_mlp_hybrid": ["net."],
    "made_2_orderings": ["layers.0.", "layers.1."],
    "pixelcnn": ["input_layer.", "blocks.0.", "head."],
    "flow_maf": ["layers.0.hyper.", "layers.3.hyper."],  # zuko: the hyper-networks, not the lazy layers
    "flow_planar_reverse": ["layers.0.w", "layers.7.u"],
    "nce_mlp": ["energy_net."],
    "nce_clipped": ["energy_net."],  # gradient_clip_val over a sharded network and a replicated scalar
    "gan_clipped": ["generator.", "discriminator."],  # clip_norm in manual optimisation
    "explicit_gaussian_natural": [],  # a mean and a Cholesky factor, no network
    "set2model": ["net."],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The job's output folder and its stderr (each test reads its own files, so one broken run fails its
    own tests only)."""
    out = tmp_path_factory.mktemp("fsdp2")
    command = [sys.executable, str(ROOT / "tests" / "fsdp2_launch.py"), "ddp,fsdp2", str(out)]
    result = subprocess.run(command, cwd=out, env=cli_env(), capture_output=True, text=True, timeout=900)
    return out, result.stderr


def load(runs: tuple[Path, str], strategy: str, name: str) -> dict:
    out, stderr = runs
    path = out / strategy / f"{name}.pt"
    if not path.exists():
        pytest.fail(f"{strategy} run {name} wrote nothing:\n{stderr[-4000:]}")
    return torch.load(path, weights_only=True)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_every_family_trains_under_fsdp2_to_the_ddp_numbers(runs: tuple[Path, str], name: str) -> None:
    ddp, fsdp2 = load(runs, "ddp", name), load(runs, "fsdp2", name)
    assert ddp["steps"] == fsdp2["steps"] == RUNS[name].steps
    assert ddp["state"].keys() == fsdp2["state"].keys()
    for key, value in ddp["state"].items():
        torch.testing.assert_close(fsdp2["state"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert ddp["metrics"].keys() == fsdp2["metrics"].keys() and ddp["metrics"]
    for key, value in ddp["metrics"].items():
        assert abs(fsdp2["metrics"][key] - value) <= 1e-4, key
    # it was sharded (DDP shards nothing), each expected unit, and the weights moved from the start
    assert ddp["sharded"] == []
    for prefix in SHARDED[name]:
        assert any(n.startswith(prefix) for n in fsdp2["sharded"]), (prefix, fsdp2["sharded"])
    if not SHARDED[name]:
        assert fsdp2["sharded"] == []
    torch.manual_seed(0)
    initial = RUNS[name].model().state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in fsdp2["state"].items() if k in initial)


@pytest.mark.ddp
@pytest.mark.slow
def test_diagnostics_under_fsdp2_log_the_ddp_values(runs: tuple[Path, str]) -> None:
    """The diagnostics that differentiate through the sharded networks logged their numbers (and the DDP
    ones, checked above): game-Jacobian and Hessian eigenvalues, the ELBO-gap split with refinement."""
    assert {"eig/max_real", "eig/max_abs"} <= load(runs, "fsdp2", "gan_eigen")["metrics"].keys()
    assert "eig/max" in load(runs, "fsdp2", "vae_hessian")["metrics"]
    gaps = load(runs, "fsdp2", "vae_elbo_gap_refined")["metrics"]
    assert {"elbo_gap/approximation_gap", "elbo_gap/amortization_gap"} <= gaps.keys()
    assert list((runs[0] / "fsdp2" / "samples").glob("*.png"))  # rank 0 drew a SampleGrid without a hang


@pytest.mark.ddp
@pytest.mark.slow
def test_a_sharded_run_resumes_bit_for_bit(runs: tuple[Path, str]) -> None:
    """``genzoo fit --trainer.strategy fsdp2`` (GAN, R1, EMA) stopped after epoch 1 and resumed from its
    checkpoint ends with the weights of the uninterrupted run, which are the DDP run's."""
    straight, resumed = load(runs, "fsdp2", "resume_straight"), load(runs, "fsdp2", "resume_resumed")
    assert straight["steps"] == resumed["steps"] == 4 and straight["sharded"]
    for key, value in load(runs, "ddp", "resume_straight")["state"].items():
        torch.testing.assert_close(straight["state"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    for key, value in straight["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    for key, value in straight["metrics"].items():
        assert resumed["metrics"][key] == value, key


@pytest.mark.ddp
@pytest.mark.slow
def test_the_sharded_checkpoint_loads_predicts_and_tests_in_one_process(
    runs: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consolidated ``.ckpt`` the 2-process run wrote: ``GAN.load_from_checkpoint`` holds the run's final
    weights and samples; ``genzoo predict`` and ``genzoo test`` read it in this process."""
    from cli import run

    checkpoint = runs[0] / "fsdp2" / "resume" / "epoch=1.ckpt"
    model = GAN.load_from_checkpoint(checkpoint, map_location="cpu")
    for key, value in load(runs, "fsdp2", "resume_straight")["state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.isfinite(model.sample(8, generator=torch.Generator().manual_seed(0))).all()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    common = ["--model=GAN", "--data=Toy2D", "--data.n_train=64", "--data.n_val=32", "--data.n_test=32",
              f"--ckpt_path={checkpoint}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    run(["predict", *common, "--samples.n=8", f"--samples.out={tmp_path / 'samples.pt'}"])
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    assert samples.shape == (8, 2) and torch.isfinite(samples).all()
    tested = run(["test", *common])
    assert torch.isfinite(tested.trainer.callback_metrics["test/d_loss"])


def test_memory_table_applies_its_formulas_to_the_recipes(tmp_path: Path, capsys) -> None:
    """benchmarks/memory_table.py on two recipes: P and the largest unit counted from the built model, DDP
    16 P bytes at any N, FSDP2 16 P / N + 8 U (N > 1), and a Markdown row per recipe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "benchmarks" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name in ("gan_8gaussians", "vae_digits"):
        (tmp_path / f"{name}.yaml").write_text((ROOT / "configs" / f"{name}.yaml").read_text())
    rows = {row["recipe"]: row for row in table.rows(tmp_path)}
    gan = table.recipe_model(tmp_path / "gan_8gaussians.yaml")
    p = sum(x.numel() for x in gan.parameters())
    u = max(sum(x.numel() for x in player.parameters()) for player in (gan.generator, gan.discriminator))
    row = rows["gan_8gaussians"]
    assert (row["parameters"], row["largest_unit"]) == (p, u)
    assert row["ddp"] == row["fsdp2_1"] == 16 * p
    assert row["fsdp2_8"] == 16 * p // 8 + 8 * u and row["fsdp2_64"] == 16 * p // 64 + 8 * u
    assert rows["vae_digits"]["family"] == "VAE"
    markdown = table.markdown(list(rows.values()))
    assert markdown.count("\n") == 3 and "| gan_8gaussians | GAN | " in markdown
