"""DiscreteVAE maths against closed forms and enumeration: Gumbel-max frequencies, the straight-through
sample, the exact log p(x) of a 2 x 4 categorical model on 6-bit data, the bounds below it, and each
estimator's gradient against the exact gradient of the discrete ELBO computed by enumeration."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from cli_runs import check_parity_and_resume
from scipy.stats import chi2
from torch.distributions import RelaxedOneHotCategorical
from torch.nn.functional import one_hot

from zoo import DiscreteVAE
from zoo.discrete_vae import gumbel_max, relaxed_log_sample, straight_through
from zoo.noise import global_uniform, mix_key, pinned_noise, positional_uniform

LOGITS = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
ALL_6BIT = torch.tensor(list(itertools.product((0.0, 1.0), repeat=6)), dtype=torch.float64)  # [64, 6]
X = ALL_6BIT[[11, 56, 63, 21]]


@pytest.mark.parametrize("source", ["torch.rand", "global_uniform", "positional_uniform"])
def test_gumbel_max_frequencies_are_the_softmax(source: str) -> None:
    """argmax(logits + G) over 100,000 draws: Pearson's chi-square against n * softmax(logits) stays below the
    0.999 quantile of chi2(4) (18.5), for the uniforms of every noise source the family uses."""
    n = 100_000
    uniform = {
        "torch.rand": lambda: torch.rand(n, 5, generator=torch.Generator().manual_seed(0)),
        "global_uniform": lambda: global_uniform(n, (5,), key=1),
        "positional_uniform": lambda: positional_uniform(n, (5,), key=2),
    }[source]()
    counts = gumbel_max(LOGITS, uniform).sum(0).double()
    expected = n * torch.softmax(LOGITS.double(), 0)
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    assert statistic < chi2.ppf(0.999, df=4), statistic


def test_relaxed_sample_is_torch_distributions_rsample() -> None:
    """Same uniforms -> the same Concrete sample as ``RelaxedOneHotCategorical.rsample`` (which draws
    ``torch.rand`` of the sample shape), to float32 rounding; rows sum to 1 and are finite."""
    tau = torch.tensor(0.7)
    torch.manual_seed(3)
    reference = RelaxedOneHotCategorical(tau, logits=LOGITS).rsample((1000,))
    torch.manual_seed(3)
    ours = relaxed_log_sample(LOGITS, torch.rand(1000, 5), 0.7).exp()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours).all() and torch.allclose(ours.sum(-1), torch.ones(1000))


def test_straight_through_is_one_hot_forward_and_relaxed_backward() -> None:
    logits = LOGITS.repeat(8, 1).requires_grad_(True)
    uniform = torch.rand(8, 5, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    soft = relaxed_log_sample(logits, uniform, 0.5).exp()
    hard = straight_through(soft)
    assert torch.equal(hard, gumbel_max(logits.detach(), uniform))  # exactly one-hot, the Gumbel-max draw
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert torch.equal(g_hard, g_soft) and g_soft.abs().sum() > 0


def small_model(**kwargs) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(shape=(6,), n_latents=2, n_categories=4, hidden=(16,), **kwargs).double()


def enumerate_posterior(model: DiscreteVAE, x: torch.Tensor):
    """Every configuration z_m [M, L, C], log q(z_m | x) [M, B] and log p(x, z_m) [M, B]."""
    index = torch.tensor(list(itertools.product(range(model.n_categories), repeat=model.n_latents)))
    z = one_hot(index, model.n_categories).to(x.dtype)
    log_q = torch.einsum("mlc,blc->mb", z, torch.log_softmax(model.posterior_logits(x), -1))
    log_joint = model.log_likelihood(x, z[:, None].expand(-1, len(x), -1, -1))
    return z, log_q, log_joint - model.n_latents * math.log(model.n_categories)


def exact_elbo(model: DiscreteVAE, x: torch.Tensor) -> torch.Tensor:
    """Σ_z q(z | x) [log p(x, z) - log q(z | x)], by enumeration of the 16 configurations."""
    _, log_q, log_joint = enumerate_posterior(model, x)
    return (log_q.exp() * (log_joint - log_q)).sum(0)


def test_exp_log_prob_sums_to_one_over_all_6bit_inputs() -> None:
    """Σ_x p(x) = 1 over the 64 binary vectors (float64, to 1e-12), and log_prob agrees with a brute-force
    sum through ``torch.distributions`` (``prior`` and ``observation``)."""
    model = small_model()
    log_p = model.log_prob(ALL_6BIT)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    z, _, _ = enumerate_posterior(model, ALL_6BIT)
    brute = torch.logsumexp(
        torch.stack([model.observation(zi).log_prob(ALL_6BIT) + model.prior(zi).log_prob(zi) for zi in z]), 0
    )
    torch.testing.assert_close(log_p, brute, atol=1e-12, rtol=0)


def test_log_prob_refuses_too_many_configurations() -> None:
    model = DiscreteVAE(shape=(4,), n_latents=17, n_categories=2, hidden=(8,))
    with pytest.raises(NotImplementedError, match="2 \\*\\* 17 = 131072"):
        model.log_prob(torch.zeros(1, 4))


def test_elbo_is_below_log_prob_and_iwae_approaches_it() -> None:
    """Exact (enumerated) ELBO = log p - KL(q || p(z | x)) < log p; the Monte Carlo ``elbo`` matches it within
    4 standard errors; the IWAE-k estimates (means of 200 draws) rise with k = 1, 10, 100, 1000 (each step up
    to 4 combined SE of noise; L_1000 - L_1 > 0.1 nats), stay below log p within 4 SE, and the k = 1000 gap is
    within 4 SE of its delta-method value χ²(p(z|x) ‖ q) / (2k)."""
    model = small_model()
    with torch.no_grad():
        model.decoder[-2].weight.mul_(6)  # a sharper decoder and encoder than at initialisation, so the
        model.encoder[-1][-1].weight.mul_(3)  # posterior is informative and the bounds' gaps are visible
        log_p = model.log_prob(X)
        elbo = exact_elbo(model, X)
        assert (elbo < log_p - 1e-3).all()
        draws = model.elbo(X.repeat(2000, 1), torch.Generator().manual_seed(0)).reshape(2000, len(X))
        se = draws.std(0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - elbo).abs() < 4 * se).all()
        previous, previous_se = torch.full_like(log_p, -math.inf), torch.zeros_like(log_p)
        for i, k in enumerate((1, 10, 100, 1000)):
            g = torch.Generator().manual_seed(100 + i)
            bounds = model.iwae_bound(X.repeat(200, 1), k, g).reshape(200, len(X))
            mean, se = bounds.mean(0), bounds.std(0) / math.sqrt(200)
            assert (mean > previous - 4 * (se**2 + previous_se**2).sqrt()).all(), k
            assert (mean < log_p + 4 * se).all(), k
            if k == 1:
                first = mean
            previous, previous_se = mean, se
        assert (mean - first > 0.1).all()  # the bound tightens by far more than its error (seen 0.23-0.49)
        _, log_q, log_joint = enumerate_posterior(model, X)
        chi_square = (torch.exp(2 * (log_joint - log_p) - log_q)).sum(0) - 1  # Σ_z p(z|x)² / q(z|x) - 1
        assert ((log_p - mean - chi_square / 2000).abs() < 4 * se + 1e-4).all()


def mc_gradients(estimator: str, temperature: float = 1.0, replicates: int = 40, copies: int = 500):
    """``replicates`` independent estimates of ∇(-ELBO) (each the mean over ``copies`` noise draws for each of
    the 4 points), and the exact gradient by enumeration; flattened over all parameters."""
    model = small_model(estimator=estimator, temperature=temperature, temperature_min=temperature)
    params = list(model.parameters())
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    exact = flat(torch.autograd.grad(-exact_elbo(model, X).mean(), params))
    estimates = []
    for replicate in range(replicates):
        model.seed = replicate  # the training noise's key
        with pinned_noise(model):
            estimates.append(flat(torch.autograd.grad(model.training_loss(X.repeat(copies, 1)), params)))
    estimates = torch.stack(estimates)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    return estimates, exact, n_encoder


def z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(mean - exact) / standard error per coordinate (coordinates without noise must match exactly)."""
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    noisy = se > 0
    torch.testing.assert_close(mean[~noisy], exact[~noisy])
    return torch.where(noisy, (mean - exact) / se.clamp_min(1e-300), torch.zeros_like(mean))


def test_score_function_gradient_is_unbiased() -> None:
    """REINFORCE with the baseline: every one of the 494 coordinates within 5 standard errors of the exact
    gradient (z-scores are t(39); P(|t| > 5) = 1.3e-5 each, < 1% for all by the union bound); the mean z² is
    near 1 (seen 0.99; bound 1.5)."""
    estimates, exact, _ = mc_gradients("score")
    z = z_scores(estimates, exact)
    assert z.abs().max() < 5 and (z**2).mean() < 1.5


def test_relaxed_gradients_are_biased_and_the_bias_shrinks_with_the_temperature() -> None:
    """The Concrete relaxation optimises another objective: at τ = 1 its mean gradient is off by hundreds of
    standard errors (mean z² seen 5300; asserted > 25), yet points the same way (cosine > 0.99); the relative
    bias shrinks as τ falls (seen 0.111, 0.073, 0.019 at τ = 1, 0.5, 0.1). Straight-through: the decoder's
    gradient is unbiased (the forward pass uses exact one-hots: all |z| < 5) and the encoder's is biased,
    shrinking with τ too (seen 0.107, 0.062, 0.044)."""
    relative = {"gumbel": [], "straight_through": []}
    for estimator in relative:
        for tau in (1.0, 0.5, 0.1):
            estimates, exact, n_encoder = mc_gradients(estimator, tau)
            z, error = z_scores(estimates, exact), estimates.mean(0) - exact
            assert torch.cosine_similarity(estimates.mean(0), exact, 0) > 0.99
            if estimator == "gumbel":
                relative[estimator].append((error.norm() / exact.norm()).item())
                if tau == 1.0:
                    assert (z**2).mean() > 25
            else:
                relative[estimator].append((error[:n_encoder].norm() / exact[:n_encoder].norm()).item())
                assert z[n_encoder:].abs().max() < 5
                if tau == 1.0:
                    assert (z[:n_encoder] ** 2).mean() > 25
    for estimator, errors in relative.items():
        assert errors[0] > errors[1] > errors[2], (estimator, errors)


@pytest.mark.parametrize("k", [1, 3])
def test_straight_through_loss_is_the_discrete_bound(k: int) -> None:
    """The straight-through forward value is the discrete model's: -L_1 (closed-form KL) or -L_k from the
    same one-hot draws that ``log_importance_weights`` makes from the same uniforms."""
    model = small_model(estimator="straight_through", k=k)
    uniform = global_uniform(len(X), (k, 2, 4), key=mix_key(0, 0, 0)).transpose(0, 1)
    logits = model.posterior_logits(X)
    z = gumbel_max(logits, uniform.double())
    if k == 1:
        expected = model.log_likelihood(X, z)[0] - model.kl(logits)
    else:
        expected = torch.logsumexp(model._discrete_log_weights(X, logits, z), 0) - math.log(k)
    with pinned_noise(model, step=0):  # the key of global step 0, as under a Trainer
        loss = model.training_loss(X)
    torch.testing.assert_close(loss, -expected.mean(), atol=1e-12, rtol=0)


def test_training_logs_the_temperature_it_uses(tmp_path: Path) -> None:
    """A few steps through a Trainer: train/temperature is the schedule at the logged step."""
    import lightning as L

    from datamodules import Digits

    model = DiscreteVAE(shape=(1, 8, 8), n_latents=3, n_categories=4, hidden=(16,), temperature_min=0.25,
                        anneal_steps=4)  # fmt: skip
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, Digits(batch_size=64, binarize="static"))
    assert trainer.callback_metrics["train/temperature"].item() == pytest.approx(model.temperature(2))


def test_temperature_anneals_exponentially_to_the_floor() -> None:
    model = DiscreteVAE(shape=(4,), temperature=2.0, temperature_min=0.5, anneal_steps=100, hidden=(8,))
    assert model.temperature(0) == 2.0 and model.temperature(50) == pytest.approx(1.0)
    assert model.temperature(100) == pytest.approx(0.5) and model.temperature(10_000) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(estimator="reinforce"),
        dict(n_categories=1),
        dict(temperature=0.5, temperature_min=1.0),
        dict(temperature_min=0.0),
        dict(anneal_steps=-1),
        dict(k=0),
    ],
)
def test_bad_arguments_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        DiscreteVAE(shape=(4,), **kwargs)


# -- through the CLI: 2 processes = 1 process, and a resumed run continues exactly ------------------------

CLI_ARGS = (
    "--model=DiscreteVAE", "--model.n_latents=4", "--model.n_categories=3", "--model.hidden=[32]",
    "--model.eval_k=10", "--model.temperature_min=0.5", "--model.anneal_steps=60",
    "--data=Digits", "--data.binarize=dynamic", "--data.batch_size=64",
    "--trainer.limit_train_batches=12", "--trainer.limit_val_batches=2",
)  # fmt: skip


@pytest.mark.ddp
def test_two_processes_match_one_and_a_resumed_run_continues_exactly(tmp_path: Path) -> None:
    """Four ``cli.py fit`` runs with the score-function estimator (Gumbel-max noise from keyed uniforms, the
    baseline all-reduced and checkpointed), the first shared by both checks:

    * parity: 2 epochs (24 steps) on 1 and on 2 gloo processes, same global batch: per-epoch val/elbo and
      val/iwae agree to 1e-4 nats and the final weights and baseline to float32 tolerance (atol 1e-6, rtol
      1e-5); only the order of the all-reduce sums differs. Rank 0 draws the pictures without hanging rank 1.
    * resume: 3 epochs in one go == the 2-epoch run, ``--ckpt_path`` to its checkpoint, 1 more: every weight,
      the baseline and the epoch-3 val/elbo equal bit for bit.
    """
    state = check_parity_and_resume(
        tmp_path, (*CLI_ARGS, "--model.estimator=score"), ("val/iwae", "val/elbo")
    )
    assert "baseline.value" in state


def test_uniform_noise_shards_reassemble_the_one_process_noise() -> None:
    """The uniform twins of zoo.noise: W processes' rows are the one-process rows (even and uneven shards)."""
    full = global_uniform(12, (3, 2), key=7)
    for world in (2, 3):
        for rank in range(world):
            assert torch.equal(
                global_uniform(12 // world, (3, 2), key=7, rank=rank, world=world), full[rank::world]
            )
    full = positional_uniform(41, (5,), key=3)
    assert torch.equal(positional_uniform(21, (5,), key=3, rank=0, world=2), full[0::2])
    assert torch.equal(positional_uniform(20, (5,), key=3, rank=1, world=2), full[1::2])
    assert 0 < full.min() and full.max() < 1
