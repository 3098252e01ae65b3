"""The command line: names, links, configs, logging, and clear failures on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import cli_env

from cli import run as main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# Recipes on data only the user has (CIFAR-10's archive, a folder of images): tests/test_image_recipes.py
USER_DATA = {"vae_cifar10.yaml", "gan_cifar10.yaml", "diffusion_cifar10.yaml", "gan_imagefolder.yaml"}


def run(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # runs/ and checkpoints land in the test's folder
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return main(args)


def test_there_are_configs() -> None:
    assert {p.name for p in CONFIGS} >= {"vae_digits.yaml", "iwae_digits.yaml", "vae_mnist.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_runs_fast_dev_run(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = config.read_text()
    if "shared/data" in text and not (ROOT.parent / "shared" / "data" / "mnist").exists():
        pytest.skip("../shared/data/mnist is absent")
    if config.name in USER_DATA:
        pytest.skip("needs the user's images: tests/test_image_recipes.py runs it on synthetic copies")
    # configs name data relative to the repository root, as a user runs them
    args = ["fit", "-c", str(config), "--trainer.fast_dev_run=true", *QUIET]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step >= 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_runs_test(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``genzoo test -c <recipe>``: every datamodule has a held-out test split by default and every family
    a ``test_step`` logging ``test/...`` (untrained model here; tests/test_predict.py uses checkpoints)."""
    text = config.read_text()
    if "shared/data" in text and not (ROOT.parent / "shared" / "data" / "mnist").exists():
        pytest.skip("../shared/data/mnist is absent")
    if config.name in USER_DATA:
        pytest.skip("needs the user's images: tests/test_image_recipes.py runs it on synthetic copies")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["test", "-c", str(config), "--trainer.fast_dev_run=true", *QUIET]
    cli = main([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert any(key.startswith("test/") for key in cli.trainer.callback_metrics), config.name


def test_model_and_data_by_name_with_shape_linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = run(
        ["fit", "--model=VAE", "--data=Digits", "--trainer.fast_dev_run=true", *QUIET], tmp_path, monkeypatch
    )
    assert cli.model.shape == (1, 8, 8) == tuple(cli.datamodule.shape)
    args = ["fit", "--model=VAE", "--model.likelihood=gaussian", "--data=Toy2D", "--data.name=moons"]
    cli = run([*args, "--trainer.fast_dev_run=true", *QUIET], tmp_path, monkeypatch)
    assert cli.model.shape == (2,)


def test_class_path_from_another_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = run(
        [
            "fit",
            "--model=zoo.vae.VAE",
            "--model.latent_dim=3",
            "--data=datamodules.Digits",
            "--trainer.fast_dev_run=true",
            *QUIET,
        ],
        tmp_path,
        monkeypatch,
    )
    assert cli.model.latent_dim == 3


def test_csv_logger_run_saves_config_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [
        "fit",
        "--model=VAE",
        "--model.hidden=[32]",
        "--data=Digits",
        "--trainer.max_epochs=1",
        "--trainer.logger=CSVLogger",
        "--trainer.logger.save_dir=logs",
        *QUIET,
    ]
    cli = run(args, tmp_path, monkeypatch)
    log_dir = Path(cli.trainer.logger.log_dir)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["class_path"].endswith("VAE") and saved["model"]["init_args"]["hidden"] == [32]
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert "val/elbo" in header and "val/iwae" in header and "train/loss" in header
    run(args, tmp_path, monkeypatch)  # a relaunch in the same place must not die on the saved config


def test_default_logger_is_offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli = main(
        ["fit", "--model=VAE", "--model.hidden=[32]", "--data=Digits", "--trainer.max_epochs=1", *QUIET]
    )
    cli.trainer.logger.experiment.finish()
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (runs[0] / "files" / "config.yaml").exists()
    out = capsys.readouterr().out
    assert "val/elbo" in out and "val/iwae" in out and f"wandb sync {runs[0].relative_to(tmp_path)}" in out


@pytest.mark.ddp
def test_ddp_spawn_with_the_default_wandb_logger(tmp_path: Path) -> None:
    """``ddp_spawn`` pickles the logger into its workers: the default W&B logger must survive that, and rank 0
    alone writes the config and the sample grid into the one offline run folder and prints its sync line."""
    env = {k: v for k, v in cli_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    command = [
        sys.executable, str(ROOT / "cli.py"), "fit", "--model=VAE", "--model.hidden=[32]", "--data=Digits",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_spawn",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks=SampleGrid",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert (run / "files" / "config.yaml").exists()
    assert len(list((run / "files" / "samples").glob("*.png"))) == 1
    assert f"wandb sync {run.relative_to(tmp_path)}" in result.stdout
    assert not (tmp_path / "wandb").exists()  # nothing written relative to a worker's default root


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model=NoSuchModel", "--data=Digits"], ["NoSuchModel", "VAE"]),
        (["--model=VAE", "--data=NoSuchData"], ["NoSuchData", "Digits", "Toy2D"]),
        (
            ["--model=VAE", "--model.decoder=transformer", "--data=Digits"],
            ["transformer", "mlp", "conv", "linear"],
        ),
        (["--model=VAE", "--model.latent_dim=two", "--data=Digits"], ["latent_dim", "two"]),
        (["--model=VAE", "--data=Toy2D", "--data.name=spiral"], ["spiral", "8gaussians"]),
    ],
)
def test_bad_input_fails_before_running_and_names_the_choices(
    args: list[str], expected: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *args, "--trainer.fast_dev_run=true"], tmp_path, monkeypatch)
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    for word in expected:
        assert word in message, f"{word!r} missing from:\n{message}"
    assert not (tmp_path / "runs" / "wandb").exists()


def test_shape_that_cannot_work_names_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=r"decoder='conv' needs images of shape \(C, H, W\) .*; got shape=\(1, 8, 8\)"
    ):
        run(
            ["fit", "--model=VAE", "--model.decoder=conv", "--data=Digits", "--trainer.fast_dev_run=true"],
            tmp_path,
            monkeypatch,
        )


def test_tensorboard_logger_override_gets_config_and_pictures(tmp_path: Path, monkeypatch) -> None:
    args = ["fit", "--model=VAE", "--model.hidden=[16]", "--data=Digits", "--trainer.max_epochs=1",
            "--trainer.logger=TensorBoardLogger", "--trainer.logger.save_dir=tb",
            "--trainer.callbacks=SampleGrid", "--trainer.callbacks.every_n_epochs=1", *QUIET]  # fmt: skip
    cli = run(args, tmp_path, monkeypatch)
    log_dir = Path(cli.trainer.logger.log_dir)
    assert (log_dir / "config.yaml").exists()
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert len(list((log_dir / "samples").glob("*.png"))) == 1


def test_no_logger(tmp_path: Path, monkeypatch) -> None:
    cli = run(["fit", "--model=VAE", "--model.hidden=[16]", "--data=Digits", "--trainer.max_epochs=1",
               "--trainer.logger=false", *QUIET], tmp_path, monkeypatch)  # fmt: skip
    assert cli.trainer.logger is None and "val/elbo" in cli.trainer.callback_metrics
    assert not (tmp_path / "runs" / "wandb").exists()
