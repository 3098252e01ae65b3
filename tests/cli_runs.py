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
