"""GAN maths, the adversarial families' contract, training mechanics (schedule, logging, NaN guard, EMA, exact
resume) and DDP: 2 gloo processes give the 1-process gradients of every step.

The DDP tests' subprocesses import this file (``PYTHONPATH=tests``) for :class:`GradientDump` and
:class:`NaNToy2D`.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from cli_runs import cli_env
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn

from datamodules import Toy2D
from zoo import FGAN, GAN
from zoo.adversarial import (
    NonFiniteLossError,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from zoo.capabilities import CriticModel, DiscriminatedModel, Game, Samplable, require

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
FAST = dict(QUIET, enable_checkpointing=False)  # no checkpoints/ folder in the working directory


# -- maths ------------------------------------------------------------------------------------------------


def linear_discriminator(w: torch.Tensor, b: float) -> nn.Module:
    layer = nn.Linear(len(w), 1).double()
    with torch.no_grad():
        layer.weight.copy_(w[None])
        layer.bias.fill_(b)
    return nn.Sequential(layer, nn.Flatten(0))


def test_penalty_on_a_linear_discriminator_is_half_gamma_w_squared_with_gradient_gamma_w() -> None:
    """D(x) = w·x + b: ∇_x D = w everywhere, so R = γ/2 ||w||² and ∂R/∂w = γ w (the Dirac-GAN's -γ entry)."""
    w, gamma = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), 0.7
    d = linear_discriminator(w, 0.4)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    r1 = 0.5 * gamma * gradient_penalty(d(x), x)
    assert r1.item() == pytest.approx(0.5 * gamma * float(w @ w), rel=1e-12)
    (grad_w,) = torch.autograd.grad(r1, d[0].weight)
    torch.testing.assert_close(grad_w[0], gamma * w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("r1,r2", [(0.7, 0.0), (0.0, 2.5), (1.5, 0.5)])
def test_the_gans_discriminator_loss_adds_r1_and_r2_with_the_analytic_gradient(r1: float, r2: float) -> None:
    """The whole discriminator loss of the model with a linear D, against the hand-derived gradient
    ∂/∂w [E softplus(-l_r) + E softplus(l_f)] + (γ1 + γ2) w = -E σ(-l_r) x_r + E σ(l_f) x_f + (γ1 + γ2) w."""
    torch.manual_seed(0)
    model = GAN(shape=(3,), latent_dim=2, hidden=(8,), r1_gamma=r1, r2_gamma=r2).double()
    w = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    model.discriminator = linear_discriminator(w, 0.4)
    x, z = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    loss, logs = model.opponent_loss(x, z)
    fake = model.generator(z).detach()
    l_r, l_f = x @ w + 0.4, fake @ w + 0.4
    base = F.softplus(-l_r).mean() + F.softplus(l_f).mean()
    assert loss.item() == pytest.approx(base.item() + 0.5 * (r1 + r2) * float(w @ w), rel=1e-12)
    for name, gamma in (("r1", r1), ("r2", r2)):
        assert (name in logs) == (gamma > 0)
        if gamma > 0:
            assert logs[name].item() == pytest.approx(0.5 * gamma * float(w @ w), rel=1e-12)
    (grad_w,) = torch.autograd.grad(loss, model.discriminator[0].weight)
    expected = -(torch.sigmoid(-l_r)[:, None] * x).mean(0) + (torch.sigmoid(l_f)[:, None] * fake).mean(0)
    torch.testing.assert_close(grad_w[0], expected + (r1 + r2) * w, rtol=1e-10, atol=1e-12)


def test_losses_against_hand_computed_values() -> None:
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    bce = (sp(-0.0) + sp(-2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2  # -E log σ(l_r) - E log(1 - σ(l_f))
    for kind in ("minimax", "nonsaturating"):
        assert discriminator_loss(kind, real, fake).item() == pytest.approx(bce, rel=1e-6)
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx((1 + 0) / 2 + (0 + 2) / 2)
    # G: minimax E log(1 - σ(l_f)); nonsaturating -E log σ(l_f); hinge -E l_f
    expected_g = {
        "minimax": (math.log(1 - 1 / (1 + math.e)) + math.log(1 - 1 / (1 + math.exp(-1)))) / 2,
        "nonsaturating": -(math.log(1 / (1 + math.e)) + math.log(1 / (1 + math.exp(-1)))) / 2,
        "hinge": 0.0,
    }
    for kind, value in expected_g.items():
        assert generator_loss(kind, fake).item() == pytest.approx(value, rel=1e-6, abs=1e-7)
    # the minimax game at D* = 1/2 (l = 0) on identical distributions: D's loss is log 4 (JSD = 0)
    zeros = torch.zeros(5)
    assert discriminator_loss("minimax", zeros, zeros).item() == pytest.approx(math.log(4.0), rel=1e-6)
    # softplus form stays finite where log(sigmoid) would be -inf in float32 (RELIABILITY.md #23)
    assert torch.isfinite(discriminator_loss("minimax", torch.tensor([-120.0]), torch.tensor([120.0])))


# -- the contract of the adversarial families ------------------------------------------------------------

FAMILIES = {
    "gan-mlp-nonsaturating-r1": lambda: GAN(shape=(2,), latent_dim=3, hidden=(16, 16), r1_gamma=1.0),
    "gan-mlp-minimax-r1r2-images8": lambda: GAN(shape=(1, 8, 8), latent_dim=4, hidden=(32,), loss="minimax",
                                                 r1_gamma=1.0, r2_gamma=0.5),
    "gan-conv-hinge-r2": lambda: GAN(shape=(1, 28, 28), latent_dim=4, hidden=(16,), loss="hinge",
                                     r2_gamma=1.0),
    "fgan-kl_nwj-r1": lambda: FGAN(shape=(2,), divergence="kl_nwj", latent_dim=3, hidden=(16,), r1_gamma=1.0),
    "fgan-kl_dv": lambda: FGAN(shape=(3,), divergence="kl_dv", latent_dim=3, hidden=(16, 16)),
    "fgan-js-r1r2": lambda: FGAN(shape=(2,), divergence="js", latent_dim=3, hidden=(16,), r1_gamma=0.5,
                                 r2_gamma=0.5),
}  # fmt: skip


def batch_for(model, n: int = 6) -> torch.Tensor:
    return torch.rand(n, *model.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=sorted(FAMILIES), ids=str)
def model(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]()


def opponent_of(model) -> nn.Module:
    return model.critic if isinstance(model, FGAN) else model.discriminator


def test_capabilities(model) -> None:
    for capability in (Samplable, Game):
        require(model, capability, "the contract")
    if isinstance(model, FGAN):
        require(model, CriticModel, "the contract")
        if model.divergence == "js":
            require(model, DiscriminatedModel, "the contract")
            assert model.discriminator is model.critic
        else:
            with pytest.raises(TypeError, match="`discriminator`"):
                require(model, DiscriminatedModel, "a JSD estimator")
    else:
        require(model, DiscriminatedModel, "the contract")
        assert isinstance(model.generator, nn.Module) and isinstance(model.discriminator, nn.Module)


def test_samples_have_the_data_shape_and_follow_the_generator(model) -> None:
    a = model.sample(7, generator=torch.Generator().manual_seed(1))
    b = model.sample(7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (7, *model.shape) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(7, generator=torch.Generator().manual_seed(2)))
    if len(model.shape) == 3:  # images come out of a sigmoid
        assert a.min() >= 0 and a.max() <= 1
    assert opponent_of(model)(a).shape == (7,)


def test_game_players_partition_the_parameters_and_each_gets_finite_gradients(model) -> None:
    x = batch_for(model)
    (d_loss, d_params), (g_loss, g_params) = model.game(x)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(d_params).isdisjoint(ids(g_params))
    assert ids(d_params) | ids(g_params) == ids(model.parameters())
    for loss, params in ((d_loss, d_params), (g_loss, g_params)):
        grads = torch.autograd.grad(loss, params)
        for g in grads:
            assert torch.isfinite(g).all()
        assert sum(g.abs().sum() for g in grads) > 0
    again = model.game(x)
    assert torch.equal(again[0][0], d_loss) and torch.equal(again[1][0], g_loss)  # fixed noise per batch


def test_game_is_twice_differentiable_through_both_players(model) -> None:
    """∂/∂θ of ∇_ψ L_D must exist (the samples are not detached in ``game``), as the game Jacobian needs."""
    (d_loss, d_params), (_, g_params) = model.game(batch_for(model))
    grads = torch.autograd.grad(d_loss, d_params, create_graph=True)
    probe = sum((g * torch.ones_like(g)).sum() for g in grads)
    cross = torch.autograd.grad(probe, g_params, allow_unused=True, retain_graph=True)
    assert any(c is not None and c.abs().sum() > 0 for c in cross)
    same = torch.autograd.grad(probe, d_params, allow_unused=True)
    assert all(s is None or torch.isfinite(s).all() for s in same)


def test_float64_gives_the_float32_losses(model) -> None:
    x = batch_for(model)
    single = [loss.item() for loss, _ in model.game(x)]
    double = [loss.item() for loss, _ in model.double().game(x.double())]
    assert double == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_checkpoint_round_trip(model, tmp_path: Path) -> None:
    trainer = L.Trainer(max_epochs=0, **FAST)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = type(model).load_from_checkpoint(tmp_path / "model.ckpt")
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.sample(4, g()), restored.sample(4, g()))
    x = batch_for(model)
    assert torch.equal(opponent_of(model)(x), opponent_of(restored)(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(shape=(2,), loss="wasserstein"),
            "loss must be one of 'minimax', 'nonsaturating', 'hinge'; got",
        ),
        (dict(shape=(2,), network="conv"), r"network='conv' needs images of shape \(C, H, W\) with H = W in"),
        (dict(shape=(2,), r1_gamma=-1.0), "r1_gamma must be a finite number >= 0"),
        (dict(shape=(2,), n_critic=0), "n_critic must be a positive integer; got 0"),
        (dict(shape=(2,), betas=(0.5,)), "betas must be two numbers"),
        (dict(shape=(2,), lr_d=0.0), "lr_d must be positive; got 0.0"),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GAN(**kwargs)


def test_networks_follow_the_datas_shape() -> None:
    conv = GAN(shape=(1, 28, 28), hidden=(32,))
    assert any(isinstance(m, nn.Conv2d) for m in conv.discriminator.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in conv.generator.modules())
    vector = GAN(shape=(2,), hidden=(32,))
    assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in vector.modules())
    assert not any(isinstance(m, nn.Sigmoid) for m in vector.generator.modules())  # unbounded 2-D outputs


# -- training mechanics ------------------------------------------------------------------------------------


def small_ring(**kwargs) -> Toy2D:
    return Toy2D("8gaussians", **{"n_train": 640, "n_val": 101, "n_test": 0, "batch_size": 64, **kwargs})


def test_n_critic_schedule_counts_optimizer_steps() -> None:
    """9 batches with n_critic = 3: 9 discriminator and 3 generator steps, so global_step = 12 (it counts
    optimizer steps, RELIABILITY.md #5); the generator steps on batches 3, 6, 9."""
    model = GAN(shape=(2,), hidden=(16,), n_critic=3)
    turns = []

    class Turns(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            turns.append(pl_module.generator_turn(trainer.global_step))

    trainer = L.Trainer(max_epochs=1, limit_train_batches=9, limit_val_batches=0, callbacks=[Turns()], **FAST)
    trainer.fit(model, small_ring())
    assert turns == [False, False, True] * 3
    assert trainer.global_step == 12


def test_logged_names_and_mode_coverage_only_on_mixtures() -> None:
    model = GAN(shape=(2,), hidden=(16,), r1_gamma=1.0, r2_gamma=1.0)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, num_sanity_val_steps=0, **FAST)
    trainer.fit(model, small_ring())
    logged = set(trainer.callback_metrics)
    assert {"train/d_loss", "train/g_loss", "train/r1", "train/r2", "val/d_loss"} <= logged
    assert {"val/modes_covered", "val/high_quality"} <= logged
    assert 0 <= float(trainer.callback_metrics["val/modes_covered"]) <= 8
    moons = GAN(shape=(2,), hidden=(16,))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, **FAST)
    trainer.fit(moons, Toy2D("moons", n_train=256, n_val=64, n_test=0, batch_size=64))
    assert "val/d_loss" in trainer.callback_metrics and "val/modes_covered" not in trainer.callback_metrics
    assert "train/r1" not in trainer.callback_metrics


def test_validation_mode_coverage_is_the_metric_of_the_validation_samples() -> None:
    """val/* equal ModeCoverage of exactly the samples ``validation_fakes`` gives each validation batch."""
    from callbacks.quality import mode_coverage

    model, data = GAN(shape=(2,), hidden=(16,)), small_ring(n_val=150, batch_size=64)
    trainer = L.Trainer(**FAST)
    trainer.validate(model, data, verbose=False)
    data.setup()
    batches = [data.splits["val"].data[i : i + 64] for i in range(0, 150, 64)]
    with torch.no_grad():
        fakes = torch.cat([model.validation_fakes(len(b), i, b) for i, b in enumerate(batches)])
    expected = mode_coverage(fakes, data.centers, data.std)
    assert float(trainer.callback_metrics["val/modes_covered"]) == int(expected["modes_covered"])
    assert float(trainer.callback_metrics["val/high_quality"]) == pytest.approx(
        float(expected["high_quality"])
    )


class NaNToy2D(Toy2D):
    """Toy2D whose training example ``nan_index`` is NaN (to test the NaN guard, also under DDP)."""

    def __init__(self, nan_index: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_index = nan_index

    def build(self):
        train, val, test = super().build()
        train.data[self.nan_index] = float("nan")
        return train, val, test


def nan_batch_position(data: Toy2D, index: int) -> int:
    """The batch (of the first epoch, one process) holding training example ``index``."""
    data.setup()
    order = list(iter(data.train_dataloader().sampler))
    return order.index(index) // data.batch_size


def test_nan_in_the_data_stops_with_the_step_and_loss_named_before_any_nan_weight() -> None:
    data = NaNToy2D(nan_index=5, **{"name": "8gaussians", "n_train": 640, "n_val": 64, "batch_size": 64})
    bad_batch = nan_batch_position(data, 5)
    model = GAN(shape=(2,), hidden=(16,), r1_gamma=1.0)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **FAST)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, data)
    message = str(error.value)
    assert "d_loss is nan" in message
    assert f"global_step={2 * bad_batch}" in message and f"batch_idx={bad_batch}" in message
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_the_generator_loss_is_named(monkeypatch) -> None:
    model = GAN(shape=(2,), hidden=(16,))
    original = model.objective

    def poisoned(real, fake, player):
        loss, logs = original(real, fake, player)
        if player == "generator" and model.global_step >= 5:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(model, "objective", poisoned)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **FAST)
    # the generator's loss is computed after the batch's discriminator step: at global_step 2 b + 1
    with pytest.raises(NonFiniteLossError, match=r"g_loss is nan .* at global_step=5, epoch=0, batch_idx=2"):
        trainer.fit(model, small_ring())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ema_of_the_weights_through_lightnings_weight_averaging() -> None:
    """EMAWeightAveraging (Lightning's own) works with the two manual optimizers: one update per batch, and
    after fit the module holds the EMA of EVERY weight (generator and discriminator) as AveragedModel defines
    it (first update copies, then ema = d ema + (1 - d) w)."""
    decay, seen = 0.5, []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    model = GAN(shape=(2,), hidden=(8,), n_critic=2)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0,
        callbacks=[Record(), EMAWeightAveraging(decay=decay)], **FAST,
    )  # fmt: skip
    trainer.fit(model, small_ring())
    assert trainer.global_step == 4 + 2
    for name, value in model.state_dict().items():
        ema = seen[0][name]
        for state in seen[1:]:
            ema = decay * ema + (1 - decay) * state[name]
        torch.testing.assert_close(value, ema, rtol=1e-6, atol=1e-7, msg=name)


def train(folder: Path, max_epochs: int, ckpt_path: str | None = None, ema: bool = False):
    L.seed_everything(0)
    model = GAN(shape=(2,), latent_dim=3, hidden=(16, 16), r1_gamma=0.5, r2_gamma=0.1, n_critic=2)
    callbacks = [ModelCheckpoint(dirpath=folder, save_last=True)]
    if ema:
        callbacks.append(EMAWeightAveraging(decay=0.9))
    trainer = L.Trainer(max_epochs=max_epochs, default_root_dir=folder, callbacks=callbacks, **QUIET)
    trainer.fit(model, small_ring(n_train=448), ckpt_path=ckpt_path)  # 7 batches: cycles cross epochs
    return model, trainer


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
def test_resume_continues_exactly(tmp_path: Path, ema: bool) -> None:
    """4 epochs straight == 2 epochs, stop, resume from last.ckpt, 2 more: weights, both Adam states, the step
    counter and the validation numbers bit for bit (n_critic = 2 with 7 batches an epoch, so the generator's
    schedule crosses epoch boundaries)."""
    straight, straight_trainer = train(tmp_path / "straight", 4, ema=ema)
    train(tmp_path / "split", 2, ema=ema)
    resumed, resumed_trainer = train(tmp_path / "split", 4, ckpt_path="last", ema=ema)
    assert resumed_trainer.global_step == straight_trainer.global_step == 28 + 14  # 28 D, 14 G steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for opt_a, opt_b in zip(straight_trainer.optimizers, resumed_trainer.optimizers, strict=True):
        state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            for field in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)
    for key in ("val/d_loss", "val/modes_covered", "val/high_quality"):
        assert torch.equal(straight_trainer.callback_metrics[key], resumed_trainer.callback_metrics[key])


def test_cli_refuses_an_unknown_loss_by_listing_the_choices(tmp_path: Path, monkeypatch, capsys) -> None:
    from cli import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit):
        run(["fit", "--model=GAN", "--model.loss=wgan", "--data=Toy2D", "--trainer.fast_dev_run=true"])
    err = capsys.readouterr().err
    assert all(word in err for word in ("wgan", "minimax", "nonsaturating", "hinge"))


# -- several processes ---------------------------------------------------------------------------------------


class GradientDump(L.Callback):
    """Test helper: every rank saves the gradients each optimizer is about to apply (after DDP's all-reduce),
    the final weights and the validation numbers, to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.grads = folder, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        which = "d" if optimizer is trainer.optimizers[0] else "g"
        names = {id(p): n for n, p in pl_module.named_parameters()}
        step = trainer.global_step
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.grads[f"{step}/{which}/{names[id(p)]}"] = p.grad.detach().clone()

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        out = {"grads": self.grads, "state": state, "metrics": metrics, "global_step": trainer.global_step}
        torch.save(out, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def cli_command(
    folder: Path, devices: int, strategy: str, *model_args: str, data: str = "Toy2D", data_args=()
) -> tuple[list[str], dict]:
    """Arguments and environment of ``cli.py fit`` with :class:`GradientDump` saving into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, str(ROOT / "cli.py"), "fit", *model_args,
        f"--data={data}", "--data.name=8gaussians", "--data.n_train=256", "--data.n_val=101",
        "--data.n_test=0", "--data.batch_size=64", *data_args,
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks+=test_gan.GradientDump", f"--trainer.callbacks.folder={folder}",
    ]  # fmt: skip
    env = cli_env()
    return args, env


def cli_fit(folder: Path, devices: int, strategy: str, *model_args: str, timeout: int = 900, **data):
    """``cli.py fit`` in a fresh process (see :func:`cli_command`); returns the CompletedProcess."""
    args, env = cli_command(folder, devices, strategy, *model_args, **data)
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def cli_fit_together(runs: dict[Path, tuple], *model_args: str, timeout: int = 900) -> None:
    """Several ``cli.py fit`` runs at once, ``{folder: (devices, strategy)}``; asserts each succeeded."""
    processes = {}
    for folder, (devices, strategy) in runs.items():
        args, env = cli_command(folder, devices, strategy, *model_args)
        processes[folder] = subprocess.Popen(
            args, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    for process in processes.values():
        _, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]


def load_dump(folder: Path, rank: int = 0) -> dict:
    return torch.load(folder / f"rank{rank}.pt", map_location="cpu", weights_only=False)


def sgd_weight_tolerance(one: dict, two: dict, name: str, lr: float) -> torch.Tensor:
    """The bound plain SGD guarantees on |w_2 - w_1| for parameter ``name`` after T steps, elementwise.

    SGD makes the weights a linear function of the gradients, w_T = w_0 - lr Σ_t g_t, so two runs from the
    same w_0 differ by at most lr Σ_t |g2_t - g1_t| (the gradient differences the test measured) plus the
    rounding of the T float32 updates of each run, at most 2^-24 max_t |w_t| <= 2^-24 (|w_T| + lr Σ_t |g_t|)
    per update and run (x2 for the product lr g rounded before the sum)."""
    keys = [k for k in one["grads"] if k.split("/", 2)[2] == name]
    diff = sum((two["grads"][k] - one["grads"][k]).abs() for k in keys)
    total = sum(one["grads"][k].abs() for k in keys)
    rounding = 2 * 2 * len(keys) * 2.0**-24 * (one["state"][name].abs() + lr * total)
    return lr * diff + rounding


def assert_parity(
    one: dict,
    two: dict,
    rank1: dict,
    atol: float,
    rtol: float,
    weight_atol: float | None = None,
    sgd_lr: float | None = None,
) -> dict:
    """2 processes vs 1: same gradient keys (every step of both players), gradients to ``atol``/``rtol``, the
    2 ranks' gradients identical, validation numbers equal, final weights to ``weight_atol`` (default atol),
    or, for runs with plain SGD of step size ``sgd_lr``, to the bound :func:`sgd_weight_tolerance` derives.

    With Adam, weights can differ by more than gradients do: Adam divides by sqrt(v) + eps (1e-8), so a
    parameter whose gradient is itself ~1e-8 (a nearly dead unit) moves by a fraction of lr set by float32
    rounding, which depends on the machine; SGD has no such amplification. Returns the worst differences."""
    weight_atol = atol if weight_atol is None else weight_atol
    assert one["grads"].keys() == two["grads"].keys() == rank1["grads"].keys()
    assert {k.split("/")[1] for k in one["grads"]} == {"d", "g"}
    worst = {"grad": 0.0, "weight": 0.0}
    for key, g1 in one["grads"].items():
        assert torch.equal(two["grads"][key], rank1["grads"][key]), f"ranks differ at {key}"
        torch.testing.assert_close(two["grads"][key], g1, atol=atol, rtol=rtol, msg=key)
        worst["grad"] = max(worst["grad"], (two["grads"][key] - g1).abs().max().item())
    for name, w1 in one["state"].items():
        if sgd_lr is not None and any(k.split("/", 2)[2] == name for k in one["grads"]):
            bound = sgd_weight_tolerance(one, two, name, sgd_lr)
            excess = ((two["state"][name] - w1).abs() - bound).max().item()
            assert excess <= 0, f"{name}: |Δw| exceeds the SGD bound by {excess:.2e}"
        else:
            torch.testing.assert_close(two["state"][name], w1, atol=weight_atol, rtol=rtol, msg=name)
        worst["weight"] = max(worst["weight"], (two["state"][name] - w1).abs().max().item())
    assert one["global_step"] == two["global_step"]
    assert one["metrics"].keys() == two["metrics"].keys() and one["metrics"]
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, abs=1e-5), key
    return worst


GAN_ARGS = ("--model=GAN", "--model.latent_dim=3", "--model.hidden=[32,32]", "--model.r1_gamma=1.0",
            "--model.r2_gamma=0.5", "--model.lr_d=1e-3", "--model.lr_g=1e-3")  # fmt: skip


@pytest.fixture(scope="module")
def one_process_gan(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("gan_devices1")
    result = cli_fit(folder, 1, "auto", *GAN_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_dump(folder)


@pytest.mark.ddp
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_give_the_one_process_gradients(
    tmp_path: Path, one_process_gan: dict, strategy: str
) -> None:
    """R1 + R2 (double backward) under plain DDP (no find_unused_parameters) through ``cli.py``, processes
    launched (``ddp``) or spawned (``ddp_spawn``: module, logger and callbacks are pickled into the
    workers): for every optimizer step of 3 batches (D and G), the all-reduced gradients on 2 gloo processes
    equal the 1-process gradients over the same global batch, the 2 ranks hold bit-identical gradients, and
    the final weights and the validation numbers (val/d_loss over uneven 51/50 shards) agree. Seen: max
    |Δgrad| 5e-8, max |Δweight| 3e-8 (float32). ``ddp_find_unused_parameters_true`` gave the same numbers."""
    result = cli_fit(tmp_path, 2, strategy, *GAN_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = assert_parity(one_process_gan, load_dump(tmp_path), load_dump(tmp_path, 1), atol=1e-6, rtol=1e-5)
    print(f"{strategy}: worst |grad diff| {worst['grad']:.2e}, |weight diff| {worst['weight']:.2e}")


@pytest.mark.ddp
def test_nan_on_one_rank_stops_both_with_the_message(tmp_path: Path) -> None:
    """The NaN example sits on one rank only; the reduced decision makes both ranks raise at the same step
    (no hang: the subprocess has a timeout) with the step and the loss named."""
    sizes = dict(n_train=256, n_val=101, n_test=0, batch_size=64)
    index = next(i for i in range(256) if nan_batch_position(NaNToy2D(i, **sizes), i) == 1)  # 2nd batch
    bad_batch = 1
    result = cli_fit(
        tmp_path,
        2,
        "ddp",
        *GAN_ARGS,
        data="test_gan.NaNToy2D",
        data_args=[f"--data.nan_index={index}"],
        timeout=900,
    )
    assert result.returncode != 0
    expected = f"global_step={2 * bad_batch}, epoch=0, batch_idx={bad_batch}"
    assert "NonFiniteLossError" in result.stderr and expected in result.stderr, result.stderr[-3000:]
    assert "non-finite on 1 of 2 process(es)" in result.stderr
    assert not list(tmp_path.glob("rank*.pt"))  # training never finished
