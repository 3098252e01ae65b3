"""``cli.py fit`` in a fresh process, as a user would launch it: the helper of the multi-process tests.

Every run gets one thread per process (2 gloo processes on a 2-core machine), W&B disabled, a fixed hash
seed, and ``tests/`` on ``PYTHONPATH`` so test-only classes work as ``--model test_module.ClassName``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONHASHSEED": "0",
        "PYTHONPATH": path,
    }


def cli_run(
    folder: Path, devices: int, *args: str, strategy: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ``cli.py fit *args`` on ``devices`` CPU processes (``ddp`` when more than one, unless ``strategy``
    says otherwise) with a CSVLogger under ``folder``, its log folder ``folder/version_0``."""
    folder.mkdir(parents=True, exist_ok=True)
    strategy = strategy or ("ddp" if devices > 1 else "auto")
    command = [
        sys.executable, str(ROOT / "cli.py"), "fit", *args,
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={folder}",
    ]  # fmt: skip
    return subprocess.run(command, cwd=folder, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def cli_fit(folder: Path, devices: int, *args: str, strategy: str | None = None, timeout: int = 900) -> Path:
    """:func:`cli_run`, asserting that it succeeded; returns its log folder."""
    result = cli_run(folder, devices, *args, strategy=strategy, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "version_0"


def metric_rows(log_dir: Path, key: str) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` in which ``key`` was logged."""
    with open(log_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get(key)]


def assert_same_rows(one: list[dict], two: list[dict], prefix: str, n_rows: int, tol: float = 1e-4) -> None:
    """The rows of two runs log the same ``prefix*`` values at the same steps, to ``tol`` (absolute)."""
    assert len(one) == len(two) == n_rows
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"]
        keys = [key for key in a if key.startswith(prefix) and a[key]]
        assert keys and keys == [key for key in b if key.startswith(prefix) and b[key]]
        for key in keys:
            assert float(a[key]) == float(b[key]) or abs(float(a[key]) - float(b[key])) <= tol, key


def final_state(log_dir: Path, epoch: int) -> dict:
    """The ``state_dict`` of the checkpoint a run saved at the end of ``epoch``."""
    import torch

    (checkpoint,) = (log_dir / "checkpoints").glob(f"epoch={epoch}-*.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def check_parity_and_resume(
    folder: Path, args: tuple[str, ...], metrics: tuple[str, ...], pictures: int = 16
) -> dict:
    """Four ``cli.py fit`` runs, the first shared by both checks; returns the 1-process epoch-1 state.

    * parity: 2 epochs on 1 and on 2 gloo processes, same global batch, a SampleGrid every epoch (rank 0 draws
      it without hanging the other rank): the per-epoch ``metrics`` agree to 1e-4 and the final weights to
      float32 tolerance (atol 1e-6, rtol 1e-5);
    * resume: 3 epochs in one go == the 2-epoch run resumed from its checkpoint for 1 more: every weight and
      buffer and the epoch-3 ``metrics[-1]`` equal bit for bit.
    """
    import torch

    grid = ("--trainer.callbacks=SampleGrid", "--trainer.callbacks.every_n_epochs=1",
            f"--trainer.callbacks.n={pictures}")  # fmt: skip
    runs = {}
    for devices in (1, 2):
        log_dir = cli_fit(folder / f"devices{devices}", devices, *args, "--trainer.max_epochs=2", *grid)
        assert len(list((log_dir / "samples").glob("*.png"))) == 2
        runs[devices] = log_dir, metric_rows(log_dir, metrics[-1]), final_state(log_dir, 1)
    (first, rows1, state1), (_, rows2, state2) = runs[1], runs[2]
    assert len(rows1) == len(rows2) == 2
    for one, two in zip(rows1, rows2, strict=True):
        for key in metrics:
            assert abs(float(one[key]) - float(two[key])) <= 1e-4, key
    assert state1.keys() == state2.keys()
    for name in state1:
        torch.testing.assert_close(state1[name], state2[name], atol=1e-6, rtol=1e-5, msg=name)

    (checkpoint,) = (first / "checkpoints").glob("epoch=1-*.ckpt")
    resumed = cli_fit(folder / "resumed", 1, *args, "--trainer.max_epochs=3", f"--ckpt_path={checkpoint}")
    straight = cli_fit(folder / "straight", 1, *args, "--trainer.max_epochs=3")
    a, b = final_state(straight, 2), final_state(resumed, 2)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    key = metrics[-1]
    assert metric_rows(straight, key)[2][key] == metric_rows(resumed, key)[0][key]
    return state1
