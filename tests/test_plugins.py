"""Issue 17, item 5: reuse from another project. A small package created by the test, outside genzoo,
defines its own networks and data; each family trains with them from Python and through
``genzoo fit -c its_recipe.yaml``; the checkpoint reloads in a fresh process with no arguments, samples, and
``genzoo predict`` / ``genzoo test`` work on it; 2 DDP processes give the 1-process weights with a user's
network. And the presets at real image sizes run through the CLI on CIFAR-10- and CelebA-64-shaped tensors.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import cli_env, cli_fit, final_state

from datamodules import Digits, Toy2D

PACKAGE = {
    "__init__.py": "",
    "nets.py": '''
        """A user's own networks: nothing here imports genzoo."""
        import torch
        from torch import nn


        class Encoder(nn.Module):
            """[B, C, H, W] -> [B, features]."""

            def __init__(self, channels: int = 1, side: int = 8, features: int = 32):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(), nn.Flatten(),
                    nn.Linear(8 * side * side, features), nn.SiLU(),
                )

            def forward(self, x):
                return self.body(x)


        class Decoder(nn.Module):
            """[B, latent] -> [B, C, H, W] logits."""

            def __init__(self, latent: int = 4, channels: int = 1, side: int = 8):
                super().__init__()
                pixels = channels * side * side
                self.body = nn.Sequential(nn.Linear(latent, 64), nn.SiLU(), nn.Linear(64, pixels))
                self.shape = (channels, side, side)

            def forward(self, z):
                return self.body(z).reshape(-1, *self.shape)


        class Generator(Decoder):
            """[B, latent] -> [B, C, H, W] in (0, 1)."""

            def forward(self, z):
                return torch.sigmoid(super().forward(z))


        class Discriminator(nn.Module):
            """[B, C, H, W] -> [B, 1] (no batch norm: R1 needs per-example input gradients)."""

            def __init__(self, channels: int = 1, side: int = 8):
                super().__init__()
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, 32),
                                          nn.LeakyReLU(0.2), nn.Linear(32, 1))

            def forward(self, x):
                return self.body(x)


        class Denoiser(nn.Module):
            """(x_t [B, D], t [B]) -> [B, D]."""

            def __init__(self, dim: int = 2, hidden: int = 64):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

            def forward(self, x, t):
                return self.body(torch.cat([x, t.to(x.dtype)[:, None] / 1000.0], 1))
    ''',
    "data.py": '''
        """A user's datamodule of random images, shaped like CIFAR-10 or CelebA-64."""
        import torch
        from datamodules.base import InMemoryDataset, TensorDataModule


        class RandomImages(TensorDataModule):
            def __init__(self, channels=3, side=32, n=64, batch_size=16, seed=0):
                super().__init__(batch_size, seed)
                self.shape, self.n = (channels, side, side), n

            def build(self):
                g = torch.Generator().manual_seed(self.seed)
                return [InMemoryDataset(torch.rand(self.n, *self.shape, generator=g)) for _ in range(3)]
    ''',
}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """``userpkg`` in a folder of its own, importable here and (by PYTHONPATH) in CLI subprocesses."""
    root = tmp_path_factory.mktemp("project")
    (root / "userpkg").mkdir()
    for name, text in PACKAGE.items():
        (root / "userpkg" / name).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def env_with(package: Path) -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = f"{package}:{env['PYTHONPATH']}"
    return env


def quick_trainer(folder: Path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=1, accelerator="cpu",
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=folder)  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


# -- from Python ---------------------------------------------------------------------------------------------


def _families(nets):
    from zoo import GAN, VAE, Diffusion

    digits = functools.partial(Digits, binarize="static", batch_size=32)
    return {
        "VAE": (lambda: VAE(shape=(1, 8, 8), latent_dim=4, encoder=nets.Encoder(), decoder=nets.Decoder()),
                {"encoder": nets.Encoder, "decoder": nets.Decoder}, digits),
        "GAN": (lambda: GAN(shape=(1, 8, 8), latent_dim=4, r1_gamma=1.0, generator=nets.Generator(),
                            discriminator=nets.Discriminator()),
                {"generator": nets.Generator, "discriminator": nets.Discriminator}, digits),
        "Diffusion": (lambda: Diffusion(shape=(2,), timesteps=100, variance="fixed_large",
                                        denoiser=nets.Denoiser()),
                      {"denoiser": nets.Denoiser}, functools.partial(Toy2D, "8gaussians", batch_size=64)),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["VAE", "GAN", "Diffusion"])
def test_a_users_networks_train_from_python_and_reload(package: Path, tmp_path: Path, family: str) -> None:
    import userpkg.nets as nets

    torch.manual_seed(0)
    build, roles, data = _families(nets)[family]
    model = build()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = quick_trainer(tmp_path)
    trainer.fit(model, data())
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    moved = {id(p) for name, p in model.named_parameters() if name in changed}
    for role in roles:  # the user's own parameters were trained (Diffusion registers its denoiser as `net`)
        assert any(id(p) in moved for p in getattr(model, role).parameters()), (role, changed)
    trainer.save_checkpoint(tmp_path / "user.ckpt")
    restored = type(model).load_from_checkpoint(
        tmp_path / "user.ckpt", **{r: make() for r, make in roles.items()}
    )
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model.eval()
    torch.testing.assert_close(restored.sample(8, generator=g1), model.sample(8, generator=g2))


@pytest.mark.parametrize("family", ["VAE", "GAN", "Diffusion"])
def test_a_run_with_a_users_networks_resumes_exactly(package: Path, tmp_path: Path, family: str) -> None:
    """2 epochs straight == 1 epoch, then resumed from its checkpoint for 1 more (the user's networks built
    again, as a user's script does): every weight and buffer equal bit for bit."""
    import userpkg.nets as nets

    build, _, data = _families(nets)[family]

    def fit(epochs: int, folder: Path, ckpt_path: Path | None = None):
        torch.manual_seed(0)
        model = build()
        trainer = quick_trainer(folder, max_epochs=epochs, limit_val_batches=0)
        trainer.fit(model, data(), ckpt_path=ckpt_path)
        return model, trainer

    straight, _ = fit(2, tmp_path / "straight")
    one, first = fit(1, tmp_path / "first")
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(2, tmp_path / "resumed", tmp_path / "epoch1.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[name], value) for name, value in one.state_dict().items())  # epoch 2 trained
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- from YAML, reloaded in a fresh process ------------------------------------------------------------------

RECIPES = {
    "vae": """
        model:
          class_path: VAE
          init_args:
            latent_dim: 4
            encoder: {class_path: userpkg.nets.Encoder, init_args: {features: 24}}
            decoder: {class_path: userpkg.nets.Decoder, init_args: {latent: 4}}
            optimizer:
              class_path: torch.optim.AdamW
              init_args: {lr: 0.002, weight_decay: 0.01}
            lr_scheduler:
              class_path: torch.optim.lr_scheduler.StepLR
              init_args: {step_size: 2, gamma: 0.5}
        data:
          class_path: Digits
          init_args: {binarize: static, batch_size: 64}
    """,
    "gan": """
        model:
          class_path: GAN
          init_args:
            latent_dim: 4
            r1_gamma: 1.0
            generator: {class_path: userpkg.nets.Generator, init_args: {latent: 4}}
            discriminator: {class_path: userpkg.nets.Discriminator}
            generator_optimizer:
              class_path: torch.optim.Adam
              init_args: {lr: 0.0005, betas: [0.0, 0.99]}
        data:
          class_path: Digits
          init_args: {batch_size: 64}
    """,
    "diffusion": """
        model:
          class_path: Diffusion
          init_args:
            timesteps: 100
            variance: fixed_large     # the user's Denoiser has no variance head ([B, D], not [B, 2D])
            denoiser: {class_path: userpkg.nets.Denoiser, init_args: {hidden: 32}}
        data:
          class_path: Toy2D
          init_args: {name: 8gaussians, n_train: 512, n_val: 128, n_test: 128, batch_size: 128}
    """,
}

LOAD = """
import sys, torch
import userpkg.nets  # the user's classes must be importable; genzoo's CLI is never imported here
from zoo import GAN, VAE, Diffusion
assert "cli" not in sys.modules
for family, path in zip((VAE, GAN, Diffusion), sys.argv[1:]):
    model = family.load_from_checkpoint(path)   # no arguments: the recipe's class_path/init_args rebuild it
    role = {"VAE": "encoder", "GAN": "generator", "Diffusion": "denoiser"}[family.__name__]
    assert type(getattr(model, role)).__module__ == "userpkg.nets", type(getattr(model, role))
    x = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    print(family.__name__, tuple(x.shape))
"""


def run_cli(folder: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    """``genzoo <args>`` in this process (the user's package is on ``sys.path``), logging to ``folder``."""
    from cli import run

    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return run([*args, "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={folder}"])  # fmt: skip


@pytest.mark.slow
def test_a_users_networks_train_from_a_recipe_and_reload_in_a_fresh_process(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = []
    for name, recipe in RECIPES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(recipe))
        cli = run_cli(tmp_path / name, monkeypatch, "fit", "-c", str(path), "--trainer.max_epochs=1",
                      "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
                      "--trainer.logger=false")  # fmt: skip
        checkpoints.append(cli.trainer.checkpoint_callback.best_model_path)
    # a fresh process that never imports genzoo's CLI: the recipe's class_path / init_args rebuild them
    out = subprocess.run([sys.executable, "-c", LOAD, *checkpoints], env=env_with(package), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == ["VAE (4, 1, 8, 8)", "GAN (4, 1, 8, 8)", "Diffusion (4, 2)"]

    vae_checkpoint = checkpoints[0]
    state = torch.load(vae_checkpoint, map_location="cpu", weights_only=False)
    assert state["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01  # the recipe's AdamW
    assert state["lr_schedulers"][0]["step_size"] == 2
    common = ("-c", str(tmp_path / "vae.yaml"), f"--ckpt_path={vae_checkpoint}", "--trainer.logger=false")
    run_cli(tmp_path / "predict", monkeypatch, "predict", *common, "--samples.n=16",
            f"--samples.out={tmp_path / 'grid.png'}")  # fmt: skip
    assert (tmp_path / "grid.png").stat().st_size > 0
    tested = run_cli(tmp_path / "test", monkeypatch, "test", *common, "--trainer.limit_test_batches=1")
    assert torch.isfinite(tested.trainer.callback_metrics["test/elbo"])


def _fit(package: Path, folder: Path, *args: str, devices: int = 1) -> Path:
    import cli_runs

    original = cli_runs.cli_env
    cli_runs.cli_env = lambda: env_with(package)
    try:
        return cli_fit(folder, devices, *args)
    finally:
        cli_runs.cli_env = original


@pytest.mark.ddp
def test_two_processes_give_the_one_process_weights_with_a_users_network(package: Path, tmp_path: Path):
    recipe = tmp_path / "vae.yaml"
    recipe.write_text(textwrap.dedent(RECIPES["vae"]))
    args = ("-c", str(recipe), "--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
            "--trainer.limit_val_batches=2")  # fmt: skip
    one, two = (final_state(_fit(package, tmp_path / f"d{d}", *args, devices=d), 0) for d in (1, 2))
    assert one.keys() == two.keys() and any(k.startswith("encoder.body") for k in one)
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-6, rtol=1e-5, msg=name)


# -- the presets at real image sizes, through the CLI ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "side"),
    [("VAE --model.decoder=conv --model.likelihood=gaussian", 32), ("GAN --model.r1_gamma=1", 64)],
)
def test_conv_presets_train_on_cifar10_and_celeba64_shaped_images(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, side: int
) -> None:
    name, *options = model.split()
    cli = run_cli(tmp_path, monkeypatch, "fit", f"--model={name}", *options,
                  "--data=userpkg.data.RandomImages", f"--data.side={side}", "--trainer.max_steps=3",
                  "--trainer.limit_val_batches=1", "--trainer.logger=false")  # fmt: skip
    assert cli.model.shape == (3, side, side) and cli.trainer.global_step >= 3
    samples = cli.model.sample(2)
    assert samples.shape == (2, 3, side, side) and torch.isfinite(samples).all()
