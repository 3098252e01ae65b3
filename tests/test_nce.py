"""NCE against known answers: the quadratic energy recovers a 2-D Gaussian's mean, covariance and
log-normaliser; negative sampling learns the density ratio p / (k q); an MLP energy on a Toy2D mixture
normalises itself."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import check_parity_and_resume

from datamodules import Toy2D
from zoo import NCE

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
N, K = 4000, 10


def gaussian_sample(n: int, seed: int) -> torch.Tensor:
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MEAN + eps @ torch.linalg.cholesky(COV).T


@functools.cache
def fit_quadratic(objective: str = "nce", noise_scale: float = 1.0) -> tuple[NCE, torch.Tensor]:
    """NCE on N samples of N(MEAN, COV) with k N fixed noise samples, minimised to convergence by L-BFGS
    (float64): the NCE estimator of Gutmann & Hyvärinen (2012) for this sample. The noise is drawn once and
    passed to ``nce_loss``: ``training_loss`` outside a Trainer draws new noise on every call."""
    x = gaussian_sample(N, seed=0)
    torch.manual_seed(0)
    model = NCE(shape=(2,), energy="quadratic", k=K, objective=objective, noise_scale=noise_scale).double()
    model.fit_noise(x)
    eps = torch.randn(N, K, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=300,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=0,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model.nce_loss(x, eps).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, x


def test_quadratic_energy_recovers_the_gaussian_and_its_normaliser() -> None:
    """Tolerances: 4 standard errors of the maximum-likelihood estimate from N = 4000 points, inflated by
    sqrt(1 + 1/k), NCE's asymptotic efficiency when the noise is the data distribution (Gutmann & Hyvärinen
    2012, Sec. 2.4): mean_i: sqrt(Σ_ii / N); Σ_ij: sqrt((Σ_ii Σ_jj + Σ_ij²) / N); c = ½ log det(2π Σ):
    sqrt(D / (2N)). Also exp(log_prob) integrates to 1 (the quadratic model is an exact Gaussian at c)."""
    model, _ = fit_quadratic()
    inflate = 4 * math.sqrt(1 + 1 / K)
    gaussian = model.gaussian()
    var = COV.diagonal()
    assert ((gaussian.mean - MEAN).abs() < inflate * (var / N).sqrt()).all(), gaussian.mean
    cov_se = ((var[:, None] * var[None, :] + COV**2) / N).sqrt()
    assert ((gaussian.covariance_matrix - COV).abs() < inflate * cov_se).all(), gaussian.covariance_matrix
    true_c = 0.5 * torch.logdet(2 * math.pi * COV)
    assert abs(model.c.item() - true_c.item()) < inflate * math.sqrt(2 / (2 * N)), model.c.item()
    # c is the normaliser of the learned quadratic too (self-normalisation), to the same tolerance
    own_c = 0.5 * torch.logdet(2 * math.pi * gaussian.covariance_matrix)
    assert abs(model.c.item() - own_c.item()) < inflate * math.sqrt(2 / (2 * N))


def test_negative_sampling_learns_the_density_ratio() -> None:
    """With noise q = N(m, s² S), s = 1.5, negative sampling's optimum is -E - c = log p - log(k q): for
    Gaussians a quadratic with covariance (Σ⁻¹ - (s² Σ)⁻¹)⁻¹ = Σ s² / (s² - 1) = 1.8 Σ; checked against 1.8
    times the sample covariance to 5% + 0.25 (the ratio's covariance has ~1.8x the sampling error of Σ's;
    seen within 1%), and ``log_prob`` (which adds log k q back) matches the true log-density on 200 fresh
    points: mean absolute error below 0.08 nats (seen 0.045; max 0.18 in the tail)."""
    model, x = fit_quadratic("negative_sampling", noise_scale=1.5)
    sample_cov = torch.cov(x.T)
    ratio_cov = model.gaussian().covariance_matrix
    torch.testing.assert_close(ratio_cov, 1.8 * sample_cov, atol=0.25, rtol=0.05)
    fresh = gaussian_sample(200, seed=5)
    truth = torch.distributions.MultivariateNormal(MEAN, COV).log_prob(fresh)
    error = (model.log_prob(fresh) - truth).abs()
    print(f"negative sampling: |log_prob - log p| mean {error.mean():.4f}, max {error.max():.4f}")
    assert error.mean() < 0.08


@pytest.mark.slow
def test_mlp_energy_on_a_toy2d_mixture_normalises_itself() -> None:
    """25 Gaussians, MLP energy, k = 20, 400 Adam steps: exp(log_prob) summed over a 0.02-grid on [-6, 6]² is
    1 within 0.15 (NCE's self-normalisation; nothing else constrains c; seen 0.91-0.94), and the KL(p_data ‖
    p_model), reported, is below the matched Gaussian's (the noise, seen 4.86 nats)."""
    data = Toy2D("25gaussians")
    x = data.sample(4000, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = NCE(shape=(2,), energy="mlp", k=20, hidden=(64, 64))
    model.fit_noise(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(400):
        model.seed = step  # fresh noise samples each step, as the global step gives them in a fit
        loss = model.training_loss(x[torch.randint(0, len(x), (256,), generator=g)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    h = 0.02
    grid = torch.arange(-6, 6, h) + h / 2
    with torch.no_grad():
        mass = model.log_prob(torch.cartesian_prod(grid, grid)).exp().sum().item() * h * h
        held_out = data.sample(5000, torch.Generator().manual_seed(9))
        kl = (data.log_prob(held_out) - model.log_prob(held_out)).mean().item()
        kl_gaussian = (data.log_prob(held_out) - model.noise_log_prob(held_out)).mean().item()
    print(f"NCE MLP on 25gaussians: mass {mass:.3f}, KL {kl:.3f} nats, Gaussian fit {kl_gaussian:.3f} nats")
    assert abs(mass - 1) < 0.15
    assert kl < kl_gaussian


def test_noise_is_matched_to_the_data() -> None:
    model = NCE(shape=(2,), energy="quadratic")
    sample = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([2.0, 0.5]) + 3.0
    model.fit_noise(sample)
    q = model.noise_distribution()
    torch.testing.assert_close(q.mean, sample.mean(0))
    ridge = 1e-4 * torch.cov(sample.T).diagonal().mean()
    torch.testing.assert_close(q.covariance_matrix, torch.cov(sample.T, correction=0) + ridge * torch.eye(2))


def test_samples_of_the_quadratic_model_have_its_moments() -> None:
    model, _ = fit_quadratic()
    draws = model.sample(20000, generator=torch.Generator().manual_seed(0)).double()
    gaussian = model.gaussian()
    torch.testing.assert_close(
        draws.mean(0), gaussian.mean.detach(), atol=0.05, rtol=0
    )  # 5 SE: 5 sqrt(2/2e4)
    torch.testing.assert_close(torch.cov(draws.T), gaussian.covariance_matrix.detach(), atol=0.1, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(energy="rbm"), dict(noise="uniform"), dict(objective="infonce"), dict(k=0), dict(noise_scale=0)],
)
def test_bad_arguments_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        NCE(shape=(2,), **kwargs)


# -- through the CLI: 2 processes = 1 process, and a resumed run continues exactly ------------------------

CLI_ARGS = (
    "--model=NCE", "--model.hidden=[32]", "--model.k=5",
    "--data=Toy2D", "--data.name=25gaussians", "--data.n_train=2048", "--data.n_val=512", "--data.n_test=256",
    "--data.batch_size=256",
)  # fmt: skip


@pytest.mark.ddp
def test_two_processes_match_one_and_a_resumed_run_continues_exactly(tmp_path: Path) -> None:
    """Four ``cli.py fit`` runs, the first shared by both checks:

    * parity: 2 epochs (16 steps) on 1 and on 2 gloo processes, same global batch: the matched noise (each
      process sums its share of the training set, all-reduced), per-epoch val/loss, val/log_prob and val/kl
      agree to 1e-4 and the final weights to float32 tolerance (atol 1e-6, rtol 1e-5).
    * resume: 3 epochs in one go == the 2-epoch run, ``--ckpt_path`` to its checkpoint, 1 more: every weight,
      the noise buffers (not refitted on resume) and the epoch-3 val/kl equal bit for bit.
    """
    state = check_parity_and_resume(tmp_path, CLI_ARGS, ("val/loss", "val/log_prob", "val/kl"), pictures=64)
    assert bool(state["noise_fitted"])


# -- the energy is a plug-in; so are the optimiser and its schedule ----------------------------------------


class SmoothEnergy(torch.nn.Module):
    """A user's energy ``[B, 2] -> [B, 1]`` (not one of genzoo's presets)."""

    def __init__(self, width: int = 16, out: int = 1) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(2, width), torch.nn.Softplus(), torch.nn.Linear(width, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def fit_briefly(model: NCE, steps: int, tmp_path: Path | None = None):
    """``steps`` training steps under a Trainer on 256 points of the 25-Gaussian grid (batches of 64)."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    data = Toy2D("25gaussians", n_train=256, n_val=64, n_test=64, batch_size=64)
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_users_energy_trains_under_a_trainer_and_reloads_from_its_checkpoint(tmp_path: Path) -> None:
    """8 steps with the user's ``[B, 1]`` energy: the loss is finite, every one of its weights moved, c
    moved; the checkpoint reloads with ``NCE.load_from_checkpoint(path, energy=SmoothEnergy())`` and gives
    the same log-densities bit for bit (noise buffers included)."""
    torch.manual_seed(0)
    model = NCE(shape=(2,), energy=SmoothEnergy(), k=5)
    assert "energy" not in model.hparams  # a live module is not pickled into the checkpoint
    before = {name: p.detach().clone() for name, p in model.energy_net.named_parameters()}
    trainer = fit_briefly(model, 8, tmp_path)
    assert trainer.global_step == 8 and torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, p in model.energy_net.named_parameters():
        assert not torch.equal(p, before[name]), name
    assert model.c.item() != 0.0
    trainer.save_checkpoint(tmp_path / "nce.ckpt")
    restored = NCE.load_from_checkpoint(tmp_path / "nce.ckpt", energy=SmoothEnergy())
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), restored.log_prob(x))
    assert bool(restored.noise_fitted)


@pytest.mark.parametrize("out", [3, 2])
def test_a_wrong_shape_energy_fails_at_construction_naming_the_role(out: int) -> None:
    """[B, 3] and [B, 2] (several energies per example) are refused when the family is built."""
    with pytest.raises(ValueError, match=rf"NCE: the energy \(SmoothEnergy\) must map \[B, 2\] to \[B\] or "
                                         rf"\[B, 1\].*returned \[2, {out}\]"):  # fmt: skip
        NCE(shape=(2,), energy=SmoothEnergy(out=out))


def test_the_optimizer_and_schedule_are_the_users() -> None:
    """``optimizer=partial(SGD, lr=0.05)`` is what the Trainer steps with; ``StepLR(step_size=2, gamma=0.5)``
    halves it every 2 optimizer steps: 0.05 · 0.5^(5 // 2) = 0.0125 after 5 steps."""
    torch.manual_seed(0)
    model = NCE(
        shape=(2,), hidden=(8,), k=2, optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    )  # fmt: skip
    assert "optimizer" not in model.hparams and "lr_scheduler" not in model.hparams
    trainer = fit_briefly(model, 5)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0125, rel=1e-12)
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)


def test_the_default_optimizer_is_adam_at_lr() -> None:
    model = NCE(shape=(2,), hidden=(8,), lr=3e-3)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 3e-3


@pytest.mark.slow
def test_a_users_energy_from_a_recipe_reloads_with_no_arguments(tmp_path: Path, monkeypatch) -> None:
    """The YAML form, ``energy: {class_path: test_nce.SmoothEnergy, init_args: {width: 8}}`` and an SGD
    optimizer, through ``cli.py fit`` (2 steps): the checkpoint holds the class_path config, so
    ``NCE.load_from_checkpoint(path)`` rebuilds the network and the same log-densities with no arguments."""
    import yaml

    from cli import run

    recipe = {
        "model": {"class_path": "NCE", "init_args": {
            "k": 3, "energy": {"class_path": f"{__name__}.SmoothEnergy", "init_args": {"width": 8}},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}},
        }},
        "data": {"class_path": "Toy2D", "init_args": {"name": "25gaussians", "n_train": 128, "n_val": 32,
                                                      "n_test": 32, "batch_size": 64}},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = run([
        "fit", "-c", str(tmp_path / "recipe.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip
    assert type(cli.model.energy_net) is SmoothEnergy and type(cli.trainer.optimizers[0]) is torch.optim.SGD
    (path,) = tmp_path.rglob("*.ckpt")
    restored = NCE.load_from_checkpoint(path)
    assert type(restored.energy_net) is SmoothEnergy
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cli.model.log_prob(x), restored.log_prob(x))
