"""The VAE / IWAE maths against closed forms (seeds 001, 003, 004), in float64 where it matters."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from zoo import VAE
from zoo.gaussian import MIN_SCALE, GaussianHead, standard_normal
from zoo.vae import log_mean_exp

D, d = 4, 2


def linear_gaussian(posterior: str, inflate: float = 1.0, seed: int = 0) -> VAE:
    """A linear-Gaussian VAE whose linear encoder is set to the exact posterior mean map, with the
    posterior covariance inflated by ``inflate`` (diagonal: only its diagonal is kept)."""
    torch.manual_seed(seed)
    model = VAE(
        shape=(D,), latent_dim=d, decoder="linear", likelihood="gaussian", posterior=posterior
    ).double()
    with torch.no_grad():
        model.log_scale.copy_(torch.linspace(-0.7, 0.2, D, dtype=torch.float64))
        W, psi_inv = model.decoder.weight, torch.diag(model.log_scale.exp() ** -2)
        precision = torch.eye(d, dtype=torch.float64) + W.T @ psi_inv @ W  # M = I + Wᵀ Ψ⁻¹ W
        covariance = torch.linalg.inv(precision) * inflate
        gain = torch.linalg.solve(precision, W.T @ psi_inv)  # E[z | x] = M⁻¹ Wᵀ Ψ⁻¹ (x - b)
        head = model.posterior_head.linear
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:d] = gain
        head.bias[:d] = -gain @ model.decoder.bias
        chol = torch.linalg.cholesky(covariance)
        diag = (chol.diagonal() if posterior == "full" else covariance.diagonal().sqrt()) - MIN_SCALE
        head.bias[d : 2 * d] = diag + torch.log(-torch.expm1(-diag))  # softplus⁻¹
        if posterior == "full":
            rows, cols = torch.tril_indices(d, d, offset=-1)
            head.bias[2 * d :] = chol[rows, cols]
    return model


def x_batch(n: int = 8) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5


def test_exact_posterior_gives_zero_variance_weights_equal_to_log_px() -> None:
    """With q = p(z|x) every importance weight equals p(x): log w_j = log p(x) for all j (to 1e-9)."""
    model, x = linear_gaussian("full"), x_batch()
    log_w = model.log_importance_weights(x, k=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_w, model.log_prob(x).expand_as(log_w), atol=1e-9, rtol=0)


def test_iwae_bounds_are_ordered_and_converge_to_log_px() -> None:
    """L_1 <= L_5 <= L_50 <= log p(x) (each estimated with 4000 draws, 4 standard errors of slack) and
    L_k within 0.05 nats of the exact log p(x) at k = 5000, on a diagonal posterior with a real gap."""
    model, x = linear_gaussian("diagonal", inflate=1.5), x_batch()
    log_px = model.log_prob(x)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        means, errors = {}, {}
        for k in (1, 5, 50):
            draws = log_mean_exp(model.log_importance_weights(x.repeat(4000, 1), k, generator), 0).view(
                4000, -1
            )
            means[k], errors[k] = draws.mean(0), draws.std(0) / math.sqrt(4000)
        assert (log_px - means[1]).mean() > 0.05, "the test needs a posterior with a visible gap"
        for small, large in ((1, 5), (5, 50)):
            assert (means[small] <= means[large] + 4 * (errors[small] + errors[large])).all()
            assert (means[small] < means[large]).float().mean() >= 0.9
        assert (means[50] <= log_px + 4 * errors[50]).all()
        big = torch.stack([model.iwae_bound(x, 5000, generator) for _ in range(4)]).mean(0)
    assert (log_px - big).abs().max() < 0.05


def kl_seed_004(mu1, s1, mu2, s2) -> torch.Tensor:
    """KL(N(mu1, S1) || N(mu2, S2)) = 1/2 (tr(S2⁻¹ S1) + (mu2-mu1)ᵀ S2⁻¹ (mu2-mu1) - k + log det S2 / det S1),
    written out with explicit inverses and determinants (seed 004)."""
    s2_inv, diff = torch.linalg.inv(s2), mu2 - mu1
    k = mu1.shape[-1]
    return 0.5 * (
        torch.trace(s2_inv @ s1) + diff @ s2_inv @ diff - k + torch.log(torch.det(s2) / torch.det(s1))
    )


def random_spd(k: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, k, generator=generator, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(k, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_full_covariance_kl_matches_seed_004_and_monte_carlo(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    mu1, mu2 = (
        torch.randn(k, generator=g, dtype=torch.float64),
        torch.randn(k, generator=g, dtype=torch.float64),
    )
    s1, s2 = random_spd(k, g), random_spd(k, g)
    p, q = MultivariateNormal(mu1, s1), MultivariateNormal(mu2, s2)
    library = kl_divergence(p, q)
    torch.testing.assert_close(library, kl_seed_004(mu1, s1, mu2, s2), atol=1e-10, rtol=1e-10)
    torch.manual_seed(0)
    z = p.sample((200_000,))
    log_ratio = p.log_prob(z) - q.log_prob(z)
    standard_error = log_ratio.std() / math.sqrt(len(z))
    assert abs(log_ratio.mean() - library) < 4 * standard_error


def test_posterior_head_kl_to_prior_matches_seed_004() -> None:
    """The KL the VAE trains with (full posterior head vs its N(0, I) prior) is the seed 004 closed form."""
    torch.manual_seed(0)
    head = GaussianHead(5, 3, "full").double()
    params = head(torch.randn(4, 5, dtype=torch.float64))
    q = params.distribution()
    prior = standard_normal(3, "full", q.loc)
    expected = torch.stack(
        [
            kl_seed_004(
                q.loc[i],
                q.covariance_matrix[i],
                torch.zeros(3, dtype=torch.float64),
                torch.eye(3, dtype=torch.float64),
            )
            for i in range(4)
        ]
    )
    torch.testing.assert_close(kl_divergence(q, prior), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(params.kl_to_standard_normal(), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_reparameterize_has_the_posterior_moments(covariance: str) -> None:
    torch.manual_seed(0)
    head = GaussianHead(3, 2, covariance).double()
    params = head(torch.randn(1, 3, dtype=torch.float64))
    q = params.distribution()
    z = params.rsample(torch.randn(400_000, 1, 2, dtype=torch.float64))[:, 0]
    torch.testing.assert_close(z.mean(0), q.mean[0], atol=0.01, rtol=0)
    torch.testing.assert_close(
        torch.cov(z.T),
        q.covariance_matrix[0] if covariance == "full" else torch.diag(q.variance[0]),
        atol=0.01,
        rtol=0.01,
    )


def test_score_and_reparam_training_gradients_agree_in_expectation() -> None:
    """The VAE's two estimators give the same expected gradient of L_k (k = 3) on every parameter,
    within 5 standard errors estimated from 16 independent batches."""
    x = x_batch(1).repeat(2000, 1)
    grads = {}
    for estimator in ("reparam", "score"):
        model = VAE(
            shape=(D,), latent_dim=d, decoder="linear", likelihood="gaussian", k=3, estimator=estimator
        ).double()
        model.load_state_dict(linear_gaussian("diagonal", inflate=1.5).state_dict(), strict=False)
        runs = []
        for seed in range(16):
            model.seed = seed
            model.zero_grad()
            model.training_loss(x).backward()
            runs.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        grads[estimator] = torch.stack(runs)
    mean_r, mean_s = grads["reparam"].mean(0), grads["score"].mean(0)
    se = (grads["reparam"].var(0) / 16 + grads["score"].var(0) / 16).sqrt()
    assert ((mean_r - mean_s).abs() <= 5 * se + 1e-6).all()
    assert grads["score"].var(0).sum() > grads["reparam"].var(0).sum()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_written_out_log_likelihood_equals_torch_distributions(likelihood: str) -> None:
    torch.manual_seed(0)
    model = VAE(shape=(1, 3, 3), latent_dim=2, hidden=(8,), likelihood=likelihood).double()
    if likelihood == "gaussian":
        with torch.no_grad():
            model.log_scale.copy_(torch.linspace(-1, 1, 9, dtype=torch.float64))
    x, z = torch.rand(5, 1, 3, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    torch.testing.assert_close(
        model.log_likelihood(x, z), model.observation(z).log_prob(x), atol=1e-12, rtol=0
    )


def test_diagonal_kl_closed_form_equals_torch_distributions() -> None:
    """Seed 001's 1/2 Σ (σ² + μ² - 1 - log σ²) against the library's KL for diagonal Gaussians."""
    torch.manual_seed(0)
    params = GaussianHead(3, 4, "diagonal").double()(torch.randn(6, 3, dtype=torch.float64))
    prior = standard_normal(4, "diagonal", params.loc)
    library = kl_divergence(params.distribution(), prior)
    torch.testing.assert_close(params.kl_to_standard_normal(), library, atol=1e-12, rtol=0)
