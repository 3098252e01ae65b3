"""Natural gradient against closed forms: the Fisher is the Hessian of the KL (seed 001); the Fisher-vector
products equal the closed-form F v of a Gaussian's (mean, log-scale) and the dense Jᵀ J / Hessian; one step
with lr = 1 on a Gaussian's mean lands on the maximum-likelihood mean; on a badly conditioned Gaussian fit it
needs far fewer steps than Adam and SGD."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import Toy2D
from zoo import ExplicitGaussian
from zoo.natural_gradient import NaturalGradient, conjugate_gradient, fisher_vector_product

MU, SIGMA = 0.7, 1.5
V = torch.tensor([0.3, -1.1], dtype=torch.float64)


def gaussian_1d() -> ExplicitGaussian:
    model = ExplicitGaussian(shape=(1,)).double()
    with torch.no_grad():
        model.mean.fill_(MU)
        model.tril.fill_(math.log(SIGMA))  # θ = (μ, s = log σ)
    return model


def test_the_fisher_is_the_hessian_of_the_kl() -> None:
    """∇²_δ KL[N(μ, σ²) ‖ N(μ + δ_μ, σ² e^{2 δ_s})] at δ = 0 is the Fisher diag(1/σ², 2) of (μ, log σ)
    (seed 001's derivation), the KL in closed form, the Hessian by autograd (float64, to 1e-12)."""

    def kl(delta: torch.Tensor) -> torch.Tensor:
        mu2, log_sigma2 = MU + delta[0], math.log(SIGMA) + delta[1]
        return (
            log_sigma2
            - math.log(SIGMA)
            + (SIGMA**2 + (MU - mu2) ** 2) / (2 * torch.exp(2 * log_sigma2))
            - 0.5
        )

    hessian = torch.autograd.functional.hessian(kl, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(hessian, torch.diag(torch.tensor([1 / SIGMA**2, 2.0], dtype=torch.float64)))


@pytest.mark.parametrize("fisher", ["outer", "kl_hessian"])
def test_fisher_vector_product_is_the_closed_form_fisher(fisher: str) -> None:
    """On 200,000 samples of N(μ, σ²): the product equals the mean of the per-sample closed forms (outer:
    s sᵀ v with the score s = ((x - μ)/σ², (x - μ)²/σ² - 1); kl_hessian: -∇² log p v = [[1/σ², 2(x - μ)/σ²],
    [2(x - μ)/σ², 2(x - μ)²/σ²]] v) to 1e-10, and that mean is within 5 standard errors of
    F v = diag(1/σ², 2) v."""
    model = gaussian_1d()
    x = model.sample(200_000, generator=torch.Generator().manual_seed(0))
    params = [model.mean, model.tril]
    product = fisher_vector_product(model.log_prob(x), params, fisher)
    fv = product(V)
    r = (x[:, 0] - MU) / SIGMA  # standardised
    if fisher == "outer":
        score = torch.stack([r / SIGMA, r**2 - 1], 1)
        per_sample = score * (score @ V)[:, None]
    else:
        per_sample = torch.stack(
            [V[0] / SIGMA**2 + 2 * r / SIGMA * V[1], 2 * r / SIGMA * V[0] + 2 * r**2 * V[1]], 1
        )
    torch.testing.assert_close(fv, per_sample.mean(0), atol=1e-10, rtol=1e-10)
    exact = torch.tensor([1 / SIGMA**2, 2.0], dtype=torch.float64) * V
    se = per_sample.std(0) / math.sqrt(len(x))
    assert ((fv - exact).abs() < 5 * se).all(), (fv, exact, se)


@pytest.mark.parametrize("fisher", ["outer", "kl_hessian"])
def test_fisher_vector_product_matches_the_dense_matrices(fisher: str) -> None:
    """3-D Gaussian (12 parameters), 50 samples: the product equals Jᵀ J v / N (per-example gradients) or the
    dense Hessian of -mean log p times v, to 1e-10 in float64."""
    torch.manual_seed(0)
    model = ExplicitGaussian(shape=(3,)).double()
    with torch.no_grad():
        model.mean.normal_()
        model.tril.normal_(std=0.3)
    x = model.sample(50, generator=torch.Generator().manual_seed(1))
    params = [model.mean, model.tril]
    v = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fv = fisher_vector_product(model.log_prob(x), params, fisher)(v)

    def log_prob_at(flat: torch.Tensor) -> torch.Tensor:
        mean, tril = flat[:3], flat[3:].reshape(3, 3)
        scale = torch.tril(tril, -1) + torch.diag(tril.diagonal().exp())
        return torch.distributions.MultivariateNormal(mean, scale_tril=scale).log_prob(x)

    theta = torch.cat([model.mean.detach(), model.tril.detach().reshape(-1)])
    if fisher == "outer":
        jacobian = torch.autograd.functional.jacobian(log_prob_at, theta)  # [N, P]
        dense = jacobian.T @ jacobian / len(x)
    else:
        dense = torch.autograd.functional.hessian(lambda t: -log_prob_at(t).mean(), theta)
    torch.testing.assert_close(fv, dense @ v, atol=1e-10, rtol=1e-10)


def test_one_step_with_lr_1_on_the_mean_lands_on_the_ml_mean() -> None:
    """Only μ trained, Σ fixed: F_μμ = Σ⁻¹ exactly (kl_hessian needs no sample for it) and ∇_μ NLL =
    -Σ⁻¹ (x̄ - μ), so μ + Σ Σ⁻¹ (x̄ - μ) = x̄ after one undamped step (CG: 2 iterations in 2-D), to 1e-10."""
    model = ExplicitGaussian(shape=(2,)).double()
    with torch.no_grad():
        model.tril.copy_(torch.tensor([[0.4, 0.0], [0.9, -0.3]]))
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 5
    optimizer = NaturalGradient([model.mean], model, lr=1.0, damping=0.0, fisher="kl_hessian")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model.training_loss(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(model.mean.detach(), x.mean(0), atol=1e-10, rtol=0)
    assert optimizer.last_cg_iters <= 2


def steps_to_target(
    optimizer_name: str, lr: float, x: torch.Tensor, target: float, max_steps: int
) -> int | None:
    model = ExplicitGaussian(shape=(2,)).double()
    if optimizer_name == "natural":
        optimizer = NaturalGradient(model.parameters(), model, lr=lr, n_samples=1000)
    else:
        optimizer = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer_name](
            model.parameters(), lr=lr
        )
    for step in range(1, max_steps + 1):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model.training_loss(x)
            loss.backward()
            return loss

        if optimizer.step(closure).item() < target:
            return step
    return None


def test_natural_gradient_beats_adam_and_sgd_on_a_badly_conditioned_gaussian() -> None:
    """ML fit of N(μ, L Lᵀ) from N(0, I) to 1,000 points with correlation 0.999 (condition number ~2,000):
    steps until the NLL is within 1e-3 nats of the closed-form optimum. Seen: natural gradient (lr = 1,
    outer Fisher on 1,000 model samples) 22; Adam at its best lr of {1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3} (0.1)
    341; SGD at every lr of {1e-3, ..., 0.1}: not within 3,000 steps. Asserted: natural <= 40 < Adam, SGD
    (capped at 400 steps here)."""
    covariance = 4 * torch.tensor([[1.0, 0.999], [0.999, 1.0]], dtype=torch.float64)
    eps = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.tensor([3.0, -1.0], dtype=torch.float64) + eps @ torch.linalg.cholesky(covariance).T
    target = 0.5 * torch.logdet(2 * math.pi * torch.cov(x.T, correction=0)).item() + 1.0 + 1e-3
    natural = steps_to_target("natural", 1.0, x, target, 400)
    adam = steps_to_target("adam", 0.1, x, target, 400)
    sgd = steps_to_target("sgd", 0.01, x, target, 400)
    print(f"steps to NLL* + 1e-3: natural {natural}, adam(0.1) {adam}, sgd(0.01) {sgd}")
    assert natural is not None and natural <= 40
    assert adam is None or adam > natural
    assert sgd is None or sgd > natural


def test_conjugate_gradient_solves_a_spd_system() -> None:
    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x, iterations = conjugate_gradient(lambda v: a @ v, b, max_iter=10, tol=1e-28)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-12, rtol=0)
    assert iterations <= 3  # exact in n steps (Hestenes & Stiefel)


def test_natural_gradient_needs_an_exact_likelihood() -> None:
    with pytest.raises(TypeError, match="log_prob"):
        NaturalGradient(nn.Linear(2, 2).parameters(), nn.Linear(2, 2))


def test_a_restored_optimizer_continues_exactly() -> None:
    """The Fisher samples are keyed by the step count, which the optimizer's state_dict carries: 2 steps,
    save, restore into a fresh optimizer, 1 more == 3 steps in one go, bit for bit."""
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 0.2]) + 1.0

    def run(steps: int, state: dict | None = None, start: ExplicitGaussian | None = None):
        model = start or ExplicitGaussian(shape=(2,))
        optimizer = NaturalGradient(model.parameters(), model, lr=0.5, n_samples=64)
        if state is not None:
            optimizer.load_state_dict(state)
        for _ in range(steps):
            optimizer.zero_grad()
            model.training_loss(x).backward()
            optimizer.step()
        return model, optimizer

    straight, _ = run(3)
    half, optimizer = run(2)
    resumed, _ = run(1, optimizer.state_dict(), half)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.ddp
def test_two_processes_match_one_and_a_resumed_run_continues_exactly(tmp_path) -> None:
    """``configs/natural_gradient_toy2d.yaml``'s model through ``cli.py fit`` (helper: tests/cli_runs.py).

    Parity: 1 and 2 gloo processes, same global batch; DDP all-reduces the gradient and every rank draws the
    same Fisher samples (keyed by (seed, step)), so both solve the same system: val/log_prob per epoch agrees
    to 1e-4 nats and the weights to float32 tolerance. Resume: the step count that keys the Fisher samples
    is in the optimizer's state_dict, so 3 epochs == 2 epochs, ``--ckpt_path``, 1 more, bit for bit.
    lr = 0.5 keeps every step a real update (at lr = 1 the fit sits at its optimum after one step)."""
    from cli_runs import check_parity_and_resume

    args = (
        "--model=ExplicitGaussian", "--model.optimizer=natural", "--model.lr=0.5",
        "--model.fisher_samples=256", "--data=Toy2D", "--data.name=moons", "--data.n_train=512",
        "--data.n_val=200", "--data.n_test=10", "--data.batch_size=128",
    )  # fmt: skip
    state = check_parity_and_resume(tmp_path, args, ("val/log_prob",), pictures=500)
    assert set(state) == {"mean", "tril"}


# -- the natural gradient is a choice of the family's ``optimizer`` argument ---------------------------------


def fit_gaussian(model: ExplicitGaussian, steps: int) -> L.Trainer:
    """``steps`` steps under a Trainer on 512 points of the two moons (batches of 128), validation off."""
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=Toy2D("moons", n_train=512, n_val=64, n_test=64, batch_size=128))
    return trainer


def test_natural_gradient_as_an_optimizer_callable_is_the_shorthand_bit_for_bit() -> None:
    """``optimizer=partial(NaturalGradient, lr=0.5, n_samples=64)``: Lightning's closure-based step runs it,
    the family is bound as its model, and 3 steps give the weights of ``optimizer="natural", lr=0.5,
    fisher_samples=64`` bit for bit (same Fisher samples, keyed by (seed, step))."""
    plug_in = ExplicitGaussian(shape=(2,), optimizer=functools.partial(NaturalGradient, lr=0.5, n_samples=64))
    assert "optimizer" not in plug_in.hparams
    trainer = fit_gaussian(plug_in, 3)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is NaturalGradient and optimizer.model is plug_in and optimizer._step_count() == 3
    shorthand = ExplicitGaussian(shape=(2,), optimizer="natural", lr=0.5, fisher_samples=64)
    fit_gaussian(shorthand, 3)
    assert not torch.equal(plug_in.mean, torch.zeros(2))
    for a, b in zip(plug_in.parameters(), shorthand.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_schedule_steps_the_natural_gradients_lr_and_sgd_is_the_users() -> None:
    """``StepLR(step_size=2, gamma=0.1)`` on NaturalGradient(lr=1): lr 0.1 after 3 steps (the optimiser reads
    its group's lr at every step). ``optimizer=partial(SGD, lr=0.01)`` is the Trainer's optimiser."""
    scheduled = ExplicitGaussian(
        shape=(2,), optimizer=functools.partial(NaturalGradient, lr=1.0, n_samples=64),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.1),
    )  # fmt: skip
    trainer = fit_gaussian(scheduled, 3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1, rel=1e-12)
    sgd = ExplicitGaussian(shape=(2,), optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    assert type(fit_gaussian(sgd, 1).optimizers[0]) is torch.optim.SGD
    assert type(ExplicitGaussian(shape=(2,), optimizer="adam").configure_optimizers()) is torch.optim.Adam


def test_natural_gradient_without_a_model_says_how_to_bind_one() -> None:
    model = ExplicitGaussian(shape=(2,))
    optimizer = NaturalGradient(model.parameters(), lr=1.0)
    model.training_loss(torch.randn(8, 2)).backward()
    with pytest.raises(RuntimeError, match="bind_model"):
        optimizer.step()
    optimizer.bind_model(model)
    optimizer.step()
    assert optimizer._step_count() == 1
    with pytest.raises(TypeError, match="log_prob"):
        optimizer.bind_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="optimizer must be"):
        ExplicitGaussian(shape=(2,), optimizer="lbfgs")


@pytest.mark.slow
def test_the_recipes_class_path_form_is_the_shorthand_and_reloads_with_no_arguments(tmp_path, monkeypatch):
    """``configs/natural_gradient_toy2d.yaml`` names ``zoo.natural_gradient.NaturalGradient`` by class_path;
    ``--model.optimizer=natural --model.fisher_samples=512`` is the same run: 3 steps give the same weights
    bit for bit. The class_path run's checkpoint reloads with ``load_from_checkpoint(path)`` alone, and its
    optimiser is rebuilt from the saved init_args (NaturalGradient, lr 1, 512 Fisher samples)."""
    from cli import run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "natural_gradient_toy2d.yaml")
    models = {}
    for form, extra in (("class_path", []), ("shorthand", ["--model.optimizer=natural",
                                                           "--model.fisher_samples=512"])):  # fmt: skip
        folder = tmp_path / form
        folder.mkdir()
        monkeypatch.chdir(folder)
        cli = run([
            "fit", "-c", recipe, *extra, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
            "--trainer.callbacks=[]", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--data.n_train=3000", f"--trainer.default_root_dir={folder}",
        ])  # fmt: skip
        assert type(cli.trainer.optimizers[0]) is NaturalGradient
        models[form] = cli.model
    for a, b in zip(models["class_path"].parameters(), models["shorthand"].parameters(), strict=True):
        assert torch.equal(a, b)
    (path,) = (tmp_path / "class_path").rglob("*.ckpt")
    restored = ExplicitGaussian.load_from_checkpoint(path)
    assert torch.equal(restored.mean, models["class_path"].mean)
    optimizer = restored.configure_optimizers()
    assert type(optimizer) is NaturalGradient and optimizer.model is restored
    assert optimizer.param_groups[0]["lr"] == 1.0 and optimizer.n_samples == 512
