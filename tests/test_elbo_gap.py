"""The ELBO-gap monitor against the linear-Gaussian VAE, whose log p(x) and posterior p(z | x) are exact, and
its callback: logged values, pictures, clear failures, checkpointed state, resume, 1 vs 2 processes."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import assert_same_rows, cli_fit, metric_rows
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence

from callbacks import ELBOGapMonitor
from callbacks.elbo_gap import inference_gaps, iwae_log_likelihood, refine_posterior
from datamodules import Digits
from zoo import VAE
from zoo.gaussian import MIN_SCALE

D, d = 5, 3


def linear_gaussian(posterior: str, inflate: float = 1.5, seed: int = 0) -> VAE:
    """A float64 linear-Gaussian VAE (x = W z + b + noise, noise ~ N(0, diag s²)) whose encoder gives the
    exact posterior mean and the exact covariance times ``inflate`` (diagonal posterior: its diagonal only),
    so q is wrong by a known amount (the construction of tests/test_vae_maths.py, in 3 latent dimensions)."""
    torch.manual_seed(seed)
    model = VAE(
        shape=(D,), latent_dim=d, decoder="linear", likelihood="gaussian", posterior=posterior
    ).double()
    with torch.no_grad():
        model.log_scale.copy_(torch.linspace(-0.7, 0.2, D, dtype=torch.float64))
        mean_map, covariance = exact_posterior_parameters(model)
        head = model.posterior_head.linear
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:d] = mean_map
        head.bias[:d] = -mean_map @ model.decoder.bias
        chol = torch.linalg.cholesky(covariance * inflate)
        full = posterior == "full"
        diag = (chol.diagonal() if full else (covariance * inflate).diagonal().sqrt()) - MIN_SCALE
        head.bias[d : 2 * d] = diag + torch.log(-torch.expm1(-diag))  # softplus⁻¹
        if full:
            rows, cols = torch.tril_indices(d, d, offset=-1)
            head.bias[2 * d :] = chol[rows, cols]
    return model


def exact_posterior_parameters(model: VAE) -> tuple[Tensor, Tensor]:
    """p(z | x) = N(G (x - b), M⁻¹) with M = I + Wᵀ Ψ⁻¹ W, G = M⁻¹ Wᵀ Ψ⁻¹, Ψ = diag(s²)."""
    W, psi_inv = model.decoder.weight, torch.diag(model.log_scale.exp() ** -2)
    precision = torch.eye(d, dtype=W.dtype) + W.T @ psi_inv @ W
    return torch.linalg.solve(precision, W.T @ psi_inv), torch.linalg.inv(precision)


def exact_posterior(model: VAE, x: Tensor) -> MultivariateNormal:
    mean_map, covariance = exact_posterior_parameters(model)
    loc = (x - model.decoder.bias) @ mean_map.T
    return MultivariateNormal(loc, covariance_matrix=covariance.expand(len(x), d, d))


def as_full(q) -> MultivariateNormal:
    return (
        q if isinstance(q, MultivariateNormal) else MultivariateNormal(q.mean, torch.diag_embed(q.variance))
    )


def x_batch(n: int = 16) -> Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5


# -- the estimators ------------------------------------------------------------------------------------------


class TableModel:
    """log_importance_weights serves consecutive rows of a fixed table [k, B] and counts its calls."""

    def __init__(self, table: Tensor) -> None:
        self.table, self.used, self.calls = table, 0, 0

    def log_importance_weights(self, x: Tensor, k: int, generator=None) -> Tensor:
        self.calls += 1
        rows = self.table[self.used : self.used + k]
        self.used += k
        return rows


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000, None])
def test_chunks_merge_exactly_and_all_minus_inf_columns_are_masked(chunk_size: int | None) -> None:
    """Any chunking gives logsumexp(log w) - log k to 1e-12, with one call per chunk for the whole batch; a
    column of -inf weights gives -inf with a zero (not NaN) gradient (RELIABILITY.md #24)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(500, 6, generator=g, dtype=torch.float64) * 30
    table[:, 2] = -math.inf
    table[::3, 4] = -math.inf
    table.requires_grad_(True)
    model = TableModel(table)
    result = iwae_log_likelihood(model, torch.zeros(6, 1), k=500, chunk_size=chunk_size)
    expected = torch.logsumexp(table.detach(), 0) - math.log(500)
    torch.testing.assert_close(result.detach(), expected, atol=1e-12, rtol=0)
    assert model.calls == (math.ceil(500 / chunk_size) if chunk_size else 1)
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(result), result, 0.0).sum(), table)
    assert torch.isfinite(grad).all() and (grad[:, 2] == 0).all()


@pytest.mark.parametrize("posterior", ["full", "diagonal"])
def test_gap_is_the_exact_kl_to_the_true_posterior(posterior: str) -> None:
    """With k = 5000 draws, the measured gap log_px - elbo of each of 16 points is KL(q(z|x) || p(z|x))
    (closed form) within 0.03 nats, and on average within 0.01 (seen: 0.0055 / 0.0174 worst point, 0.0005 /
    0.0002 on average, full / diagonal); the ELBO is log p(x) - KL within 0.05 per point; the gap is never
    negative."""
    model, x = linear_gaussian(posterior), x_batch()
    kl = kl_divergence(as_full(model.posterior(x)), exact_posterior(model, x)).detach()
    assert kl.mean() > 0.1, "the test needs a visible gap"
    out = inference_gaps(model, x, k=5000, chunk_size=1000, generator=torch.Generator().manual_seed(0))
    assert (out["gap"] - kl).abs().max() < 0.03 and (out["gap"] - kl).mean().abs() < 0.01
    exact_elbo = model.log_prob(x).detach() - kl
    assert (out["elbo"] - exact_elbo).abs().max() < 0.05
    assert (out["gap"] >= 0).all()
    torch.testing.assert_close(out["gap"], out["log_px"] - out["elbo"])


def test_iwae_approaches_log_px_as_k_grows() -> None:
    """log p(x) - L_k, averaged over 16 points x 8 repeats, shrinks with k (each k at least 40% below the
    last) and is < 0.005 nats at k = 2000 (seen: 0.18, 0.015, 0.005, 0.0002 for k = 1, 10, 100, 2000)."""
    model, x = linear_gaussian("diagonal"), x_batch().repeat(8, 1)
    log_px = model.log_prob(x).detach()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        shortfall = [
            float((log_px - iwae_log_likelihood(model, x, k, generator=g)).mean()) for k in (1, 10, 100, 2000)
        ]
    assert all(b < 0.6 * a for a, b in itertools.pairwise(shortfall)), shortfall
    assert abs(shortfall[-1]) < 0.005, shortfall


def test_refinement_with_a_full_posterior_closes_the_approximation_gap() -> None:
    """The true posterior is Gaussian, so per-point full-covariance refinement (300 steps) reaches it:
    ELBO[q*] is log p(x) within 1e-3 per point (seen: 1e-7), the approximation gap is ~0 (mean within 0.005,
    each point within 0.03: the IWAE-5000 noise), and the amortization gap is the exact KL within 0.01 on
    average."""
    model, x = linear_gaussian("full"), x_batch()
    kl = kl_divergence(model.posterior(x), exact_posterior(model, x)).detach()
    out = inference_gaps(model, x, k=5000, refine_steps=300, generator=torch.Generator().manual_seed(0))
    log_px = model.log_prob(x).detach()
    assert (out["elbo_refined"] - log_px).abs().max() < 1e-3
    assert out["approximation_gap"].mean().abs() < 0.005 and out["approximation_gap"].abs().max() < 0.03
    assert (out["amortization_gap"].mean() - kl.mean()).abs() < 0.01
    torch.testing.assert_close(out["approximation_gap"] + out["amortization_gap"], out["gap"])


def test_refinement_with_a_diagonal_posterior_finds_the_best_diagonal_gaussian() -> None:
    """The best diagonal Gaussian for a Gaussian posterior N(m, Λ⁻¹) (in KL(q || p)) is N(m, diag(1/Λ_ii)).
    After 300 noisy steps the refined q* is within 0.005 nats of it in KL (seen: 0.0023; means within 0.06 of
    a posterior std of ~0.75, scales within 0.015), and the approximation gap is its KL to p(z|x) within 0.01
    (seen: 0.0713 vs 0.0716)."""
    model, x = linear_gaussian("diagonal"), x_batch()
    truth = exact_posterior(model, x)
    precision_diag = torch.linalg.inv(truth.covariance_matrix[0]).diagonal().detach()
    best = MultivariateNormal(truth.loc.detach(), torch.diag(1 / precision_diag).expand(len(x), d, d))
    q_star = refine_posterior(model, x, steps=300, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(as_full(q_star), best).max() < 0.005
    torch.testing.assert_close(q_star.mean, best.loc, atol=0.06, rtol=0)
    torch.testing.assert_close(q_star.stddev, precision_diag.rsqrt().expand(len(x), d), atol=0.03, rtol=0)
    out = inference_gaps(model, x, k=5000, refine_steps=300, generator=torch.Generator().manual_seed(0))
    assert (out["approximation_gap"].mean() - kl_divergence(best, truth).mean()).abs() < 0.01


def test_refinement_is_deterministic_and_leaves_the_model_alone() -> None:
    model, x = linear_gaussian("full"), x_batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [inference_gaps(model, x, 50, 20, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.grad is None, key


def decoder_at_scale(seed: int = 0, n: int = 64) -> tuple[VAE, Tensor]:
    """Issue 13's situation: a float64 linear-Gaussian VAE, decoder weights drawn at scale 1.5 (5-D data,
    3-D latent), its encoder as initialised (untrained), and 64 points drawn from the model."""
    torch.manual_seed(seed)
    model = VAE(shape=(D,), latent_dim=d, decoder="linear", likelihood="gaussian").double()
    with torch.no_grad():
        model.decoder.weight.copy_(1.5 * torch.randn(D, d, dtype=torch.float64))
        model.log_scale.copy_(torch.linspace(-0.7, 0.2, D, dtype=torch.float64))
    return model, model.sample(n, generator=torch.Generator().manual_seed(1)).double()


def exact_split(model: VAE, x: Tensor) -> dict[str, Tensor]:
    """The exact split for a diagonal posterior: p(z|x) = N(m, Λ⁻¹), Λ = I + Wᵀ Ψ⁻¹ W; the best diagonal
    Gaussian (in KL(q || p)) has precision diag(Λ), so the approximation gap is ½ (Σ log Λ_ii - log det Λ) for
    every point and the amortization gap is KL(q_φ || p(z|x)) minus it."""
    precision = torch.linalg.inv(exact_posterior_parameters(model)[1]).detach()
    approximation = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    kl = kl_divergence(as_full(model.posterior(x)), exact_posterior(model, x)).detach()
    return {
        "gap": kl,
        "approximation_gap": approximation.expand(len(x)),
        "amortization_gap": kl - approximation,
        "log_px": model.log_prob(x).detach(),
    }


def train_encoder(model: VAE, steps: int = 150) -> VAE:
    """Adam on the ELBO of 1024 fresh draws of the model, encoder only (the decoder stays exact)."""
    data = model.sample(1024, generator=torch.Generator().manual_seed(7)).double()
    optimizer = torch.optim.Adam(model.posterior_head.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = -model.elbo(data, generator=g).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize(
    ("encoder", "k", "per_point", "mean"),
    [
        ("untrained", 16384, {"approximation_gap": 0.05, "amortization_gap": 0.1, "log_px": 0.02},
         {"approximation_gap": 0.01, "amortization_gap": 0.03, "log_px": 0.005}),
        ("trained", 4096, {"approximation_gap": 0.05, "amortization_gap": 0.05, "log_px": 0.02},
         {"approximation_gap": 0.01, "amortization_gap": 0.01, "log_px": 0.005}),
    ],
)  # fmt: skip
def test_split_matches_the_exact_split_with_an_untrained_and_a_trained_encoder(
    encoder: str, k: int, per_point: dict, mean: dict
) -> None:
    """Issue 13: with decoder weights at scale 1.5 the untrained encoder is off by 122 nats on average (up to
    527). inference_gaps(k, refine_steps=500) at its defaults against the exact split, per point and on
    average. Before: log_px (IWAE with q_φ) 16.7 nats low, approximation gap -13.6 (exact +0.21). Seen now
    (seeds 0-2 of the decoder): untrained, k = 16384, approximation gap within 0.034 per point / 0.012 on
    average, amortization gap within 0.033 / 0.010 (Sobol error on KLs of hundreds of nats), log_px within
    0.004 / 0.001; trained (KL 0.2-0.6), k = 4096, within 0.034 / 0.014, 0.034 / 0.011, 0.005 / 0.003. The
    tolerances are about twice what was seen over those seeds on this seed's case (a 0.05-nat target per
    point); the refinement's shortfall (≤ 0.01 on average) and the quasi-Monte Carlo error set them."""
    model, x = decoder_at_scale()
    if encoder == "trained":
        train_encoder(model)
    exact = exact_split(model, x)
    if encoder == "untrained":
        assert exact["gap"].mean() > 100, "the test needs a poor encoder"
    out = inference_gaps(model, x, k=k, refine_steps=500, generator=torch.Generator().manual_seed(0))
    for name, tolerance in per_point.items():
        error = (out[name] - exact[name]).detach()
        assert error.abs().max() < tolerance, (name, float(error.abs().max()))
        assert error.mean().abs() < mean[name], (name, float(error.mean()))
    torch.testing.assert_close(out["approximation_gap"] + out["amortization_gap"], out["gap"])
    assert (out["ess"] > 0.1 * 3 * k).all()  # the mixture's weights are well spread: ESS > 10% of 3k


def test_without_refinement_a_poor_encoder_shows_in_the_effective_sample_size() -> None:
    """IWAE-k with the untrained encoder as proposal falls far short of log p(x) (seen: 16.7 nats on average),
    and its weights say so: ESS < 2% of k on average (seen: 57 of 5000, 1.0 at worst), against > 20% with the
    refinement's mixture (seen: 3064 of 15000 on 64 points)."""
    model, x = decoder_at_scale()
    plain = inference_gaps(model, x, k=5000, generator=torch.Generator().manual_seed(0))
    assert (model.log_prob(x) - plain["log_px"]).mean() > 5
    assert plain["ess"].mean() < 0.02 * 5000 and plain["ess"].min() >= 1
    model, x = decoder_at_scale(n=8)
    refined = inference_gaps(model, x, k=512, refine_steps=300, generator=torch.Generator().manual_seed(0))
    assert refined["ess"].mean() > 0.2 * 3 * 512


# -- the callback --------------------------------------------------------------------------------------------


def fit(
    callback, max_epochs: int, folder: Path, ckpt_path: str | None = None, logger=False, **trainer_kwargs
):
    L.seed_everything(0)
    model = VAE(shape=(1, 8, 8), hidden=(64,), eval_k=10)
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[callback, L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)],
        **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, Digits(binarize="dynamic", batch_size=64), ckpt_path=ckpt_path)
    return trainer


def test_callback_logs_the_decomposition_and_draws_it(tmp_path: Path) -> None:
    """Two evaluations on 40 validation digits: every value and its standard error reach the CSV log at the
    evaluation's step, the parts add up to the gap, and rank 0 saved the bar chart each time."""
    callback = ELBOGapMonitor(every_n_epochs=1, n_examples=40, k=64, batch_size=16, refine_steps=30)
    trainer = fit(callback, 2, tmp_path, logger=CSVLogger(tmp_path))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("elbo_gap/gap")]
    assert [int(row["step"]) for row in rows] == [24, 48]
    for row, record in zip(rows, callback.history, strict=True):
        for name in callback.names:
            assert float(row[f"elbo_gap/{name}"]) == pytest.approx(record[name], rel=1e-12)
            assert float(row[f"elbo_gap/{name}_se"]) > 0
        assert record["gap"] == pytest.approx(record["log_px"] - record["elbo"], abs=1e-9)
        assert record["gap"] == pytest.approx(
            record["approximation_gap"] + record["amortization_gap"], abs=1e-9
        )
        assert record["gap"] > 0 and record["amortization_gap"] > 0
    assert len(list(Path(trainer.logger.log_dir).glob("elbo_gap_decomposition/*.png"))) == 2
    assert float(trainer.callback_metrics["elbo_gap/gap"]) == callback.history[-1]["gap"]


def test_callback_fails_clearly_without_the_capability(tmp_path: Path) -> None:
    from test_divergence import ShiftGAN

    with pytest.raises(
        TypeError, match=r"ELBOGapMonitor needs .*LatentVariableModel.*`log_importance_weights`"
    ):
        ELBOGapMonitor().setup(None, ShiftGAN(), "fit")

    class WeightsOnly(L.LightningModule):
        def log_importance_weights(self, x, k, generator=None): ...
        def elbo(self, x, generator=None): ...
        def sample(self, n, generator=None): ...

    ELBOGapMonitor().setup(None, WeightsOnly(), "fit")  # enough without the refinement
    with pytest.raises(TypeError, match=r"refine_steps > 0.*`posterior`, `prior`, `observation`"):
        ELBOGapMonitor(refine_steps=10).setup(None, WeightsOnly(), "fit")
    with pytest.raises(ValueError, match="k must be"):
        ELBOGapMonitor(k=0)


def test_resume_continues_the_history_exactly(tmp_path: Path) -> None:
    """4 epochs straight == 2 epochs, stop, resume, 2 more: the same history bit for bit, with validation
    (and so the checkpoint) only every 2 epochs: the evaluation runs after the last training batch, before
    validation, so the checkpoint written at validation end holds it."""

    def make() -> ELBOGapMonitor:
        return ELBOGapMonitor(every_n_epochs=1, n_examples=32, k=16, refine_steps=5)

    straight = make()
    fit(straight, 4, tmp_path / "straight", check_val_every_n_epoch=2)
    fit(make(), 2, tmp_path / "split", check_val_every_n_epoch=2)
    resumed = make()
    fit(resumed, 4, tmp_path / "split", ckpt_path="last", check_val_every_n_epoch=2)
    assert [int(r["step"]) for r in straight.history] == [24, 48, 72, 96]
    assert resumed.history == straight.history
    state = resumed.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert (
        fresh.history == resumed.history
        and fresh.evaluations == 4
        and torch.equal(fresh.fixed, resumed.fixed)
    )


def fit_through_cli(folder: Path, devices: int) -> list[dict]:
    log_dir = cli_fit(
        folder, devices,
        "--model=VAE", "--model.hidden=[64]", "--model.eval_k=10",
        "--data=Digits", "--data.binarize=dynamic", "--data.batch_size=64", "--trainer.max_epochs=2",
        "--trainer.callbacks=ELBOGapMonitor", "--trainer.callbacks.every_n_epochs=1",
        "--trainer.callbacks.n_examples=50", "--trainer.callbacks.batch_size=16",  # 4 blocks: 16, 16, 16, 2
        "--trainer.callbacks.k=64", "--trainer.callbacks.refine_steps=20",
    )  # fmt: skip
    assert len(list((log_dir / "elbo_gap_decomposition").glob("*.png"))) == 2  # rank 0 drew, nobody hung
    return metric_rows(log_dir, "elbo_gap/gap")


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path: Path) -> None:
    """Same data, seed and global batch: the elbo_gap/* rows of 2 gloo processes (blocks 0, 2 on rank 0 and
    1, 3 on rank 1) equal those of 1 process within 1e-4 nats (the weights differ by the float32 gradient
    all-reduce order only)."""
    rows = {devices: fit_through_cli(tmp_path / f"devices{devices}", devices) for devices in (1, 2)}
    assert_same_rows(rows[1], rows[2], "elbo_gap/", n_rows=2)
