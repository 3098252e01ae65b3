"""The run guards of ``zoo.guards``: a non-finite loss or gradient stops every family before the optimizer
writes a weight (one synchronisation per step), and data outside the model's support or shape fails before
the first step with the data, the option and the fix named. DDP: tests/test_gan.py (NaN on one rank)."""

from __future__ import annotations

import re
import sys

import lightning as L
import pytest
import torch
from cli_runs import cli_run
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor, nn

from datamodules import Digits, Dirac, Toy2D
from zoo import GAN, VAE, DiracGAN
from zoo.guards import DataSupportError, FiniteGuard, NonFiniteLossError, check_data, check_finite


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def toy(batch_size: int = 32) -> Toy2D:
    return Toy2D("8gaussians", n_train=4 * batch_size, n_val=32, n_test=0, batch_size=batch_size)


class SqrtAtZero(L.LightningModule):
    """loss = Σ sqrt(|w - w₀|): 0 (finite) at w = w₀, but its gradient there is inf · 0 = NaN.
    ``manual=True`` trains it by manual optimisation, as the adversarial families do."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.w = nn.Parameter(torch.ones(3))
        self.shape = (2,)

    def training_step(self, batch: Tensor, batch_idx: int):
        loss = (self.w - torch.ones(3)).abs().sqrt().sum() + 0.0 * batch.sum()
        check_finite(self, "train/loss", loss, batch_idx)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# -- non-finite losses and gradients -------------------------------------------------------------------------


def test_outside_a_fit_a_non_finite_loss_raises_at_once_naming_it() -> None:
    model = VAE(shape=(2,), likelihood="gaussian")
    check_finite(model, "train/loss", torch.tensor(1.0), 0)
    with pytest.raises(
        NonFiniteLossError, match=r"VAE: train/loss is inf .* global_step=0, epoch=0, batch_idx=3"
    ):
        check_finite(model, "train/loss", torch.tensor(float("inf")), 3)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_step(manual: bool) -> None:
    model = SqrtAtZero(manual)
    with pytest.raises(NonFiniteLossError) as error:
        trainer().fit(model, toy())
    message = str(error.value)
    assert "SqrtAtZero: a gradient is non-finite (w)" in message and "train/loss=0" in message
    assert "global_step=0, epoch=0, batch_idx=0" in message
    assert torch.equal(model.w.detach(), torch.ones(3))  # the step never happened


def test_under_16_mixed_the_scaler_skips_overflows_and_the_guard_stops_at_scale_1() -> None:
    """With a GradScaler (fp16; built explicitly: Lightning maps 16-mixed to bf16 on the CPU), a non-finite
    gradient first makes the scaler skip the step and halve its scale (2^16, 2^15, ...); gradients still
    non-finite at scale 1 are non-finite in themselves: the 17th step (global_step=16) raises."""
    scaler = torch.amp.GradScaler("cpu")
    model = SqrtAtZero()
    fit = trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_epochs=10)
    with pytest.raises(NonFiniteLossError) as error:
        fit.fit(model, toy())
    assert "a gradient is non-finite (w) even at a GradScaler scale <= 1" in str(error.value)
    assert "global_step=16" in str(error.value) and scaler.get_scale() == 1.0
    assert torch.equal(model.w.detach(), torch.ones(3))


def test_a_nan_loss_in_the_vae_stops_before_any_step_changes_a_weight(monkeypatch) -> None:
    model = VAE(shape=(2,), likelihood="gaussian", hidden=(8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = VAE.training_loss

    def nan_on_batch_2(self, batch):
        loss = real(self, batch)
        return loss * float("nan") if self.global_step == 2 else loss

    monkeypatch.setattr(VAE, "training_loss", nan_on_batch_2)
    with pytest.raises(
        NonFiniteLossError, match=r"VAE: train/loss is nan .* global_step=2, epoch=0, batch_idx=2"
    ):
        trainer().fit(model, toy())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # 2 steps were taken


def test_the_dirac_gan_stops_on_a_nan_loss(monkeypatch) -> None:
    model = DiracGAN(gamma=1.0)
    real = DiracGAN.losses

    def nan_critic(self, batch, simultaneous=False):
        critic_loss, generator_loss, value = real(self, batch, simultaneous)
        return critic_loss * float("nan"), generator_loss, value

    monkeypatch.setattr(DiracGAN, "losses", nan_critic)
    with pytest.raises(NonFiniteLossError, match=r"DiracGAN: critic_loss is nan .* global_step=0"):
        trainer().fit(model, Dirac(n_train=64, batch_size=8))
    assert model.point().tolist() == [0.0, 0.0, 1.0]


def test_one_synchronisation_per_optimizer_step(monkeypatch) -> None:
    """The loss and gradient checks share one all-reduce per optimizer step (the data check adds one per fit):
    a GAN with 2 optimizer steps per batch and 4 batches does 8 + 1 reductions."""
    calls = []
    real = SingleDeviceStrategy.reduce

    def counting(self, tensor, *args, **kwargs):
        if sys._getframe(1).f_globals["__name__"] == "zoo.guards":  # not Lightning's own reductions
            calls.append(sys._getframe(1).f_code.co_name)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(SingleDeviceStrategy, "reduce", counting)
    model = GAN(shape=(2,), hidden=(8,), r1_gamma=1.0)
    fit = trainer()
    fit.fit(model, toy())
    assert fit.global_step == 8
    assert len(calls) == 8 + 1, calls
    assert sum(isinstance(c, FiniteGuard) for c in fit.callbacks) == 1


@pytest.mark.slow
def test_the_vae_with_lr_1e8_stops_naming_the_step_and_its_checkpoint_holds_finite_weights(tmp_path) -> None:
    """Through ``cli.py fit`` in a fresh process: one batch per epoch, so a checkpoint is written after the
    first step; Adam's first step with lr = 1e8 makes the next loss NaN, and the run stops there."""
    result = cli_run(
        tmp_path, 1, "--model=VAE", "--model.lr=1e8", "--model.hidden=[32]", "--data=Digits",
        "--data.binarize=static", "--data.batch_size=4096", "--trainer.max_epochs=5",
        "--trainer.limit_val_batches=1", timeout=900,
    )  # fmt: skip
    assert result.returncode != 0
    assert re.search(r"NonFiniteLossError: VAE: train/loss is (nan|inf)", result.stderr), result.stderr[
        -3000:
    ]
    assert "global_step=1, epoch=1, batch_idx=0" in result.stderr
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1 and "step=1" in checkpoints[0].name, checkpoints
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert max(v.abs().max().item() for v in state.values()) > 1e6  # the one huge step did happen


# -- data outside the model's support ------------------------------------------------------------------------


def test_a_bernoulli_vae_refuses_real_valued_data_naming_data_option_and_fix() -> None:
    model = VAE(shape=(2,))
    fit = trainer()
    with pytest.raises(DataSupportError) as error:
        fit.fit(model, toy())
    message = str(error.value)
    for part in ("VAE", "--model.likelihood=bernoulli", "[0, 1]", "Toy2D", "--model.likelihood=gaussian"):
        assert part in message, message
    assert fit.global_step == 0


def test_a_gaussian_vae_trains_on_the_same_data() -> None:
    fit = trainer(max_steps=2)
    fit.fit(VAE(shape=(2,), likelihood="gaussian", hidden=(8,)), toy())
    assert fit.global_step == 2


def test_a_shape_that_does_not_match_fails_before_training() -> None:
    with pytest.raises(DataSupportError, match=r"shape \(1, 8, 8\).* Toy2D has examples of shape \(2,\)"):
        trainer().fit(VAE(shape=(1, 8, 8), hidden=(8,)), toy())


def test_an_image_gan_refuses_pixels_outside_the_unit_interval() -> None:
    class Shifted(Digits):
        def build(self):
            splits = super().build()
            splits[0].data = splits[0].data * 2 - 1  # [-1, 1]
            return splits

    with pytest.raises(DataSupportError, match=r"GAN with an image generator .* \[0, 1\].* Shifted"):
        trainer().fit(GAN(shape=(1, 8, 8), hidden=(8,)), Shifted(batch_size=32))


@pytest.mark.parametrize(
    ("support", "good", "bad"),
    [
        ("real", [0.0, -3.0, 1e30], [0.0, float("nan")]),
        ("unit_interval", [0.0, 0.25, 1.0], [0.0, 1.0001]),
        ("binary", [0.0, 1.0, 1.0], [0.0, 0.5]),
    ],
)
def test_check_data_supports(support: str, good: list[float], bad: list[float]) -> None:
    model = VAE(shape=(1,), likelihood="gaussian")
    check_data(model, torch.tensor(good).reshape(-1, 1), support)
    with pytest.raises(DataSupportError, match="needs"):
        check_data(model, torch.tensor(bad).reshape(-1, 1), support)
    with pytest.raises(ValueError, match="support must be one of"):
        check_data(model, torch.zeros(2, 1), "positive")


def test_in_a_fit_only_the_first_batch_is_checked() -> None:
    """Later batches cost nothing: the check runs once per (trainer, module)."""
    model, fit = VAE(shape=(1,), likelihood="gaussian"), trainer()
    model._trainer = fit
    check_data(model, torch.zeros(2, 1), "binary")
    check_data(model, torch.full((2, 1), 0.5), "binary")  # not checked again
