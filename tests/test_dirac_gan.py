"""The Dirac-GAN (seed 002 Q5): its field against the closed form, its Jacobian at the equilibrium against the
seed's J*, its training step against the Euler step, and short runs that circle (no penalty) or converge (R1).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cli import run as cli_run
from datamodules import Dirac
from zoo import DiracGAN
from zoo.dirac_gan import dirac_gan_field

F64 = dict(dtype=torch.float64)


def model_at(
    psi0: float, psi1: float, theta: float, gamma: float = 0.0, lr: float = 0.1, **kwargs
) -> DiracGAN:
    """A float64 model at exactly this point (the constructor keeps float32 values)."""
    model = DiracGAN(gamma=gamma, lr=lr, **kwargs).double()
    with torch.no_grad():
        for name, value in (("psi0", psi0), ("psi1", psi1), ("theta", theta)):
            getattr(model, name).fill_(value)
    return model


def data(loc: float = 0.0, n: int = 3) -> torch.Tensor:
    return torch.full((n, 1), loc, **F64)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("loc", [0.0, 0.7])
def test_field_by_autograd_is_the_closed_form(gamma: float, loc: float) -> None:
    """At 20 random points (float64): -∇ of the players' losses == the seed's formula, to 1e-12."""
    g = torch.Generator().manual_seed(0)
    for point in 3 * torch.randn(20, 3, generator=g, **F64):
        model = model_at(*point.tolist(), gamma)
        field = model.vector_field(data(loc))
        expected = dirac_gan_field(*point, gamma, loc)
        assert expected.dtype == torch.float64
        torch.testing.assert_close(field, expected, atol=1e-12, rtol=0)


def test_closed_form_is_the_seed_formula_written_out() -> None:
    """v = (-θσ(C(θ)) - γψ0, σ(-ψ1) - σ(C(θ)), ψ0σ(C(θ))), C(θ) = ψ0θ + ψ1: a hand-computed point."""
    psi0, psi1, theta, gamma = 0.5, -1.0, 2.0, 0.25
    s = 1 / (1 + math.exp(-(psi0 * theta + psi1)))  # σ(0) = 1/2
    expected = [-theta * s - gamma * psi0, 1 / (1 + math.exp(-1.0)) - s, psi0 * s]
    assert dirac_gan_field(psi0, psi1, theta, gamma).tolist() == pytest.approx(expected, abs=1e-7)
    assert expected == pytest.approx([-1.125, 1 / (1 + math.exp(-1.0)) - 0.5, 0.25])


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_the_equilibrium_has_zero_field(gamma: float) -> None:
    assert torch.equal(model_at(0.0, 0.0, 0.0, gamma).vector_field(data()), torch.zeros(3, **F64))
    assert torch.equal(model_at(0.0, 0.0, 0.7, gamma).vector_field(data(0.7)), torch.zeros(3, **F64))


def jacobian(model: DiracGAN, batch: torch.Tensor) -> torch.Tensor:
    field = model.vector_field(batch, create_graph=True)
    params = [model.psi0, model.psi1, model.theta]
    return torch.stack([torch.stack(torch.autograd.grad(f, params, retain_graph=True)) for f in field])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_jacobian_at_the_equilibrium_is_the_seeds_j_star(gamma: float) -> None:
    expected = torch.tensor([[-gamma, 0.0, -0.5], [0.0, -0.5, 0.0], [0.5, 0.0, 0.0]], **F64)
    torch.testing.assert_close(jacobian(model_at(0.0, 0.0, 0.0, gamma), data()), expected, atol=1e-12, rtol=0)


def test_jacobian_elsewhere_is_the_derivative_of_the_closed_form() -> None:
    point, gamma = (0.4, -0.3, 1.2), 0.8
    closed = torch.autograd.functional.jacobian(
        lambda x: dirac_gan_field(*x, gamma), torch.tensor(point, **F64)
    )
    torch.testing.assert_close(jacobian(model_at(*point, gamma), data()), closed, atol=1e-12, rtol=0)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \(1,\).*got shape=\(2,\)"):
        DiracGAN(shape=(2,))
    with pytest.raises(ValueError, match=r"gamma.*got -1"):
        DiracGAN(gamma=-1.0)
    with pytest.raises(ValueError, match="lr must be positive; got 0"):
        DiracGAN(lr=0.0)
    model = DiracGAN()
    assert {name for name, _ in model.named_parameters()} == {"theta", "psi0", "psi1"}
    assert all(p.shape == () for p in model.parameters())
    assert model.sample(4).shape == (4, 1) and model.discriminator(torch.zeros(5, 1)).shape == (5,)


def fit(model: DiracGAN, root: Path, epochs: int, ckpt_path: str | None = None, **trainer) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)], **trainer,
    )  # fmt: skip
    trainer.fit(model, Dirac(n_train=160, n_val=0, n_test=0, batch_size=16), ckpt_path=ckpt_path)
    return trainer


def euler(point: tuple[float, float, float], gamma: float, lr: float, steps: int) -> np.ndarray:
    """x_{k+1} = x_k + lr · v(x_k) with the closed-form field, float64."""
    x, out = torch.tensor(point, **F64), [point]
    for _ in range(steps):
        x = x + lr * dirac_gan_field(*x, gamma)
        out.append(tuple(x.tolist()))
    return np.array(out)


def winding(trajectory: np.ndarray) -> float:
    """Turns of (ψ0, θ) around the equilibrium (0, 0)."""
    angle = np.unwrap(np.arctan2(trajectory[:, 2], trajectory[:, 0]))
    return abs(angle[-1] - angle[0]) / (2 * np.pi)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_training_takes_simultaneous_euler_steps(gamma: float, tmp_path: Path) -> None:
    """30 steps of the module (float64) == 30 Euler steps of the closed-form field, to 1e-12: both players are
    updated from the same point with plain SGD."""
    model = model_at(0.2, -0.1, 1.0, gamma, lr=0.1)
    fit(model, tmp_path, epochs=3)
    expected = euler((0.2, -0.1, 1.0), gamma, 0.1, 30)
    np.testing.assert_allclose(model.trajectory_tensor().numpy(), expected, atol=1e-12, rtol=0)


def test_an_optimizer_given_is_the_discretisation_heavy_ball_momentum(tmp_path: Path) -> None:
    """``optimizer=partial(SGD, lr=0.1, momentum=0.5)`` is what the Trainer steps, and 30 module steps are the
    heavy-ball iteration b_{k+1} = μ b_k - v(x_k), x_{k+1} = x_k - lr b_{k+1} of the closed-form field
    (float64, 1e-12); it differs from the Euler trajectory by more than 0.1."""
    model = model_at(0.2, -0.1, 1.0, 0.5, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5))
    trainer = fit(model, tmp_path, epochs=3)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.5
    x, b, expected = torch.tensor((0.2, -0.1, 1.0), **F64), torch.zeros(3, **F64), [(0.2, -0.1, 1.0)]
    for _ in range(30):
        b = 0.5 * b - dirac_gan_field(*x, 0.5)
        x = x - 0.1 * b
        expected.append(tuple(x.tolist()))
    np.testing.assert_allclose(model.trajectory_tensor().numpy(), np.array(expected), atol=1e-12, rtol=0)
    assert np.abs(np.array(expected) - euler((0.2, -0.1, 1.0), 0.5, 0.1, 30)).max() > 0.1
    assert "optimizer" not in model.hparams  # a live callable: left out of the checkpoint


def test_an_lr_scheduler_changes_the_euler_step_every_step(tmp_path: Path) -> None:
    """``StepLR(step_size=10, gamma=0.5)`` on the default SGD: steps 0-9 are Euler steps of lr 0.1, 10-19 of
    0.05, 20-29 of 0.025 (float64, 1e-12), and the lr is 0.0125 after 30 steps."""
    halve = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.5)
    model = model_at(0.2, -0.1, 1.0, 1.0, lr=0.1, lr_scheduler=halve)
    trainer = fit(model, tmp_path, epochs=3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125, rel=1e-12)
    x, expected = torch.tensor((0.2, -0.1, 1.0), **F64), [(0.2, -0.1, 1.0)]
    for k in range(30):
        x = x + 0.1 * 0.5 ** (k // 10) * dirac_gan_field(*x, 1.0)
        expected.append(tuple(x.tolist()))
    np.testing.assert_allclose(model.trajectory_tensor().numpy(), np.array(expected), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="DiracGAN: lr_scheduler cannot be ReduceLROnPlateau"):
        fit(DiracGAN(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau), tmp_path / "plateau", epochs=1)


def test_without_penalty_the_iterates_circle_and_drift_out_with_r1_they_converge(tmp_path: Path) -> None:
    """300 steps of lr 0.1 from (ψ0, ψ1, θ) = (0, 0, 1), distance 1 from the equilibrium.

    γ = 0: the eigenvalues ±i/2 make a centre and the Euler step multiplies the distance by about
    sqrt(1 + lr²/4) per step near it, so it does not shrink: seen 1.000 -> 1.450 after 300 steps, turning 2.26
    times around the equilibrium in the (ψ0, θ) plane (asserted: > 1.3, growing every 10 steps, > 2 turns).
    γ = 1: eigenvalues -1/2 (three times): seen 6.0e-6 after 300 steps (asserted: < 1e-4).
    """
    circling = DiracGAN(gamma=0.0, lr=0.1)
    trainer = fit(circling, tmp_path / "circle", epochs=30)
    path = circling.trajectory_tensor().numpy()
    distance = np.linalg.norm(path, axis=1)
    assert trainer.global_step == 300 and path.shape == (301, 3)
    assert distance[0] == pytest.approx(1.0) and distance[-1] > 1.3
    assert np.all(np.diff(distance[::10]) > 0)  # never shrinks (sampled every 10 steps)
    assert winding(path) > 2.0
    assert float(trainer.callback_metrics["train/distance"]) == pytest.approx(distance[-2], rel=1e-5)
    converging = DiracGAN(gamma=1.0, lr=0.1)
    fit(converging, tmp_path / "r1", epochs=30)
    assert float(converging.distance()) < 1e-4
    pictures = sorted((tmp_path / "r1" / "dirac_gan_trajectory").glob("*.png"))
    assert [p.name for p in pictures] == ["step0000300.png"]


def test_trajectory_is_in_the_checkpoint_and_a_resumed_run_continues_exactly(tmp_path: Path) -> None:
    straight = DiracGAN(gamma=0.2)
    fit(straight, tmp_path / "straight", epochs=4)
    fit(DiracGAN(gamma=0.2), tmp_path / "split", epochs=2)
    resumed = DiracGAN(gamma=0.2)
    fit(resumed, tmp_path / "split", epochs=4, ckpt_path="last")
    assert torch.equal(straight.trajectory_tensor(), resumed.trajectory_tensor())
    assert torch.equal(straight.point(), resumed.point())
    restored = DiracGAN.load_from_checkpoint(tmp_path / "split" / "last.ckpt")
    assert torch.equal(restored.trajectory_tensor(), resumed.trajectory_tensor())


def test_the_cli_builds_it_from_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_run(["fit", "--model=DiracGAN", "--model.gamma=1.0", "--data=Dirac",
                   "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false"])  # fmt: skip
    assert cli.model.shape == (1,) and cli.trainer.global_step == 1
    assert len(cli.model.trajectory) == 2
