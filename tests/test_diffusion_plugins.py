"""Diffusion as a plug-in family (issue 17): the user's own denoiser, optimiser and schedule, from Python and
from a LightningCLI recipe, with the family's losses, bound and noise around them; the presets' shape
contract for every size they build for; the defaults (the toy recipes' configuration)."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LinearLR, StepLR
from torch.utils.data import DataLoader

from zoo import Diffusion
from zoo.networks import CONV_SIDES, MLPDenoiser, UNet, check_role, dummy_batch

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(
    accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
    num_sanity_val_steps=0,
)  # fmt: skip


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- a user's networks (not genzoo's) ------------------------------------------------------------------------


class TimeMLP(nn.Module):
    """A user's vector denoiser: the MLP of [x_t, t / T] -> ``out`` values (2D with learned variances)."""

    def __init__(self, dim: int = 2, out: int = 4, width: int = 32, timesteps: int = 1000) -> None:
        super().__init__()
        self.timesteps = timesteps
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, out))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([x, (t.to(x.dtype) / self.timesteps)[:, None]], 1))  # (B, out)


class TinyConv(nn.Module):
    """A user's image denoiser: two 3x3 convolutions of [x_t, a plane of t / T] -> ``out`` channels."""

    def __init__(self, channels: int = 1, out: int = 2, width: int = 8, timesteps: int = 1000) -> None:
        super().__init__()
        self.timesteps = timesteps
        self.inp = nn.Conv2d(channels + 1, width, 3, padding=1)
        self.out = nn.Conv2d(width, out, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        plane = (t.to(x.dtype) / self.timesteps)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.out(F.silu(self.inp(torch.cat([x, plane], 1))))  # (B, out, H, W)


class Raises(nn.Module):
    """A denoiser that forgets t: it fails on the call the family makes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


POINTS = torch.randn(64, 2, generator=g(0))
IMAGES = torch.rand(16, 1, 16, 16, generator=g(1))


def fit(model: Diffusion, data: torch.Tensor, steps: int, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, enable_checkpointing=False, **{**QUIET, **trainer_args})
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=False))
    return trainer


@pytest.mark.parametrize(
    "build,data",
    [
        (lambda: Diffusion(shape=(2,), timesteps=50, denoiser=TimeMLP(timesteps=50)), POINTS),
        (
            lambda: Diffusion(shape=(2,), timesteps=50, variance="fixed_small", denoiser=TimeMLP(out=2)),
            POINTS,
        ),
        (lambda: Diffusion(shape=(1, 16, 16), timesteps=50, denoiser=TinyConv(), elbo_timesteps=3), IMAGES),
    ],
    ids=["mlp-learned-hybrid", "mlp-fixed-simple", "conv-learned-hybrid"],
)
def test_a_users_denoiser_trains_under_a_trainer(build, data) -> None:
    """4 steps under a Trainer: the loss is finite, every one of the user's parameters changed, and the model
    trains the user's module itself (the family's ``net`` is it); its bound and samples have their shapes."""
    torch.manual_seed(0)
    model = build()
    user = model.denoiser
    assert isinstance(user, (TimeMLP, TinyConv)) and user is model.net  # `net`: the name in checkpoints
    before = {name: p.detach().clone() for name, p in user.named_parameters()}
    trainer = fit(model, data, 4)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, p in user.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    assert model.elbo(data[:5], generator=g(2), timesteps=3).shape == (5,)
    assert model.sample(3, generator=g(3)).shape == (3, *data.shape[1:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (  # learned variances: twice the channels
            dict(shape=(2,), denoiser=TimeMLP(out=2)),
            r"Diffusion: the denoiser \(TimeMLP\) must map \[B, 2\], \[B\] to \[B, 4\].*returned \[2, 2\]"
            r".*pass variance='fixed_large'",
        ),
        (  # fixed variances: [B, *shape]
            dict(shape=(2,), variance="fixed_large", denoiser=TimeMLP(out=4)),
            r"denoiser \(TimeMLP\) must map \[B, 2\], \[B\] to \[B, 2\].*returned \[2, 4\]",
        ),
        (
            dict(shape=(1, 16, 16), denoiser=TinyConv(out=1)),
            r"denoiser \(TinyConv\) must map \[B, 1, 16, 16\], \[B\] to \[B, 2, 16, 16\].*returned "
            r"\[2, 1, 16, 16\].*twice the channels",
        ),
        (dict(shape=(2,), denoiser=Raises()), r"denoiser \(Raises\) failed on a dummy input \[B, 2\], \[B\]"),
    ],
    ids=["learned-needs-2D", "fixed-needs-D", "image-needs-2C", "raises"],
)
def test_a_wrong_denoiser_fails_at_construction_naming_the_role_and_shapes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Diffusion(timesteps=50, **kwargs)


def test_the_denoiser_sees_int64_timesteps_in_1_to_T_at_the_check_and_in_training() -> None:
    """The contract's t: int64 in 1..T in the construction check and in every training step."""
    seen: list[torch.Tensor] = []

    class Recording(TimeMLP):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(t.detach().clone())
            return super().forward(x, t)

    torch.manual_seed(0)
    model = Diffusion(shape=(2,), timesteps=20, denoiser=Recording(timesteps=20))
    assert len(seen) == 1 and seen[0].tolist() == [1, 20]
    fit(model, POINTS, 3)
    assert len(seen) >= 4
    for t in seen:
        assert t.dtype == torch.int64 and t.min() >= 1 and t.max() <= 20


def test_a_given_denoiser_ignores_the_preset_arguments() -> None:
    """``network`` / ``hidden`` / ``attention`` are ignored with a denoiser: a preset that could not build for
    the shape (a U-Net for vectors) does not stop it."""
    model = Diffusion(shape=(2,), network="unet", hidden=(7,), denoiser=TimeMLP())
    assert isinstance(model.denoiser, TimeMLP)
    with pytest.raises(ValueError, match="unet"):
        Diffusion(shape=(2,), network="unet")


# -- optimiser and schedule ----------------------------------------------------------------------------------


def test_the_default_optimiser_is_adam_at_lr() -> None:
    torch.manual_seed(0)
    trainer = fit(Diffusion(shape=(2,), timesteps=20, hidden=(16,), lr=3e-3), POINTS, 1)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 3e-3 and optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert trainer.lr_scheduler_configs == []


@pytest.mark.parametrize(
    "schedule,expected",
    [
        (functools.partial(StepLR, step_size=2, gamma=0.5), 0.05 * 0.5**2),
        (functools.partial(LinearLR, start_factor=1.0, end_factor=0.2, total_iters=8), 0.05 * 0.6),
    ],
    ids=["StepLR", "LinearLR"],
)  # fmt: skip
def test_a_users_optimiser_and_schedule_are_what_the_trainer_steps(schedule, expected: float) -> None:
    """optimizer=SGD(lr=0.05) is the Trainer's optimiser (``lr`` is ignored) and the schedule is stepped after
    every optimizer step: after 4 steps StepLR(2, 0.5) gives 0.05 * 0.25, LinearLR(1 -> 0.2 over 8)
    0.05 * 0.6."""
    torch.manual_seed(0)
    model = Diffusion(
        shape=(2,), timesteps=20, hidden=(16,), lr=123.0,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05), lr_scheduler=schedule,
    )  # fmt: skip
    trainer = fit(model, POINTS, 4)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert trainer.lr_scheduler_configs[0].interval == "step"


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_a_checkpoint_with_a_users_denoiser_reloads_with_it_passed_again(tmp_path: Path) -> None:
    """The live denoiser and optimiser are left out of the hyperparameters (no code in the checkpoint);
    ``load_from_checkpoint(path, denoiser=TimeMLP())`` restores the weights: the same network outputs, the
    same bound and the same samples for the same generators."""
    torch.manual_seed(0)
    model = Diffusion(
        shape=(2,), timesteps=30, denoiser=TimeMLP(timesteps=30), elbo_timesteps=4,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )  # fmt: skip
    trainer = fit(model, POINTS, 3)
    path = tmp_path / "diffusion.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert "denoiser" not in saved and "optimizer" not in saved and saved["timesteps"] == 30
    reloaded = Diffusion.load_from_checkpoint(path, denoiser=TimeMLP(timesteps=30))
    model.eval()
    x, t = POINTS[:6], torch.tensor([1, 5, 10, 20, 25, 30])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.denoiser(x, t), model.denoiser(x, t), rtol=0, atol=0)
        torch.testing.assert_close(
            reloaded.elbo(x, generator=g(4)), model.elbo(x, generator=g(4)), rtol=0, atol=0
        )
    torch.testing.assert_close(
        reloaded.sample(5, generator=g(5)), model.sample(5, generator=g(5)), rtol=0, atol=0
    )


def test_a_recipe_fills_the_denoiser_and_optimiser_by_class_path_and_its_checkpoint_reloads_bare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LightningCLI recipe with ``denoiser`` / ``optimizer`` / ``lr_scheduler`` as ``class_path`` /
    ``init_args``: the run trains the user's class with AdamW and its schedule, and the checkpoint reloads
    with ``Diffusion.load_from_checkpoint(path)`` and no arguments, to the same outputs."""
    from cli import run

    recipe = {
        "seed_everything": 0,
        "model": {
            "class_path": "Diffusion",
            "init_args": {
                "timesteps": 20,
                "elbo_timesteps": 2,
                "denoiser": {
                    "class_path": f"{__name__}.TimeMLP",
                    "init_args": {"width": 16, "timesteps": 20},
                },
                "optimizer": {
                    "class_path": "torch.optim.AdamW",
                    "init_args": {"lr": 0.01, "weight_decay": 0.1},
                },
                "lr_scheduler": {
                    "class_path": "torch.optim.lr_scheduler.StepLR",
                    "init_args": {"step_size": 1, "gamma": 0.5},
                },
            },
        },
        "data": {
            "class_path": "Toy2D",
            "init_args": {"n_train": 64, "n_val": 16, "n_test": 16, "batch_size": 16},
        },
        "trainer": {
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = run(["fit", "-c", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model.denoiser, TimeMLP) and cli.model.denoiser.body[0].out_features == 16
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    (path,) = tmp_path.rglob("*.ckpt")
    reloaded = Diffusion.load_from_checkpoint(path)
    assert isinstance(reloaded.denoiser, TimeMLP)
    x, t = POINTS[:6], torch.tensor([1, 2, 5, 10, 15, 20])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.denoiser(x, t), cli.model.denoiser(x, t), rtol=0, atol=0)


# -- the presets' contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("shape", [(2,), (5,), (1, 8, 8)], ids=str)
def test_the_mlp_preset_maps_the_contract_shapes(shape: tuple, learned: bool) -> None:
    """``network="mlp"`` builds an :class:`MLPDenoiser` mapping ``(x_t [B, *shape], t)`` to ``[B, *shape]``
    (``[B, 2C, ...]`` / ``[B, 2D]`` with learned variances), images included."""
    model = Diffusion(
        shape=shape,
        timesteps=50,
        network="mlp",
        hidden=(16, 16),
        variance="learned" if learned else "fixed_large",
    )
    assert isinstance(model.denoiser, MLPDenoiser)
    out = (2 * shape[0] if learned else shape[0], *shape[1:])
    inputs = [dummy_batch(shape), torch.tensor([1, 50])]
    check_role("Diffusion", "denoiser", model.denoiser, inputs, ("B", *out))


@pytest.mark.parametrize("learned", [False, True], ids=["fixed", "learned"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("side", CONV_SIDES)
def test_the_unet_preset_maps_the_contract_shapes_at_every_size(
    side: int, channels: int, learned: bool
) -> None:
    """``network="auto"`` picks the U-Net for (C, H, H) with H in {16, 28, 32, 64}, any C; it maps
    ``[B, C, H, H]`` to ``[B, C, H, H]`` (``[B, 2C, H, H]`` learned), with attention at H/4 and with channels
    that are not a power of two (GroupNorm's groups divide them)."""
    shape = (channels, side, side)
    model = Diffusion(
        shape=shape,
        timesteps=50,
        hidden=(8, 24, 16),
        attention=True,
        variance="learned" if learned else "fixed_large",
    )
    assert isinstance(model.denoiser, UNet)
    out = ((2 if learned else 1) * channels, side, side)
    inputs = [dummy_batch(shape), torch.tensor([1, 50])]
    check_role("Diffusion", "denoiser", model.denoiser, inputs, ("B", *out))


# -- defaults: the toy recipes' configuration ----------------------------------------------------------------


def test_defaults_are_the_recipes_learned_variances_hybrid_loss_and_ddim_100() -> None:
    """``Diffusion(shape=(2,))`` is configs/diffusion_25gaussians.yaml's model (learned variances, hybrid
    loss, DDIM 100 steps, MLP 128x3, Adam 1e-3); the loss follows the variance (``"auto"``): simple for fixed
    ones; a chain shorter than 100 steps samples every step."""
    recipe = yaml.safe_load((ROOT / "configs" / "diffusion_25gaussians.yaml").read_text())["model"][
        "init_args"
    ]
    model = Diffusion(shape=(2,))
    names = ("timesteps", "schedule", "parameterization", "variance", "sampler", "sample_steps", "lr")
    assert {name: model.hparams[name] for name in names} == {name: recipe[name] for name in names}
    assert list(model.hparams["hidden"]) == recipe["hidden"]
    assert model.loss_kind == recipe["loss"] == "hybrid"
    assert model.denoiser.out.out_features == 4  # the variance head
    assert Diffusion(shape=(2,), variance="fixed_large").loss_kind == "simple"
    assert Diffusion(shape=(2,), variance="fixed_small").loss_kind == "simple"
    short = Diffusion(shape=(2,), timesteps=30, hidden=(8,))
    assert short.sample_steps == 30 and short.sample_timesteps(short.sample_steps) == list(range(1, 31))
    assert Diffusion(shape=(2,), timesteps=1000, hidden=(8,)).sample_timesteps(100)[:3] == [1, 11, 21]


def test_the_denoiser_keeps_its_checkpoint_name() -> None:
    """``model.denoiser`` is the module registered as ``net``, the name in every checkpoint written before
    the role existed (their weights load unchanged); assigning ``model.denoiser`` replaces it, adding no
    module."""
    model = Diffusion(shape=(2,), timesteps=20, hidden=(8,))
    assert model.denoiser is model.net and all(key.startswith("net.") for key in model.state_dict())
    replacement = TimeMLP(timesteps=20)
    model.denoiser = replacement
    children = dict(model.named_children())
    assert model.net is replacement and children["net"] is replacement and "denoiser" not in children
