"""Diffusion maths against closed forms: the forward process and its posterior, the optimal denoiser of
Gaussian and Gaussian-mixture data (simple loss and ELBO against their analytic values, the bound below the
exact log p(x)), the discretised decoder, DDIM against DDPM; then training, DDP parity and exact resume.

Monte Carlo tolerances are ``Z`` standard errors of the estimate (computed from the same draws), with
fixed seeds: Z = 5 makes a false failure a < 1e-6 event for a correct implementation.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import cli_fit, metric_rows
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from datamodules import Toy2D
from zoo import Diffusion
from zoo.diffusion import beta_schedule, discretized_gaussian_log_prob

Z = 5.0
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- schedules and the forward process -----------------------------------------------------------------------


def test_schedules_match_their_papers() -> None:
    """Linear: Ho et al.'s β from 1e-4 to 0.02 over T = 1000; cosine: ᾱ_t = f(t)/f(0) (Nichol & Dhariwal
    eq. 17) wherever β is not clipped. Float64, to 1e-12."""
    linear = beta_schedule("linear", 1000)
    assert linear[0].item() == pytest.approx(1e-4, abs=1e-15) and linear[-1].item() == pytest.approx(0.02)
    cosine = beta_schedule("cosine", 100)
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - cosine, 0)
    for t in (1, 10, 50, 90):
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-12)
    assert cosine.max().item() <= 0.999


def test_forward_marginal_matches_closed_form_and_the_chain() -> None:
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I): q_sample's mean and variance over 200,000 draws (Z standard
    errors; the variance's standard error is σ²√(2/(n-1))), and the same law reached by running the chain
    x_s = √(1-β_s) x_{s-1} + √β_s ε for s = 1..t (Z standard errors of the difference of the two means)."""
    model = Diffusion(shape=(1,), timesteps=100)
    n, x0 = 200_000, torch.full((200_000, 1), 0.7, dtype=torch.float64)
    betas = beta_schedule("linear", 100)
    for t in (1, 20, 100):
        ab = torch.prod(1 - betas[:t]).item()
        xt = model.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=g(t), dtype=torch.float64))
        assert xt.mean().item() == pytest.approx(0.7 * math.sqrt(ab), abs=Z * math.sqrt((1 - ab) / n))
        assert xt.var().item() == pytest.approx(1 - ab, abs=Z * (1 - ab) * math.sqrt(2 / (n - 1)))
        chain = x0.clone()
        gen = g(100 + t)
        for s in range(t):
            chain = (1 - betas[s]).sqrt() * chain + betas[s].sqrt() * torch.randn(
                n, 1, generator=gen
            ).double()
        assert chain.mean().item() == pytest.approx(xt.mean().item(), abs=Z * math.sqrt(2 * (1 - ab) / n))
        assert chain.var().item() == pytest.approx(1 - ab, abs=Z * (1 - ab) * math.sqrt(2 / (n - 1)))


def test_posterior_matches_gaussian_conditioning_and_monte_carlo() -> None:
    """q(x_{t-1} | x_t, x_0) against Bayes' rule for the Gaussian pair x_{t-1} | x_0 ~ N(√ᾱ_{t-1} x_0,
    1 - ᾱ_{t-1}), x_t | x_{t-1} ~ N(√α_t x_{t-1}, β_t) (float64, to 1e-10), and against a regression of
    simulated x_{t-1} on x_t (slope, intercept and residual variance within Z standard errors)."""
    model = Diffusion(shape=(1,), timesteps=50).double()
    betas = beta_schedule("linear", 50)
    for t in (2, 10, 50):
        ab_prev, beta = torch.prod(1 - betas[: t - 1]).item(), betas[t - 1].item()
        x0, xt = (
            torch.tensor([[0.3], [-1.1]], dtype=torch.float64),
            torch.tensor([[0.5], [2.0]], dtype=torch.float64),
        )
        mean, var = model.q_posterior(x0, xt, torch.full((2,), t))
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        expected = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - beta) * xt / beta) / precision
        torch.testing.assert_close(mean, expected, rtol=1e-10, atol=1e-12)
        assert var[0].item() == pytest.approx(1 / precision, rel=1e-10)
        n = 200_000  # simulate (x_{t-1}, x_t) given x_0 = 0.3 and regress
        prev = math.sqrt(ab_prev) * 0.3 + math.sqrt(1 - ab_prev) * torch.randn(
            n, generator=g(t), dtype=torch.float64
        )
        cur = math.sqrt(1 - beta) * prev + math.sqrt(beta) * torch.randn(
            n, generator=g(t + 1), dtype=torch.float64
        )
        c = torch.cov(torch.stack([cur, prev]))
        slope = (c[0, 1] / c[0, 0]).item()
        residual = prev - prev.mean() - slope * (cur - cur.mean())
        coef_xt = model._respaced(torch.tensor([t]), torch.tensor([t - 1]))["coef_xt"].item()
        slope_se = math.sqrt(residual.var().item() / (n * c[0, 0].item()))
        assert slope == pytest.approx(coef_xt, abs=Z * slope_se)
        assert residual.var().item() == pytest.approx(1 / precision, abs=Z * math.sqrt(2 / n) / precision)


# -- the optimal denoiser of Gaussian data -------------------------------------------------------------------


class GaussianOracle(nn.Module):
    """E[ε | x_t] for data N(m, s² I): ε̂ = √(1-ᾱ) (x_t - √ᾱ m) / (ᾱ s² + 1 - ᾱ)."""

    def __init__(self, model: Diffusion, m: torch.Tensor, s: float) -> None:
        super().__init__()
        self.model, self.m, self.s = [model], m, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.model[0].alpha_bar(t).to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.m.to(x)) / (ab * self.s**2 + 1 - ab)


def gaussian_model(variance: str = "fixed_large", timesteps: int = 200, **kwargs) -> Diffusion:
    model = Diffusion(shape=(2,), timesteps=timesteps, variance=variance, **kwargs).double()
    model.net = GaussianOracle(model, M, S)
    return model


M, S = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.3


def analytic_gaussian(model: Diffusion) -> tuple[float, float]:
    """(min simple loss, ELBO) of the optimal denoiser on N(M, S² I) in closed form.

    Per dimension V_t = Var(x_0 | x_t) = s²(1-ᾱ_t)/(ᾱ_t s² + 1 - ᾱ_t); the optimal ε-MSE at t is
    ᾱ_t s²/(ᾱ_t s² + 1 - ᾱ_t). The mean error of step t is coef_x0 (x_0 - E[x_0|x_t]), so
    E KL_t = D/2 (log σ_t²/β̃_t + β̃_t/σ_t² - 1) + D coef_x0² V_t / (2σ_t²); the decoder term is
    -D/2 log(2πσ_1²) - D V_1/(2σ_1²); the prior term is
    Σ_i ½ (1 - ᾱ_T + ᾱ_T (m_i² + s²) - 1 - log(1 - ᾱ_T))."""
    T, D, s2 = model.timesteps, 2, S**2
    t = torch.arange(1, T + 1)
    ab = model.alpha_bar(t)
    loss = (ab * s2 / (ab * s2 + 1 - ab)).mean().item()
    c = model._respaced(t, t - 1)
    logvar = c["log_large"] if model.variance == "fixed_large" else c["log_small"]
    var = logvar.exp()
    v_post = s2 * (1 - ab) / (ab * s2 + 1 - ab)
    kl = D / 2 * (logvar - c["beta_tilde"].log() + c["beta_tilde"] / var - 1) + D * c[
        "coef_x0"
    ] ** 2 * v_post / (2 * var)
    decoder = -D / 2 * math.log(2 * math.pi * var[0].item()) - D * v_post[0].item() / (2 * var[0].item())
    abT = ab[-1].item()
    prior = sum(0.5 * (1 - abT + abT * (m**2 + s2) - 1 - math.log(1 - abT)) for m in M.tolist())
    return loss, decoder - kl[1:].sum().item() - prior


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_optimal_denoiser_of_gaussian_data_reaches_the_analytic_loss_and_elbo(variance: str) -> None:
    """With the closed-form E[ε | x_t] as the network: the simple loss on 50,000 examples of N(m, s² I) equals
    its analytic minimum, the ELBO (all T terms) on 4,000 its analytic value (each within Z standard errors),
    and the analytic ELBO lies below E log p(x) = -D/2 log(2πe s²)."""
    model = gaussian_model(variance)
    min_loss, elbo = analytic_gaussian(model)
    x = M + S * torch.randn(50_000, 2, generator=g(0), dtype=torch.float64)
    t = 1 + torch.randint(model.timesteps, (len(x),), generator=g(1))
    losses = model.loss_terms(x, t, torch.randn(x.shape, generator=g(2), dtype=torch.float64))
    assert losses.mean().item() == pytest.approx(min_loss, abs=Z * losses.std().item() / math.sqrt(len(x)))
    bound = model.elbo(x[:4000], generator=g(3), timesteps=None)
    assert bound.mean().item() == pytest.approx(elbo, abs=Z * bound.std().item() / math.sqrt(4000))
    assert elbo < -math.log(2 * math.pi * math.e * S**2)  # D = 2: -D/2 log(2πe s²)


def test_stratified_elbo_and_importance_weights_are_unbiased_for_the_elbo() -> None:
    """The stratified estimate (10 of T - 1 = 199 terms) and the mean log importance weight of forward-chain
    trajectories both estimate the analytic ELBO of the optimal Gaussian denoiser (Z standard errors)."""
    model = gaussian_model()
    _, elbo = analytic_gaussian(model)
    x = M + S * torch.randn(20_000, 2, generator=g(4), dtype=torch.float64)
    stratified = model.elbo(x, generator=g(5), timesteps=10)
    assert stratified.mean().item() == pytest.approx(
        elbo, abs=Z * stratified.std().item() / math.sqrt(len(x))
    )
    log_w = model.log_importance_weights(x[:2000], k=2, generator=g(6)).flatten()
    assert log_w.mean().item() == pytest.approx(elbo, abs=Z * log_w.std().item() / math.sqrt(len(log_w)))


def test_iwae_and_the_elbo_gap_monitor_work_on_the_diffusion_unchanged() -> None:
    """callbacks.elbo_gap on the optimal Gaussian denoiser (T = 50): the IWAE-k estimate of log p(x) is at
    least the mean log weight of the same draws (log-mean-exp >= mean, exactly), and ELBOGapMonitor runs in
    a fit and logs a gap >= 0 (the same property on its draws)."""
    from callbacks import ELBOGapMonitor
    from callbacks.elbo_gap import inference_gaps, iwae_log_likelihood

    model = gaussian_model(timesteps=50)
    x = M + S * torch.randn(64, 2, generator=g(20), dtype=torch.float64)
    assert iwae_log_likelihood(model, x, k=8, chunk_size=3, generator=g(21)).shape == (64,)
    gaps = inference_gaps(model, x, k=8, generator=g(21))
    assert (gaps["gap"] >= 0).all()
    trained = Diffusion(shape=(2,), timesteps=20, hidden=(16,), elbo_timesteps=3)
    monitor = ELBOGapMonitor(every_n_epochs=1, n_examples=32, k=4, plot=False)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[monitor], enable_checkpointing=False, **QUIET
    )
    trainer.fit(trained, Toy2D("8gaussians", n_train=256, n_val=64, n_test=0, batch_size=64))
    assert trainer.callback_metrics["elbo_gap/gap"] >= 0


# -- Gaussian mixtures: the noised density is a mixture again ------------------------------------------------


class MixtureOracle(nn.Module):
    """E[ε | x_t] = -√(1-ᾱ) ∇ log q_t(x_t) for q_t = Σ_k π_k N(√ᾱ μ_k, (ᾱ s² + 1 - ᾱ) I) (equal weights)."""

    def __init__(self, model: Diffusion, centers: torch.Tensor, s: float) -> None:
        super().__init__()
        self.model, self.centers, self.s = [model], centers, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.model[0].alpha_bar(t).to(x.dtype)[:, None, None]  # [B, 1, 1]
        var = ab * self.s**2 + 1 - ab
        diff = ab.sqrt() * self.centers.to(x)[None] - x[:, None]  # [B, K, 2]
        r = torch.softmax(-(diff**2).sum(-1) / (2 * var[:, :, 0]), dim=1)  # responsibilities [B, K]
        score = (r[..., None] * diff).sum(1) / var[:, 0]
        return -(1 - ab[:, 0]).sqrt() * score


def test_mixture_oracle_is_the_score_of_the_noised_mixture() -> None:
    """The oracle equals -√(1-ᾱ) ∇ log q_t computed by autograd from torch.distributions' mixture (1e-10)."""
    data = Toy2D("25gaussians")
    model = Diffusion(shape=(2,), timesteps=100).double()
    oracle = MixtureOracle(model, data.centers.double(), data.std)
    x, t = (
        torch.randn(8, 2, generator=g(7), dtype=torch.float64) * 3,
        torch.tensor([1, 2, 5, 10, 30, 60, 90, 100]),
    )
    ab = model.alpha_bar(t)[:, None]
    scores = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        q = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=torch.zeros(25, dtype=torch.float64)),
            torch.distributions.Independent(
                torch.distributions.Normal(
                    ab[i].sqrt() * data.centers.double(), (ab[i] * data.std**2 + 1 - ab[i]).sqrt()
                ),
                1,
            ),
        )
        (grad,) = torch.autograd.grad(q.log_prob(xi).sum(), xi)
        scores.append(grad)
    torch.testing.assert_close(oracle(x, t), -(1 - ab).sqrt() * torch.cat(scores), rtol=1e-10, atol=1e-10)


def train_mlp(steps: int, data: Toy2D, timesteps: int) -> Diffusion:
    L.seed_everything(0)
    model = Diffusion(
        shape=(2,), timesteps=timesteps, hidden=(64, 64), lr=3e-3, variance="fixed_large", loss="simple"
    )
    optimizer = model.configure_optimizers()
    gen = g(8)
    for _ in range(steps):  # outside a Trainer global_step stays 0, so draw t and ε here
        batch = data.sample(128, generator=gen)
        t = 1 + torch.randint(timesteps, (128,), generator=gen)
        optimizer.zero_grad()
        model.loss_terms(batch, t, torch.randn(128, 2, generator=gen)).mean().backward()
        optimizer.step()
    return model


@pytest.mark.slow
def test_trained_model_approaches_the_mixture_oracle_and_its_elbo_stays_below_log_p() -> None:
    """8 Gaussians, T = 100. On 1,000 held-out points with shared (t, ε): the oracle's simple loss is the
    lowest (a trained model's may dip below it only by Z standard errors of the paired difference), 300 Adam
    steps close more than half of the initial model's excess over it; the mean ELBO (all terms) of the oracle,
    the initial and the trained model lies below the exact mean log p(x) (by Z standard errors at most) and
    training raises it."""
    data = Toy2D("8gaussians")
    n = 1000
    held_out = data.sample(n, generator=g(9))
    log_p = data.log_prob(held_out).mean().item()
    oracle = Diffusion(shape=(2,), timesteps=100, variance="fixed_large", loss="simple")
    oracle.net = MixtureOracle(oracle, data.centers, data.std)
    initial, trained = train_mlp(0, data, 100), train_mlp(300, data, 100)
    t = 1 + torch.randint(100, (n,), generator=g(10))
    eps = torch.randn(n, 2, generator=g(11))
    with torch.no_grad():
        losses = {
            name: m.loss_terms(held_out, t, eps)
            for name, m in [("oracle", oracle), ("initial", initial), ("trained", trained)]
        }
        excess = {name: (v - losses["oracle"]) for name, v in losses.items()}
        se = excess["trained"].std().item() / math.sqrt(n)
        assert excess["trained"].mean().item() > -Z * se
        assert excess["trained"].mean().item() < 0.5 * excess["initial"].mean().item()
        elbos = {
            name: m.elbo(held_out, generator=g(12), timesteps=None)
            for name, m in [("oracle", oracle), ("initial", initial), ("trained", trained)]
        }
    for name, bound in elbos.items():
        assert bound.mean().item() < log_p + Z * bound.std().item() / math.sqrt(n), name
    assert elbos["trained"].mean() > elbos["initial"].mean()


# -- decoders, samplers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretised_decoder_is_a_distribution_over_the_levels(levels: int) -> None:
    """Σ over the grid of exp(log P(bin)) = 1 (1e-9, float64) for any mean and scale, and an inner bin equals
    Φ(b) - Φ(a) computed directly (1e-9 relative)."""
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)[:, None]
    for mean, std in [(0.0, 0.1), (0.93, 0.01), (-2.0, 0.5), (0.3, 3.0)]:
        m, logvar = torch.full_like(grid, mean), torch.full_like(grid, 2 * math.log(std))
        log_p = discretized_gaussian_log_prob(grid, m, logvar, levels)
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        if levels > 2:
            i, half = levels // 2, 1 / (levels - 1)
            normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), std)
            direct = normal.cdf(grid[i] + half) - normal.cdf(grid[i] - half)
            assert log_p[i].exp().item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-300)


def test_ddim_with_eta_one_over_all_steps_is_ddpm_with_the_small_variance() -> None:
    """DDIM (η = 1, sample_steps = T) and DDPM (σ² = β̃) are the same chain: with one generator seed the
    samples agree path by path (float64, 1e-9), and their first two moments over 10,000 samples from different
    seeds agree within Z standard errors of the differences."""
    model = gaussian_model("fixed_small", timesteps=100)
    ddpm = model.sample(500, generator=g(13), mean=True, sampler="ddpm")
    ddim = model.sample(500, generator=g(13), mean=True, sampler="ddim", eta=1.0)
    torch.testing.assert_close(ddpm, ddim, rtol=1e-9, atol=1e-9)
    a = model.sample(10_000, generator=g(14), sampler="ddpm")
    b = model.sample(10_000, generator=g(15), sampler="ddim", eta=1.0)
    n = len(a)
    for i in range(2):
        se_mean = math.sqrt((a[:, i].var() + b[:, i].var()).item() / n)
        assert a[:, i].mean().item() == pytest.approx(b[:, i].mean().item(), abs=Z * se_mean)
        se_var = math.sqrt(2 / (n - 1)) * math.sqrt((a[:, i].var() ** 2 + b[:, i].var() ** 2).item())
        assert a[:, i].var().item() == pytest.approx(b[:, i].var().item(), abs=Z * se_var)


def test_deterministic_ddim_is_reproducible_bit_for_bit() -> None:
    """η = 0: the sample is a function of the generator's x_T only (same seed: torch.equal; other: not)."""
    model = Diffusion(shape=(1, 28, 28), timesteps=50, hidden=(8, 16, 16), sampler="ddim", sample_steps=10)
    model.eval()
    a = model.sample(3, generator=g(16))
    assert torch.equal(a, model.sample(3, generator=g(16)))
    assert not torch.equal(a, model.sample(3, generator=g(17)))
    assert a.shape == (3, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert model.sample_timesteps(10) == [1, 6, 12, 17, 23, 28, 34, 39, 45, 50]


class Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_parameterizations_give_the_same_prediction_from_the_matching_network(parameterization: str) -> None:
    """x̂_0 and ε̂ recovered from an ε-, x_0- or v-network that outputs its target for a fixed (x_0, ε) are
    the true x_0 and ε (float64, 1e-10): the conversions (Ho et al.; Salimans & Ho) invert the targets."""
    model = Diffusion(shape=(3,), timesteps=100, parameterization=parameterization, variance="fixed_large")
    model = model.double()
    x0, eps = (
        torch.randn(4, 3, generator=g(18), dtype=torch.float64),
        torch.randn(4, 3, generator=g(19), dtype=torch.float64),
    )
    t = torch.tensor([1, 30, 70, 100])
    ab = model.alpha_bar(t)[:, None]
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[parameterization]
    model.net = Constant(target)
    x0_hat, eps_hat, _ = model.predict(model.q_sample(x0, t, eps), t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss="hybrid", variance="fixed_large"), "variance='learned'"),
        (dict(schedule="quadratic"), "schedule"),
        (dict(timesteps=1, sample_steps=None), "timesteps"),
        (dict(sample_steps=0), "sample_steps"),
        (dict(elbo_timesteps=100), "elbo_timesteps"),
        (dict(eta=2.0), "eta"),
        (dict(network="unet"), "unet"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Diffusion(shape=(2,), **{"timesteps": 100, **kwargs})


# -- training through Lightning, DDP, resume -----------------------------------------------------------------


def fit(folder: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[Diffusion, L.Trainer]:
    L.seed_everything(0)
    model = Diffusion(
        shape=(2,), timesteps=100, hidden=(32, 32), elbo_timesteps=10, variance="learned", loss="hybrid"
    )
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=folder, **QUIET,
        callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)],
    )  # fmt: skip
    data = Toy2D("8gaussians", n_train=512, n_val=256, n_test=256, batch_size=128)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """4 epochs in one go == 2 epochs, stop, resume from last.ckpt, 2 more: weights and val/elbo bit for bit
    (t and ε are keyed by the global step, the ELBO's draws by the batch index)."""
    straight, straight_trainer = fit(tmp_path / "straight", 4)
    fit(tmp_path / "split", 2)
    resumed, resumed_trainer = fit(tmp_path / "split", 4, ckpt_path="last")
    assert resumed_trainer.global_step == straight_trainer.global_step == 16
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(
        straight_trainer.callback_metrics["val/elbo"], resumed_trainer.callback_metrics["val/elbo"]
    )


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path: Path) -> None:
    """Same data, seed and global batch through ``cli.py fit``: val/elbo per epoch agrees to 1e-4 nats and the
    final weights to float32 tolerance (only the order of the all-reduce sums differs), with EMA on."""
    args = (
        "--model=Diffusion", "--model.timesteps=100", "--model.hidden=[32,32]", "--model.elbo_timesteps=10",
        "--data=Toy2D", "--data.n_train=512", "--data.n_val=250", "--data.n_test=10", "--data.batch_size=128",
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
        "--trainer.callbacks+=SampleGrid", "--trainer.callbacks.every_n_epochs=1",
    )  # fmt: skip
    rows, states = {}, {}
    for devices in (1, 2):
        log_dir = cli_fit(tmp_path / f"devices{devices}", devices, *args)
        rows[devices] = metric_rows(log_dir, "val/elbo")
        (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
        states[devices] = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        assert len(list((log_dir / "samples").glob("*.png"))) == 2
    assert len(rows[1]) == len(rows[2]) == 2
    for one, two in zip(rows[1], rows[2], strict=True):
        assert float(one["val/elbo"]) == pytest.approx(float(two["val/elbo"]), abs=1e-4)
    for name in states[1]:
        torch.testing.assert_close(states[1][name], states[2][name], atol=1e-6, rtol=1e-5, msg=name)
