"""Eigenvalues of the training dynamics (callbacks/eigen.py) against known answers: the Dirac-GAN (seed 002
Q5), the bilinear game, quadratic losses, dense vs matrix-free on small networks, the callback's cadence,
state, errors, and 2 processes against 1."""

from __future__ import annotations

import cmath
import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cli_runs import cli_fit
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EigenvalueTracker
from callbacks.eigen import (
    _Products,
    game_jacobian_eigenvalues,
    game_vector_field,
    hessian_eigenvalues,
    probing,
)
from datamodules import Dirac
from zoo import DiracGAN

F64 = dict(dtype=torch.float64)
QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


def assert_same_set(actual: Tensor, expected, atol: float) -> None:
    """Equal as multisets of complex numbers (greedy nearest matching)."""
    left = [complex(z) for z in actual.tolist()]
    assert len(left) == len(expected), (left, expected)
    for e in expected:
        i = int(np.argmin([abs(a - e) for a in left]))
        assert abs(left[i] - e) <= atol, (left, expected)
        left.pop(i)


# -- small modules with known spectra ------------------------------------------------------------------------


def dirac_expected(gamma: float) -> list[complex]:
    root = cmath.sqrt(gamma**2 - 1)
    return [-0.5, (-gamma + root) / 2, (-gamma - root) / 2]


class Bilinear(nn.Module):
    """min_x max_y xᵀ A y: v = (-A y, Aᵀ x), J = [[0, -A], [Aᵀ, 0]], eigenvalues ±i σ_j(A)."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = a
        self.x = nn.Parameter(torch.randn(a.shape[0], generator=g, **F64))
        self.y = nn.Parameter(torch.randn(a.shape[1], generator=g, **F64))

    def game(self, batch):
        value = self.x @ self.a @ self.y
        return [(value, [self.x]), (-value, [self.y])]


class Quadratic(nn.Module):
    """L(w) = ½ wᵀ A w + bᵀ w: Hessian A; as a one-player game, J = -A."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a, self.b = a, torch.linspace(-1, 1, a.shape[0], **F64)
        self.w = nn.Parameter(torch.linspace(0.5, -0.3, a.shape[0], **F64))

    def training_loss(self, batch) -> Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w

    def game(self, batch):
        return [(self.training_loss(batch), [self.w])]


def random_symmetric(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, **F64)
    return (m + m.T) / 2


class TwoMLPGame(nn.Module):
    """A small GAN on 2-D data: tanh generator z(2) -> 8 -> 2, tanh discriminator 2 -> 8 -> 1, the standard
    discriminator loss and the non-saturating generator loss, fixed noise; 75 parameters, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        self.discriminator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.register_buffer("z", torch.randn(16, 2, generator=torch.Generator().manual_seed(2), **F64))

    def losses(self, real: Tensor) -> tuple[Tensor, Tensor]:
        fake = self.generator(self.z[: len(real)])
        d_loss = nn.functional.softplus(-self.discriminator(real)).mean()
        d_loss = d_loss + nn.functional.softplus(self.discriminator(fake)).mean()
        g_loss = nn.functional.softplus(-self.discriminator(fake)).mean()
        return d_loss, g_loss

    def game(self, batch):
        d_loss, g_loss = self.losses(batch)
        return [(d_loss, list(self.discriminator.parameters())), (g_loss, list(self.generator.parameters()))]


def real_2d(n: int = 16) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3), **F64) + 1.0


# -- the game Jacobian ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_dirac_gan_at_its_equilibrium_has_the_seeds_eigenvalues(gamma: float) -> None:
    """{-1/2, ±i/2} without a penalty, {-1/2, (-γ ± sqrt(γ² - 1))/2} with R1 weight γ: dense, the products
    path (all 3), and ARPACK (n = 3 lets it find k = 1: the largest real part and the largest magnitude)."""
    model = DiracGAN(gamma=gamma, theta=0.0).double()
    batch = torch.zeros(4, 1, **F64)
    expected = dirac_expected(gamma)
    assert_same_set(game_jacobian_eigenvalues(model, batch), expected, atol=1e-6)
    assert_same_set(game_jacobian_eigenvalues(model, batch, k=3), expected, atol=1e-6)
    (right,) = game_jacobian_eigenvalues(model, batch, k=1, which="LR").tolist()
    assert right.real == pytest.approx(max(e.real for e in expected), abs=1e-6)
    assert min(abs(right - e) for e in expected) < 1e-6
    (largest,) = game_jacobian_eigenvalues(model, batch, k=1, which="LM").tolist()
    assert abs(largest) == pytest.approx(max(abs(e) for e in expected), abs=1e-6)
    assert min(abs(largest - e) for e in expected) < 1e-6


def test_dirac_gan_stability_reads_off_the_real_parts() -> None:
    """Stable ⇔ every real part < 0: γ = 0 has max Re λ = 0 (a centre), γ > 0 has max Re λ < 0."""
    batch = torch.zeros(1, 1, **F64)
    centre = game_jacobian_eigenvalues(DiracGAN(theta=0.0).double(), batch)
    damped = game_jacobian_eigenvalues(DiracGAN(gamma=0.3, theta=0.0).double(), batch)
    assert centre.real.max() == pytest.approx(0.0, abs=1e-12) and damped.real.max() < -0.1


def test_bilinear_game_has_eigenvalues_plus_minus_i() -> None:
    one = Bilinear(torch.ones(1, 1, **F64))
    assert_same_set(game_jacobian_eigenvalues(one, None), [1j, -1j], atol=1e-12)
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), **F64)
    sigma = torch.linalg.svdvals(a).tolist()  # decreasing
    many = Bilinear(a)
    assert_same_set(
        game_jacobian_eigenvalues(many, None), [s * 1j for s in sigma] + [-s * 1j for s in sigma], 1e-10
    )
    top = game_jacobian_eigenvalues(many, None, k=4)  # Arnoldi on products (n = 12)
    assert_same_set(top, [sigma[0] * 1j, -sigma[0] * 1j, sigma[1] * 1j, -sigma[1] * 1j], atol=1e-8)


def test_one_player_quadratic_game_has_minus_the_hessians_eigenvalues() -> None:
    """A single player minimising ½ wᵀ A w moves along v = -A w: J = -A (the sign convention)."""
    a = random_symmetric(10)
    expected = (-torch.linalg.eigvalsh(a)).tolist()
    model = Quadratic(a)
    assert_same_set(game_jacobian_eigenvalues(model, None), expected, atol=1e-10)
    (right,) = game_jacobian_eigenvalues(model, None, k=1, which="LR").tolist()
    assert right.real == pytest.approx(max(expected), abs=1e-8)
    (left,) = game_jacobian_eigenvalues(model, None, k=1, which="SR").tolist()
    assert left.real == pytest.approx(min(expected), abs=1e-8)


def test_products_and_rows_equal_an_independent_jacobian() -> None:
    """The double-vjp products J e_j and the vjp rows Jᵀ e_i against torch.autograd.functional.jacobian of the
    field written as a pure function of the flat parameters (float64, 1e-10)."""
    model, real = TwoMLPGame(), real_2d()
    names = [n for n, _ in model.discriminator.named_parameters()] + [
        n for n, _ in model.generator.named_parameters()
    ]
    modules = [model.discriminator] * 4 + [model.generator] * 4
    shapes = [p.shape for m, n in zip(modules, names, strict=True) for p in [m.get_parameter(n)]]
    flat = torch.cat(
        [p.detach().reshape(-1) for p in [*model.discriminator.parameters(), *model.generator.parameters()]]
    )

    def field(theta: Tensor) -> Tensor:
        pieces, i = [], 0
        for shape in shapes:
            pieces.append(theta[i : i + shape.numel()].reshape(shape))
            i += shape.numel()
        d = dict(zip(names[:4], pieces[:4], strict=True))
        g = dict(zip(names[4:], pieces[4:], strict=True))
        fake = torch.func.functional_call(model.generator, g, (model.z,))
        disc = lambda x: torch.func.functional_call(model.discriminator, d, (x,))  # noqa: E731
        d_loss = nn.functional.softplus(-disc(real)).mean() + nn.functional.softplus(disc(fake)).mean()
        g_loss = nn.functional.softplus(-disc(fake)).mean()
        gd = torch.autograd.grad(d_loss, pieces[:4], create_graph=True)
        gg = torch.autograd.grad(g_loss, pieces[4:], create_graph=True)
        return -torch.cat([t.reshape(-1) for t in (*gd, *gg)])

    reference = torch.autograd.functional.jacobian(field, flat).numpy()
    with probing(model):
        vector, params = game_vector_field(model, real)
        products = _Products(vector, params, "jacobian", None)
        np.testing.assert_allclose(products.columns(), reference, atol=1e-10, rtol=0)
        np.testing.assert_allclose(products.rows(), reference, atol=1e-10, rtol=0)
    assert reference.shape == (75, 75) and np.abs(reference - reference.T).max() > 1e-3  # not symmetric


def test_arnoldi_agrees_with_dense_on_a_two_mlp_game() -> None:
    model, real = TwoMLPGame(), real_2d()
    dense = game_jacobian_eigenvalues(model, real)
    for k in (2, 4, 6):
        top = game_jacobian_eigenvalues(model, real, k=k)
        np.testing.assert_allclose(top.abs().numpy(), dense.abs()[:k].numpy(), atol=1e-4)
        for value in top.tolist():
            assert min(abs(value - d) for d in dense.tolist()) < 1e-4
    assert (dense.imag.abs() > 1e-3).any()  # the test has complex eigenvalues to find


# -- the loss Hessian ----------------------------------------------------------------------------------------


def test_quadratic_loss_has_its_matrix_eigenvalues() -> None:
    a = random_symmetric(12, seed=4)
    expected = torch.linalg.eigvalsh(a)  # increasing
    model = Quadratic(a)
    torch.testing.assert_close(hessian_eigenvalues(model, None, None, "SA"), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        hessian_eigenvalues(model, None, 3, "LA"), expected.flip(0)[:3], atol=1e-8, rtol=0
    )
    torch.testing.assert_close(hessian_eigenvalues(model, None, 2, "SA"), expected[:2], atol=1e-8, rtol=0)
    both = hessian_eigenvalues(model, None, 3, "BE")  # one from the low end, two from the high end
    torch.testing.assert_close(
        both, torch.stack([expected[0], expected[-2], expected[-1]]), atol=1e-8, rtol=0
    )
    magnitude = hessian_eigenvalues(model, None, 1, "LM")
    assert float(magnitude.abs()) == pytest.approx(float(expected.abs().max()), abs=1e-8)


class Regression(L.LightningModule):
    """A small tanh MLP with a squared-error loss (float64) and the SingleObjective capability."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()

    def training_loss(self, batch) -> Tensor:
        x, y = batch
        return ((self.net(x)[:, 0] - y) ** 2).mean()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self.training_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_data(n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=g, **F64)
    return x, torch.sin(x.sum(1)) + 0.1 * torch.randn(n, generator=g, **F64)


def test_lanczos_agrees_with_eigvalsh_on_a_small_mlp() -> None:
    """Lanczos on double-backward products against eigvalsh of torch.autograd.functional.hessian of the loss
    written as a pure function of the flat parameters (float64)."""
    model, (x, y) = Regression(), regression_data()
    params = dict(model.net.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(theta: Tensor) -> Tensor:
        pieces, i = {}, 0
        for name, p in params.items():
            pieces[name] = theta[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return ((torch.func.functional_call(model.net, pieces, (x,))[:, 0] - y) ** 2).mean()

    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))  # increasing, n = 31
    assert len(expected) == 31 and expected[0] < 0 < expected[-1]  # indefinite: both ends are informative
    torch.testing.assert_close(hessian_eigenvalues(model, (x, y), None, "SA"), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        hessian_eigenvalues(model, (x, y), 3, "LA"), expected.flip(0)[:3], atol=1e-8, rtol=0
    )
    torch.testing.assert_close(hessian_eigenvalues(model, (x, y), 2, "SA"), expected[:2], atol=1e-8, rtol=0)


def test_the_probe_leaves_modes_and_buffers_as_it_found_them() -> None:
    class Counting(Regression):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros((), **F64))
            self.dropout, self.modes = nn.Dropout(0.5), []

        def training_loss(self, batch) -> Tensor:
            self.calls += 1  # like a REINFORCE baseline's update
            self.modes.append((self.training, self.dropout.training))
            return super().training_loss(batch)

    model = Counting()
    model.train()
    model.net.eval()  # a frozen part stays frozen
    hessian_eigenvalues(model, regression_data(), 2)
    assert model.modes == [(False, False)]  # eval mode during the probe (RELIABILITY #6)
    assert float(model.calls) == 0 and model.training and model.dropout.training and not model.net.training


def test_functions_name_the_missing_capability_and_check_arguments() -> None:
    with pytest.raises(TypeError, match="`game`"):
        game_jacobian_eigenvalues(Regression(), regression_data())
    with pytest.raises(TypeError, match="`training_loss`"):
        hessian_eigenvalues(Bilinear(torch.ones(1, 1, **F64)), None, 1)
    with pytest.raises(ValueError, match="which='LA' is not allowed; choose one of 'LM', 'LR', 'SR'"):
        game_jacobian_eigenvalues(Bilinear(torch.ones(1, 1, **F64)), None, 1, "LA")
    with pytest.raises(ValueError, match="k must be a positive integer or None"):
        hessian_eigenvalues(Regression(), regression_data(), 0)


# -- the callback --------------------------------------------------------------------------------------------


def fit_dirac(root: Path, epochs: int, *callbacks, ckpt_path: str | None = None, **kwargs):
    model = DiracGAN(gamma=0.5)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=list(callbacks),
        **QUIET,
        **kwargs,
    )
    trainer.fit(model, Dirac(n_train=40, n_val=0, n_test=0, batch_size=4), ckpt_path=ckpt_path)
    return model, trainer


def test_callback_probes_at_its_cadence_and_logs(tmp_path: Path) -> None:
    """30 steps, every 7: probes at 7, 14, 21, 28 and after the last batch (30); each logs the three game
    metrics at its step; every second probe and the last draw a picture; the last spectrum is the function's
    on the fixed batch."""
    tracker = EigenvalueTracker(every_n_steps=7, plot_every_n_probes=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version=0)
    model, trainer = fit_dirac(tmp_path, 3, tracker, logger=logger)
    assert [h["step"] for h in tracker.history] == [7, 14, 21, 28, 30]
    assert tracker.batch.shape == (4, 1) and tracker.resolved_which == "LM"
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eig/max_real")]
    assert [int(r["step"]) for r in rows] == [7, 14, 21, 28, 30]
    pictures = sorted(p.name for p in (tmp_path / "version_0" / "eig_spectrum").glob("*.png"))
    assert pictures == ["step0000014.png", "step0000028.png", "step0000030.png"]
    last = game_jacobian_eigenvalues(model, tracker.batch)
    assert torch.equal(tracker.history[-1]["eigenvalues"], last)
    assert float(rows[-1]["eig/max_real"]) == pytest.approx(float(last.real.max()))
    assert float(rows[-1]["eig/max_abs"]) == pytest.approx(float(last.abs().max()))
    ratio = float((last.imag.abs() / last.real.abs()).max())
    assert float(rows[-1]["eig/max_imag_over_real"]) == pytest.approx(ratio)
    assert float(trainer.callback_metrics["eig/max_real"]) == pytest.approx(float(last.real.max()))


def test_callback_state_round_trips_and_a_resumed_run_continues(tmp_path: Path) -> None:
    """4 epochs in one go == 2 epochs, stop, resume from last.ckpt, 2 more: the same probe steps (the cadence
    counter is restored) and bit-identical spectra (the fixed batch is restored)."""

    def run(folder: str, epochs: int, ckpt_path: str | None = None) -> EigenvalueTracker:
        tracker = EigenvalueTracker(every_n_steps=7, at_end=False, plot_every_n_probes=0)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        fit_dirac(tmp_path / folder, epochs, tracker, checkpoint, ckpt_path=ckpt_path, logger=False)
        return tracker

    straight = run("straight", 4)
    first = run("split", 2)
    assert [h["step"] for h in first.history] == [7, 14]
    resumed = run("split", 4, ckpt_path="last")
    assert (
        [h["step"] for h in straight.history] == [h["step"] for h in resumed.history] == [7, 14, 21, 28, 35]
    )
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert torch.equal(a["eigenvalues"], b["eigenvalues"])
    assert torch.equal(straight.batch, resumed.batch)
    state = straight.state_dict()
    fresh = EigenvalueTracker(every_n_steps=7)
    fresh.load_state_dict(state)
    assert fresh.last_step == 35 and torch.equal(fresh.batch, straight.batch) and len(fresh.history) == 5


def test_callback_hessian_mode_on_a_single_objective(tmp_path: Path) -> None:
    """``mode="auto"`` on a module with ``training_loss`` only: the Hessian, dense here (31 parameters), so
    ``eig/max`` and ``eig/min`` are the extreme eigenvalues; a tuple batch is kept whole."""
    x, y = regression_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    tracker = EigenvalueTracker(every_n_steps=5, plot_every_n_probes=0)
    model = Regression()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[tracker],
        default_root_dir=tmp_path,
        **QUIET,
    )
    trainer.fit(model, loader)
    assert [p.name for p in (tmp_path / "eig_spectrum").glob("*.png")] == ["step0000008.png"]  # the last only
    assert tracker.resolved_mode == "hessian" and [h["step"] for h in tracker.history] == [5, 8]
    assert isinstance(tracker.batch, list) and torch.equal(tracker.batch[0], x[:8])
    expected = hessian_eigenvalues(model, tracker.batch, None, "BE")  # all of them, increasing
    assert torch.equal(tracker.history[-1]["eigenvalues"], expected)
    assert tracker.latest == {"eig/max": float(expected.max()), "eig/min": float(expected.min())}


class Neither(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "mode,module,missing",
    [("auto", Neither, "has neither `game` nor `training_loss`"), ("game", Regression, "has no `game`"),
     ("hessian", DiracGAN, "has no `training_loss`")],
)  # fmt: skip
def test_callback_fails_at_once_naming_the_missing_method(mode: str, module, missing: str) -> None:
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[EigenvalueTracker(mode=mode)], **QUIET)
    with pytest.raises(TypeError, match=missing):
        trainer.fit(module(), DataLoader(torch.zeros(4, 1)))


def test_callback_checks_its_arguments_and_refuses_huge_dense_matrices() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer; got 0"):
        EigenvalueTracker(every_n_steps=0)
    with pytest.raises(ValueError, match="which='LA' is for Hessians"):
        EigenvalueTracker(mode="game", which="LA")
    with pytest.raises(ValueError, match="k must be a positive integer or None"):
        EigenvalueTracker(k=0)
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[EigenvalueTracker(which="LA")], **QUIET)
    with pytest.raises(ValueError, match=r"which=.LA.*does not apply to a game"):
        trainer.fit(DiracGAN(), Dirac(n_train=4, n_val=0, n_test=0, batch_size=4))

    class Wide(Regression):
        def __init__(self) -> None:
            super().__init__(hidden=600)

    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[EigenvalueTracker()], **QUIET)
    with pytest.raises(ValueError, match=r"k=None\) forms the dense 3001 x 3001 matrix.*set k"):
        trainer.fit(Wide(), DataLoader(TensorDataset(*regression_data()), batch_size=8))


# -- two processes against one -------------------------------------------------------------------------------


def fit_through_cli(folder: Path, devices: int, *args: str) -> dict:
    """``cli.py fit`` in a fresh process with the tracker; returns the tracker's state from the checkpoint."""
    log_dir = cli_fit(
        folder, devices, "--trainer.callbacks=EigenvalueTracker", "--trainer.callbacks.every_n_steps=8", *args
    )
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    callbacks = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if k.startswith("EigenvalueTracker")]
    assert len(list((log_dir / "eig_spectrum").glob("*.png"))) == len(state["history"])
    return state


RECIPES = {
    # the Hessian of the VAE on Digits: each process holds half of the fixed batch, so only the all-reduced
    # products give the global spectrum
    "vae-hessian": ["--model=VAE", "--model.hidden=[16]", "--model.eval_k=5", "--data=Digits",
                    "--data.batch_size=64", "--trainer.max_steps=20", "--trainer.limit_val_batches=0",
                    "--trainer.callbacks.k=2", "--trainer.callbacks.tol=1e-6"],
    "dirac-game": ["--model=DiracGAN", "--model.gamma=0.5", "--data=Dirac", "--data.n_train=64",
                   "--data.batch_size=8", "--trainer.max_steps=20"],
}  # fmt: skip


@pytest.mark.ddp
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_give_the_one_process_spectrum(tmp_path: Path, recipe: str) -> None:
    """Same global batch (gathered in global order), same start vector, all-reduced products: the spectra of
    2 gloo processes equal the 1-process spectra at every probe. Only float32 rounding differs (the order of
    the all-reduce sums, in training and in the products); seen: max relative difference 7e-8 for the game,
    2e-8 for the VAE's Hessian. Without the all-reduce each process would see the Hessian of its own 32
    examples, a different matrix."""
    states = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        folder.mkdir()
        states[devices] = fit_through_cli(folder, devices, *RECIPES[recipe])
    one, two = states[1], states[2]
    assert torch.equal(one["batch"], two["batch"])  # the first global batch, whatever the world size
    assert [h["step"] for h in one["history"]] == [h["step"] for h in two["history"]] == [8, 16, 20]
    for a, b in zip(one["history"], two["history"], strict=True):
        torch.testing.assert_close(b["eigenvalues"], a["eigenvalues"], rtol=1e-5, atol=1e-7)
