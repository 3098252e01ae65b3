"""Colour images through the CLI (issue 18): the CIFAR-10 and ImageFolder recipes, and every image family's
presets on both, train for a step on small synthetic data written in the REAL formats (CIFAR-10's python
archive as a .tar.gz, a folder of PNG files in class folders), with the datamodule's ``levels`` linked into
the likelihood families."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from image_data import write_cifar_archive, write_image_folder

from cli import run as main

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]
# The recipes as written, with narrower networks (the full-width ones cost minutes of CPU per step and test)
IMAGE_RECIPES = {
    "vae_cifar10.yaml": ["--model.hidden=[32]", "--model.eval_k=2"],
    "gan_cifar10.yaml": ["--model.hidden=[32]"],
    "diffusion_cifar10.yaml": ["--model.hidden=[8,16,16]", "--model.sample_steps=2"],
    "gan_imagefolder.yaml": ["--model.hidden=[32]"],
}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 archive of 5 x 8 training and 8 test images (synthetic pixels, the real format)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_archive(root, n_train_per_batch=8, n_test=8, tar=True)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 PNG images of 40x36 pixels in 2 class folders (resized and centre-cropped by the datamodule)."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, 24, size=(40, 36), classes=["cats", "dogs"])
    return root


def data_args(config: str, cifar: Path, folder: Path) -> list[str]:
    """The recipe's data pointed at the synthetic copy, with splits and batches that fit it."""
    if "cifar10" in config:
        return [f"--data.root={cifar}", "--data.val_size=8", "--data.batch_size=8"]
    return [f"--data.root={folder}", "--data.val_size=4", "--data.test_size=4", "--data.batch_size=8",
            "--data.num_workers=0"]  # fmt: skip


def cli(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return main([*args, f"--trainer.default_root_dir={tmp_path}", *QUIET])


@pytest.mark.parametrize("recipe", sorted(IMAGE_RECIPES))
def test_colour_image_recipes_fit_and_test(
    recipe: str, cifar: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recipe as written (networks, losses, callbacks) fits a step and runs ``genzoo test``."""
    config = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"] == "SampleQuality":  # FID / KID of 8 samples against 8 images
            callback["init_args"].update(n_samples=8, batch_size=8, kid_subsets=2, kid_subset_size=4)
    (tmp_path / recipe).write_text(yaml.safe_dump(config))
    args = ["-c", str(tmp_path / recipe), *IMAGE_RECIPES[recipe], *data_args(recipe, cifar, folder)]
    args.append("--trainer.fast_dev_run=true")
    fit = cli(["fit", *args], tmp_path, monkeypatch)
    assert fit.trainer.state.finished and fit.trainer.global_step >= 1
    assert (
        fit.model.shape == tuple(fit.datamodule.shape) == ((3, 32, 32) if "cifar" in recipe else (3, 64, 64))
    )
    test = cli(["test", *args], tmp_path, monkeypatch)
    metrics = test.trainer.callback_metrics
    assert any(key.startswith("test/") for key in metrics)
    if "SampleQuality" in str(config):
        assert float(fit.trainer.callback_metrics["sample_quality/fid"]) > 0
    if recipe in ("vae_cifar10.yaml", "diffusion_cifar10.yaml"):  # likelihood families: 8-bit bits/dim
        assert test.model.levels == 256
        assert 0 < float(metrics["test/bpd"]) < 100


FAMILIES = {  # every image family's presets, kept small: one step each
    "VAE": ["--model.decoder=conv", "--model.likelihood=gaussian", "--model.hidden=[32]", "--model.eval_k=2"],
    "DiscreteVAE": ["--model.hidden=[32]", "--model.n_latents=4", "--model.eval_k=2"],
    "GAN": ["--model.network=auto", "--model.hidden=[32]", "--model.r1_gamma=1.0"],
    "FGAN": ["--model.network=auto", "--model.hidden=[32]"],
    "Diffusion": ["--model.hidden=[8,8,8]", "--model.timesteps=10", "--model.elbo_timesteps=2"],
    "Flow": ["--model.transform=coupling", "--model.n_layers=2", "--model.hidden=[16]"],
}


@pytest.mark.parametrize("data", ["CIFAR10", "ImageFolder"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_image_family_trains_on_colour_images(
    family: str, data: str, cifar: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``genzoo fit --model <family> --data CIFAR10 | ImageFolder --data.root <dir>`` trains its presets."""
    if data == "CIFAR10":
        data_flags = ["--data=CIFAR10", *data_args("cifar10", cifar, folder)]
    else:
        data_flags = ["--data=ImageFolder", "--data.size=32", *data_args("folder", cifar, folder)]
    args = ["fit", f"--model={family}", *FAMILIES[family], *data_flags, "--trainer.fast_dev_run=true"]
    fit = cli(args, tmp_path, monkeypatch)
    assert fit.trainer.global_step >= 1 and fit.model.shape == (3, 32, 32)
    assert getattr(fit.model, "levels", 256) == 256  # linked where the family takes it
    metrics = fit.trainer.callback_metrics
    if family in ("VAE", "Diffusion", "Flow"):  # densities of the 8-bit images: bits/dim
        assert 0 < float(metrics["val/bpd"]) < 100, metrics


def test_a_binary_family_on_colour_images_names_the_families_that_fit(
    cifar: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MADE models binary pixels: on CIFAR-10 it stops before training, naming the 8-bit families."""
    from zoo.guards import DataSupportError

    args = ["fit", "--model=MADE", "--model.hidden=[16]", "--data=CIFAR10"]
    args += data_args("cifar10", cifar, folder)
    with pytest.raises(DataSupportError, match=r"8-bit images .* Flow, VAE with --model.likelihood gaussian"):
        cli([*args, "--trainer.fast_dev_run=true"], tmp_path, monkeypatch)
