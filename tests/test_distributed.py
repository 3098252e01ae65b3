"""Multi-process and fault-tolerance guarantees: 2 DDP processes (gloo, CPU) give the numbers 1 process
gives, and a stopped-and-resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import cli_fit, cli_run, metric_rows

from datamodules import Digits
from zoo import VAE


def fit_through_cli(folder: Path, devices: int, *extra: str) -> tuple[list[dict], dict]:
    """Run ``cli.py fit`` in a fresh process; return the logged validation rows and the final weights."""
    log_dir = cli_fit(
        folder, devices,
        "--model=VAE", "--model.hidden=[64]", "--model.eval_k=20",
        "--data=Digits", "--data.binarize=dynamic", "--data.batch_size=64", "--trainer.max_epochs=2",
        "--trainer.callbacks=SampleGrid", "--trainer.callbacks.every_n_epochs=1",  # rank 0 draws, no hang
        *extra,
    )  # fmt: skip
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    assert len(list((log_dir / "samples").glob("*.png"))) == 2
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return metric_rows(log_dir, "val/elbo"), state


@pytest.mark.ddp
@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_two_processes_match_one(tmp_path: Path, estimator: str) -> None:
    """Same data, seed and global batch: validation ELBO / IWAE per epoch and the final weights agree to
    float32 tolerance (the only difference is the order of the gradient all-reduce sums; seen: metrics
    equal to 4e-6 nats, weights to 3e-8 after 48 Adam steps)."""
    results = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        folder.mkdir()
        results[devices] = fit_through_cli(folder, devices, f"--model.estimator={estimator}")
    (rows1, state1), (rows2, state2) = results[1], results[2]
    assert len(rows1) == len(rows2) == 2
    for one, two in zip(rows1, rows2, strict=True):
        for key in ("val/elbo", "val/iwae"):
            assert float(one[key]) == pytest.approx(float(two[key]), abs=1e-4), key
    assert state1.keys() == state2.keys()
    for name in state1:
        torch.testing.assert_close(state1[name], state2[name], atol=1e-6, rtol=1e-5, msg=name)


def train(max_epochs: int, folder: Path, ckpt_path: str | None = None, estimator: str = "reparam"):
    L.seed_everything(0)
    model = VAE(shape=(1, 8, 8), hidden=(64,), eval_k=10, estimator=estimator)
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)],
    )  # fmt: skip
    trainer.fit(model, Digits(binarize="dynamic", batch_size=64), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_resume_continues_exactly(tmp_path: Path, estimator: str) -> None:
    """4 epochs in one go == 2 epochs, stop, resume from last.ckpt, 2 more: bit for bit."""
    straight, straight_trainer = train(4, tmp_path / "straight", estimator=estimator)
    train(2, tmp_path / "split", estimator=estimator)
    resumed, resumed_trainer = train(4, tmp_path / "split", ckpt_path="last", estimator=estimator)
    assert resumed_trainer.global_step == straight_trainer.global_step == 4 * 24
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key in ("val/elbo", "val/iwae"):
        assert torch.equal(straight_trainer.callback_metrics[key], resumed_trainer.callback_metrics[key])


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after optimizer step ``step`` (rank 0 only, as a scheduler signals the job's
    launcher; Lightning forwards it to the other ranks)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.ddp)])
def test_sigterm_saves_last_ckpt_exits_143_and_the_run_resumes_from_it(tmp_path: Path, devices: int) -> None:
    """RELIABILITY.md #13: SIGTERM at step 30 of 48 saves last.ckpt at step 30 (once, by rank 0) and exits
    with 143 instead of 0; ``--ckpt_path`` to it finishes the run. The guard is
    ``callbacks.PreemptionCheckpoint``, which ``cli.py`` adds to every run."""
    args = ("--model=VAE", "--model.hidden=[32]", "--model.eval_k=5", "--data=Digits", "--data.batch_size=64",
            "--trainer.max_epochs=2", "--trainer.limit_val_batches=1")  # fmt: skip
    stopped = cli_run(
        tmp_path / "stopped", devices, *args, "--trainer.callbacks+=test_distributed.SigtermAt",
        "--trainer.callbacks.step=30",
    )  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    path = tmp_path / "stopped" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM at step 30: saved {path}" in stopped.stdout + stopped.stderr
    assert torch.load(path, map_location="cpu", weights_only=False)["global_step"] == 30
    resumed = cli_fit(tmp_path / "resumed", devices, *args, f"--ckpt_path={path}")
    (final,) = (resumed / "checkpoints").glob("epoch=1-*.ckpt")
    assert torch.load(final, map_location="cpu", weights_only=False)["global_step"] == 48
