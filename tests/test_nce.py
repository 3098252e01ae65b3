"""NCE against known answers: the quadratic energy recovers a 2-D Gaussian's mean, covariance and
log-normaliser; negative sampling learns the density ratio p / (k q); an MLP energy on a Toy2D mixture
normalises itself."""

from __future__ import annotations

import functools
import math
from pathlib import Path

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
