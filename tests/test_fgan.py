"""f-GAN bounds against closed forms (p = N(1, 1), q = N(0, 1): KL = 1/2), their ordering, the DDP-exact
log-mean-exp, the validation metric, and 2-process gradient parity for the Donsker-Varadhan critic."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy import integrate, stats

from datamodules import Toy2D
from zoo import FGAN
from zoo.fgan import BoundMetric, log_mean_exp, variational_bound

N = 400_000
KL = 0.5  # KL(N(1, 1) || N(0, 1)) = (μ_p - μ_q)² / 2


def draws(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(N, generator=g, dtype=torch.float64) + 1.0
    xq = torch.randn(N, generator=g, dtype=torch.float64)
    return xp, xq


def standard_error(real_terms: torch.Tensor, fake_terms: torch.Tensor) -> float:
    """Standard error of mean(real_terms) - mean(fake_terms) with independent samples."""
    return math.sqrt(real_terms.var().item() / len(real_terms) + fake_terms.var().item() / len(fake_terms))


def test_nwj_bound_with_the_optimal_critic_is_the_kl() -> None:
    """T* = 1 + log p/q = x + 1/2 gives R1 = E_p T* - E_q e^(T*-1) = 3/2 - 1 = KL exactly (seed 003, Q6.1)."""
    xp, xq = draws()
    tp, tq = xp + 0.5, xq + 0.5
    value = variational_bound("kl_nwj", tp, tq).item()
    assert value == pytest.approx(KL, abs=4 * standard_error(tp, torch.exp(tq - 1)))


@pytest.mark.parametrize("c", [0.0, 3.0, -2.0])
def test_dv_bound_with_log_ratio_plus_any_constant_is_the_kl(c: float) -> None:
    """T = log p/q + c = x - 1/2 + c gives R2 = E_p T - log E_q e^T = KL for every c (seed 003, Q6.2)."""
    xp, xq = draws(1)
    tp, tq = xp - 0.5 + c, xq - 0.5 + c
    # delta method: Var(log mean e^T) ~ Var(e^T) / (n E[e^T]^2)
    w = torch.exp(tq - tq.max())
    se = math.sqrt(tp.var().item() / N + (w.var() / w.mean() ** 2).item() / N)
    assert variational_bound("kl_dv", tp, tq).item() == pytest.approx(KL, abs=4 * se)


def test_suboptimal_critic_nwj_below_dv_below_kl_and_both_match_their_closed_forms() -> None:
    """T = a x + b with a = 1/2, b = 0: E_p T = a + b, E_q e^T = e^(b + a²/2), so
    R1 = a + b - e^(b + a²/2 - 1) = 0.0831 and R2 = a - a²/2 = 0.375; R1 <= R2 <= KL (seed 003, Q6.3), and on
    the same samples R1 <= R2 holds exactly (log m <= m - 1 with m = mean e^(T-1))."""
    a, b = 0.5, 0.0
    xp, xq = draws(2)
    tp, tq = a * xp + b, a * xq + b
    nwj, dv = variational_bound("kl_nwj", tp, tq).item(), variational_bound("kl_dv", tp, tq).item()
    nwj_exact, dv_exact = a + b - math.exp(b + a * a / 2 - 1), a - a * a / 2
    assert nwj_exact < dv_exact < KL
    assert nwj == pytest.approx(nwj_exact, abs=4 * standard_error(tp, torch.exp(tq - 1)))
    assert dv == pytest.approx(dv_exact, abs=0.01)
    assert nwj <= dv


def test_js_bound_with_the_optimal_logit_is_the_jsd() -> None:
    """l* = log p/q = x - 1/2 (σ(l*) = p / (p + q)) gives log 2 + ½(E_p log σ(l*) + E_q log σ(-l*)) =
    JSD(p, q), here computed by quadrature (seed 002, Q4.1); any other logit gives less."""
    p, q = stats.norm(1, 1), stats.norm(0, 1)

    def integrand(x: float) -> float:
        m = 0.5 * (p.pdf(x) + q.pdf(x))
        return 0.5 * (p.pdf(x) * math.log(p.pdf(x) / m) + q.pdf(x) * math.log(q.pdf(x) / m))

    jsd, _ = integrate.quad(integrand, -15, 16)
    xp, xq = draws(3)
    lp, lq = xp - 0.5, xq - 0.5
    value = variational_bound("js", lp, lq).item()
    real_terms, fake_terms = torch.nn.functional.logsigmoid(lp), torch.nn.functional.logsigmoid(-lq)
    assert value == pytest.approx(jsd, abs=4 * 0.5 * standard_error(real_terms, -fake_terms))
    assert variational_bound("js", 0.5 * lp, 0.5 * lq).item() < jsd
    assert 0 < jsd < math.log(2)


def test_dv_log_mean_exp_is_stable_where_exp_overflows() -> None:
    t = torch.tensor([1000.0, 1000.0, -1000.0])
    assert log_mean_exp(t).item() == pytest.approx(1000.0 + math.log(2 / 3), rel=1e-6)
    assert math.isfinite(variational_bound("kl_nwj", torch.zeros(2), torch.full((2,), 50.0)).item())


def test_log_mean_exp_over_shards_has_the_global_value_and_the_averaged_global_gradient() -> None:
    """Simulate W = 2 DDP shards (rank r holds t[r::2]): each rank's term has the global value, and the mean
    of the ranks' gradients (what DDP applies) is the gradient of the global log-mean-exp."""
    t = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    shards = [t[r::2] for r in range(2)]
    lses = torch.stack([torch.logsumexp(s, 0) for s in shards]).detach()
    terms = [log_mean_exp(s, all_gather=lambda _v: lses, world=2) for s in shards]
    exact = torch.logsumexp(t, 0) - math.log(10)
    for term in terms:
        assert term.item() == pytest.approx(exact.item(), rel=1e-12)
    ddp_gradient = sum(torch.autograd.grad(term, t)[0] for term in terms) / 2
    torch.testing.assert_close(ddp_gradient, torch.autograd.grad(exact, t)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", ["js", "kl_nwj", "kl_dv"])
def test_bound_metric_over_uneven_shards_equals_the_bound_of_the_union(divergence: str) -> None:
    real, fake = torch.randn(1001, dtype=torch.float64) + 1, torch.randn(1001, dtype=torch.float64) * 3
    expected = variational_bound(divergence, real, fake).item()
    shards = [BoundMetric(divergence) for _ in range(3)]
    for r, shard in enumerate(shards):
        for a, b in zip(real[r::3].split(64), fake[r::3].split(64), strict=True):
            shard.update(a, b)
    for shard in shards[1:]:
        shards[0].merge_state(shard)
    assert shards[0].compute().item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("divergence", ["js", "kl_nwj", "kl_dv"])
def test_val_bound_is_the_bound_of_the_validation_samples(divergence: str) -> None:
    model = FGAN(shape=(2,), divergence=divergence, hidden=(16,))
    data = Toy2D("8gaussians", n_train=64, n_val=150, n_test=0, batch_size=64)
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    trainer.validate(model, data, verbose=False)
    val = data.splits["val"].data
    with torch.no_grad():
        fakes = torch.cat([model.validation_fakes(len(b), i, b) for i, b in enumerate(val.split(64))])
        expected = variational_bound(divergence, model.critic(val).double(), model.critic(fakes).double())
    assert float(trainer.callback_metrics["val/bound"]) == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_training_logs_the_bound_in_nats_and_the_critic_maximises_it(tmp_path: Path) -> None:
    """Critic steps only (n_critic larger than the run): the logged train/bound rises, as the critic
    maximises it against the generator's fixed distribution."""
    torch.manual_seed(0)
    model = FGAN(shape=(2,), divergence="kl_dv", hidden=(32, 32), lr_d=1e-2, n_critic=1000, r1_gamma=0.1)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=40, limit_val_batches=0, logger=CSVLogger(tmp_path),
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, Toy2D("8gaussians", n_train=64 * 40, n_val=64, batch_size=64))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        bounds = [float(r["train/bound"]) for r in csv.DictReader(f) if r.get("train/bound")]
    assert len(bounds) == 40 and "train/g_loss" not in trainer.callback_metrics  # never the generator's turn
    assert sum(bounds[-5:]) / 5 > sum(bounds[:5]) / 5 + 0.5


class SGDFGAN(FGAN):
    """FGAN with plain SGD for both players (test helper, ``--model=test_fgan.SGDFGAN``): its weights are a
    linear function of the gradients, so their 1-vs-2-process difference has a bound derived from the
    measured gradient differences (``test_gan.sgd_weight_tolerance``), on any machine."""

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.opponent_parameters(), lr=self.lr_d),
            torch.optim.SGD(self.generator_parameters(), lr=self.lr_g),
        ]


@pytest.mark.ddp
def test_two_processes_give_the_one_process_gradients_for_the_dv_critic(tmp_path: Path) -> None:
    """Donsker-Varadhan's log E_q e^T is not a mean, so a naive per-process estimate gives other gradients;
    with the all-gathered log-mean-exp, 2 gloo processes reproduce the 1-process gradients of every step to
    float32 tolerance (seen: max |Δgrad| 4e-7), the 2 ranks hold identical gradients, and the final weights
    agree to the bound plain SGD guarantees (lr x the summed gradient differences + float32 rounding of the
    updates). The optimiser is SGD, not Adam: Adam divides by sqrt(v) + eps, so a nearly dead unit (gradient
    ~1e-8) moves by a fraction of lr set by rounding, and its final weight depended on the machine (off by
    > 1e-3 = lr on some). The gradients, what the all-gathered log-mean-exp is about, do not depend on it.
    """
    from test_gan import assert_parity, cli_fit_together, load_dump

    lr = 1e-2
    args = ("--model=test_fgan.SGDFGAN", "--model.divergence=kl_dv", "--model.latent_dim=3",
            "--model.hidden=[32,32]", "--model.r1_gamma=1.0", f"--model.lr_d={lr}",
            f"--model.lr_g={lr}")  # fmt: skip
    cli_fit_together({tmp_path / "devices1": (1, "auto"), tmp_path / "devices2": (2, "ddp")}, *args)
    one, two = load_dump(tmp_path / "devices1"), load_dump(tmp_path / "devices2")
    # Gradient tolerance: each entry is a sum over the 64 examples of the global batch, which 2 processes add
    # in another order (2 half sums, then DDP's average); float32 rounding moves a 64-term sum by at most
    # 64 * 2^-24 (3.8e-6) times the sum of the terms' magnitudes (<~ 1 here; rtol covers larger entries).
    # Seen: 4.2e-7 on the critic's output bias, whose DV gradient is 0 in exact arithmetic (DV is invariant
    # to constants), so all of it is rounding. A naive per-process log-mean-exp moves each example's softmax
    # weight by 4e-4 (critic outputs of spread 0.1) to 3e-2 (spread 1): 100x to 10,000x this tolerance.
    worst = assert_parity(
        one, two, load_dump(tmp_path / "devices2", 1), atol=64 * 2.0**-24, rtol=1e-5, sgd_lr=lr
    )
    print(f"kl_dv: worst |grad diff| {worst['grad']:.2e}, |weight diff| {worst['weight']:.2e}")
