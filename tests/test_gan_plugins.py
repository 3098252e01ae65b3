"""The adversarial families take the user's networks, optimisers and schedules (issue 17): a generator and a
discriminator / critic defined here (not genzoo's) train under a Trainer, wrong shapes fail at construction
naming the role, each player's optimiser and schedule is the one given, a checkpoint reloads with the same
networks passed again (from Python) or with none (from a recipe), the conv presets build for 32x32 and 64x64
RGB, and 2 DDP processes with user networks give the 1-process gradients.

The DDP test's subprocesses import this file (``PYTHONPATH=tests``) for the network classes.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from zoo import FGAN, GAN
from zoo.adversarial import _D_STREAM

FAST = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


# -- a researcher's own networks -----------------------------------------------------------------------------


class MyGenerator(nn.Module):
    """``z [B, latent_dim] -> x [B, *shape]``: a residual tanh MLP (nothing genzoo builds)."""

    def __init__(self, latent_dim: int = 3, shape: tuple[int, ...] = (2,), width: int = 16) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.inp = nn.Linear(latent_dim, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, math.prod(self.shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(z))
        h = h + torch.tanh(self.mid(h))
        return self.out(h).view(z.shape[0], *self.shape)


class MyDiscriminator(nn.Module):
    """``x [B, *shape] -> [B, 1]`` (the family flattens it to ``[B]``); per example, so R1/R2 are exact."""

    def __init__(self, features: int = 2, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MyCritic(MyDiscriminator):
    """``x [B, *shape] -> [B]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, 0]


class PairOut(MyDiscriminator):
    """Wrong: ``[B, 2]`` (two logits per example)."""

    def __init__(self, features: int = 2) -> None:
        super().__init__(features)
        self.body[-1] = nn.Linear(16, 2)


def ring(n: int = 64, seed: int = 0) -> torch.Tensor:
    """``[n, 2]`` points on a noisy unit circle (fixed)."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)


def loader(data: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False)


FAMILIES = {
    "gan": lambda **kw: GAN(shape=(2,), latent_dim=3, r1_gamma=1.0, r2_gamma=0.5, **kw),
    "fgan-kl_dv": lambda **kw: FGAN(shape=(2,), divergence="kl_dv", latent_dim=3, r1_gamma=1.0, **kw),
}


def opponent_role(family: str) -> str:
    return "discriminator" if family == "gan" else "critic"


# -- networks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("opponent_class", [MyDiscriminator, MyCritic], ids=["B1", "B"])
def test_user_networks_train_under_a_trainer(family: str, opponent_class: type) -> None:
    """3 batches (3 opponent and 3 generator steps) with R1 on: finite losses, every parameter of the user's
    generator and opponent moved, and ``model.<opponent>(x)`` is ``[B]`` whether the user's returns ``[B]``
    or ``[B, 1]``."""
    torch.manual_seed(0)
    generator, opponent = MyGenerator(), opponent_class()
    role = opponent_role(family)
    model = FAMILIES[family](generator=generator, **{role: opponent})
    assert model.generator is generator
    assert getattr(model, role)(ring(5)).shape == (5,)
    before = {
        name: p.detach().clone() for name, p in [*generator.named_parameters(), *opponent.named_parameters()]
    }
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **FAST)
    trainer.fit(model, loader(ring(48)))
    assert trainer.global_step == 6
    for key in ("train/d_loss", "train/g_loss", "train/r1"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    after = dict([*generator.named_parameters(), *opponent.named_parameters()])
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} did not move"
    assert {id(p) for p in model.opponent_parameters()} == {id(p) for p in opponent.parameters()}


@pytest.mark.parametrize(
    "family,kwargs,match",
    [
        ("gan", dict(generator=MyGenerator(shape=(3,))),
         r"GAN: the generator \(MyGenerator\) must map \[B, 3\] to \[B, 2\] \(B = 2 here\); it returned "
         r"\[2, 3\]"),
        ("gan", dict(generator=MyGenerator(latent_dim=5)),
         r"GAN: the generator \(MyGenerator\) failed on a dummy input \[B, 3\].*latent_dim = 3"),
        ("gan", dict(discriminator=PairOut()),
         r"GAN: the discriminator \(PairOut\) must map \[B, 2\] to \[B\] or \[B, 1\].*returned \[2, 2\]"),
        ("fgan-kl_dv", dict(critic=MyCritic(features=3)),
         r"FGAN: the critic \(MyCritic\) failed on a dummy input \[B, 2\].*\[B\] or \[B, 1\]"),
        ("fgan-kl_dv", dict(generator=MyGenerator(shape=(2, 1))),
         r"FGAN: the generator \(MyGenerator\) must map \[B, 3\] to \[B, 2\].*returned \[2, 2, 1\]"),
    ],
    ids=["gan-generator-shape", "gan-generator-latent", "gan-discriminator", "fgan-critic", "fgan-generator"],
)  # fmt: skip
def test_a_network_of_the_wrong_shape_fails_at_construction_naming_its_role(family, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FAMILIES[family](**kwargs)


def test_presets_are_unchanged_and_a_given_network_skips_only_its_own_preset() -> None:
    """None builds today's presets in today's order (same weights from the same seed); giving the
    discriminator leaves the generator's preset as it was; ``network`` is not checked when both are given."""
    torch.manual_seed(0)
    preset = GAN(shape=(2,), latent_dim=3, hidden=(16,))
    critic = MyCritic()  # built before the seed: only the family's own presets draw from it below
    torch.manual_seed(0)
    mixed = GAN(shape=(2,), latent_dim=3, hidden=(16,), discriminator=critic)
    assert mixed.discriminator is critic
    for name, value in preset.generator.state_dict().items():
        assert torch.equal(value, mixed.generator.state_dict()[name]), name
    GAN(
        shape=(2,), latent_dim=3, network="conv", generator=MyGenerator(), discriminator=MyCritic()
    )  # ignored
    with pytest.raises(ValueError, match="network='conv' needs images"):
        GAN(shape=(2,), latent_dim=3, network="conv", generator=MyGenerator())  # D would be the conv preset


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64)], ids=["rgb32", "rgb64"])
def test_conv_presets_train_on_rgb_images_with_r1(shape: tuple[int, ...]) -> None:
    """``network="auto"`` picks the DCGAN-style conv presets for 32x32 and 64x64 RGB; one batch with R1 under
    a Trainer: finite losses and penalty, samples in [0, 1] of the data's shape."""
    torch.manual_seed(0)
    model = GAN(shape=shape, latent_dim=8, hidden=(16,), r1_gamma=1.0)
    assert model.network == "conv"
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.generator.modules())
    assert any(isinstance(m, nn.Conv2d) for m in model.discriminator.modules())
    images = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **FAST)
    trainer.fit(model, loader(images, batch_size=4))
    assert trainer.global_step == 2
    for key in ("train/d_loss", "train/g_loss", "train/r1"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    samples = model.sample(3, torch.Generator().manual_seed(1))
    assert samples.shape == (3, *shape) and 0 <= samples.min() and samples.max() <= 1


# -- optimisers and schedules --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_players_optimizer_is_the_one_given_and_takes_its_step(family: str) -> None:
    """``<opponent>_optimizer=partial(SGD, lr=0.1)``: the Trainer's optimizers are ``[SGD over the opponent,
    SGD over the generator]`` and one batch with no generator turn moves the opponent by exactly
    -lr · ∇ of its loss at that batch's noise (plain SGD)."""
    torch.manual_seed(0)
    role = opponent_role(family)
    model = FAMILIES[family](
        hidden=(16,), n_critic=5, generator_optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        **{f"{role}_optimizer": functools.partial(torch.optim.SGD, lr=0.1)},
    )  # fmt: skip
    start = copy.deepcopy(model)
    x = ring(16)
    loss, _ = start.opponent_loss(x, start._train_noise(x, _D_STREAM, 0))
    grads = torch.autograd.grad(loss, start.opponent_parameters())
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **FAST)
    trainer.fit(model, loader(x))
    d_opt, g_opt = trainer.optimizers
    assert type(d_opt) is torch.optim.SGD and type(g_opt) is torch.optim.SGD
    assert d_opt.param_groups[0]["lr"] == 0.1 and g_opt.param_groups[0]["lr"] == 0.05
    assert {id(p) for p in d_opt.param_groups[0]["params"]} == {id(p) for p in model.opponent_parameters()}
    assert {id(p) for p in g_opt.param_groups[0]["params"]} == {id(p) for p in model.generator_parameters()}
    for p0, g, p1 in zip(start.opponent_parameters(), grads, model.opponent_parameters(), strict=True):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.1 * g, rtol=1e-6, atol=1e-7)
    for p0, p1 in zip(start.generator_parameters(), model.generator_parameters(), strict=True):
        assert torch.equal(p0, p1)  # no generator turn on the first of 5 batches


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_schedules_step_once_per_batch_and_lr_final_factor_is_the_default(family: str) -> None:
    """4 batches: the opponent's ``StepLR(step_size=2, gamma=0.5)`` takes its lr from 0.1 to 0.025; the
    generator, with no schedule given, follows the ``lr_final_factor`` shorthand: LinearLR from lr_g to half
    of it over the run's 4 batches."""
    role = opponent_role(family)
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    halve_every_2 = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    model = FAMILIES[family](
        hidden=(16,), lr_g=1e-3, lr_final_factor=0.5,
        **{f"{role}_optimizer": sgd, f"{role}_lr_scheduler": halve_every_2},
    )  # fmt: skip
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, **FAST)
    trainer.fit(model, loader(ring(64)))
    d_opt, g_opt = trainer.optimizers
    assert type(g_opt) is torch.optim.Adam and g_opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert d_opt.param_groups[0]["lr"] == pytest.approx(0.025, rel=1e-12)
    assert g_opt.param_groups[0]["lr"] == pytest.approx(5e-4, rel=1e-12)
    kinds = [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]
    assert kinds == ["StepLR", "LinearLR"]


def test_a_plateau_schedule_is_refused_naming_the_role() -> None:
    model = FGAN(
        shape=(2,), hidden=(8,),
        critic_lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1),
    )  # fmt: skip
    trainer = L.Trainer(max_steps=1, **FAST)
    with pytest.raises(ValueError, match="FGAN: critic_lr_scheduler cannot be ReduceLROnPlateau"):
        trainer.fit(model, loader(ring(16)))


# -- checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_checkpoint_with_user_networks_reloads_with_them_passed_again(family: str, tmp_path: Path) -> None:
    """Live networks and callables are left out of the hyperparameters (a checkpoint pickles no code);
    ``load_from_checkpoint(path, generator=MyGenerator(), <opponent>=...)`` gives the same samples and
    opponent outputs as the trained model."""
    torch.manual_seed(0)
    role = opponent_role(family)
    model = FAMILIES[family](
        generator=MyGenerator(), **{role: MyDiscriminator()},
        generator_optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last")],
    )  # fmt: skip
    trainer.fit(model, loader(ring(32)))
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert not {"generator", role, "generator_optimizer"} & set(saved)
    assert saved["latent_dim"] == 3 and saved["r1_gamma"] == 1.0
    restored = type(model).load_from_checkpoint(
        tmp_path / "last.ckpt", generator=MyGenerator(), **{role: MyDiscriminator()}
    )
    assert isinstance(restored.generator, MyGenerator)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(6, g()), restored.sample(6, g()))
    x = ring(6, seed=1)
    assert torch.equal(getattr(model, role)(x), getattr(restored, role)(x))
    assert not torch.equal(model.sample(6, g()), type(model)(shape=(2,), latent_dim=3).sample(6, g()))


RECIPE = """
model:
  class_path: GAN
  init_args:
    latent_dim: 3
    r1_gamma: 1.0
    generator:
      class_path: test_gan_plugins.MyGenerator
      init_args: {latent_dim: 3, shape: [2], width: 8}
    discriminator:
      class_path: test_gan_plugins.MyDiscriminator
      init_args: {features: 2, width: 8}
    generator_optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.01}
    discriminator_optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001, weight_decay: 0.01}
    discriminator_lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {step_size: 1, gamma: 0.5}
data:
  class_path: Toy2D
  init_args: {name: 8gaussians, n_train: 64, n_val: 32, n_test: 0, batch_size: 32}
trainer:
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.mark.slow  # ~9 s on a busy 2-core machine (the CLI's imports and a W&B-free run folder)
def test_a_recipe_fills_every_role_and_its_checkpoint_reloads_with_no_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The YAML form (``class_path`` / ``init_args`` for both networks, both optimisers and a schedule)
    through ``cli.py``: the Trainer uses the recipe's classes, and the checkpoint holds the recipe, so
    ``GAN.load_from_checkpoint(path)`` rebuilds the user's networks with no arguments."""
    from cli import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cli = run(["fit", "--config", str(tmp_path / "recipe.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    model, trainer = cli.model, cli.trainer
    assert isinstance(model.generator, MyGenerator) and isinstance(model.discriminator[0], MyDiscriminator)
    assert [type(o) for o in trainer.optimizers] == [torch.optim.AdamW, torch.optim.SGD]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001 * 0.5**2)  # 2 batches
    (path,) = tmp_path.rglob("*.ckpt")
    restored = GAN.load_from_checkpoint(path)
    assert isinstance(restored.generator, MyGenerator) and restored.generator.inp.out_features == 8
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(5, g()), restored.sample(5, g()))


# -- several processes ---------------------------------------------------------------------------------------

USER_NETWORK_ARGS = (
    "--model=GAN", "--model.latent_dim=3", "--model.r1_gamma=1.0", "--model.r2_gamma=0.5",
    '--model.generator={"class_path": "test_gan_plugins.MyGenerator", "init_args": {"latent_dim": 3}}',
    '--model.discriminator={"class_path": "test_gan_plugins.MyDiscriminator"}',
    '--model.generator_optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}',
    '--model.discriminator_optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01}}',
)  # fmt: skip


@pytest.mark.ddp
def test_two_processes_give_the_one_process_gradients_with_user_networks(tmp_path: Path) -> None:
    """The parity test of tests/test_gan.py with the user's generator and ``[B, 1]`` discriminator from a
    recipe and plain SGD for both players: under plain DDP (no find_unused_parameters) with R1 + R2, every
    step's all-reduced gradients on 2 gloo processes equal the 1-process ones, both ranks agree bit for bit,
    and the final weights are within the bound plain SGD guarantees."""
    from test_gan import assert_parity, cli_fit_together, load_dump

    runs = {tmp_path / "devices1": (1, "auto"), tmp_path / "devices2": (2, "ddp")}
    cli_fit_together(runs, *USER_NETWORK_ARGS)
    one, two = load_dump(tmp_path / "devices1"), load_dump(tmp_path / "devices2")
    assert any(key.endswith("discriminator.0.body.1.weight") for key in one["grads"])
    worst = assert_parity(one, two, load_dump(tmp_path / "devices2", 1), atol=1e-6, rtol=1e-5, sgd_lr=0.01)
    print(f"user networks: worst |grad diff| {worst['grad']:.2e}, |weight diff| {worst['weight']:.2e}")
