"""Multi-process and fault-tolerance guarantees: 2 DDP processes (gloo, CPU) give the numbers 1 process
gives, and a stopped-and-resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import cli_fit, metric_rows

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
