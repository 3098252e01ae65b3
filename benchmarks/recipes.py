"""What the benchmarks share: a recipe read from ``configs/`` and a per-validation log of chosen metrics.

Each benchmark trains a config's model with a plain ``Trainer`` (no CLI, no logger), so the numbers it reports
are those of the recipe a user runs with ``genzoo fit -c configs/<name>.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str) -> tuple[dict, dict, dict, dict[str, dict]]:
    """``configs/<name>.yaml`` as (model init_args, data init_args, trainer arguments without callbacks,
    {callback class name: its init_args}). A relative data ``root`` is made absolute from the repository."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    model = dict(config["model"]["init_args"])
    data = dict(config["data"].get("init_args", {}))
    if "root" in data and not Path(data["root"]).is_absolute():
        data["root"] = str((ROOT / data["root"]).resolve())
    trainer = {k: v for k, v in config["trainer"].items() if k != "callbacks"}
    callbacks = {
        c["class_path"].rsplit(".", 1)[-1]: dict(c.get("init_args", {}))
        for c in config["trainer"].get("callbacks", [])
    }
    return model, data, trainer, callbacks


class EpochLog(L.Callback):
    """After every validation run (not the sanity check): epoch, step, seconds since fit start and the
    logged metrics named in ``columns`` ({column: metric name}), as one row printed and kept in ``rows``."""

    def __init__(self, columns: dict[str, str], digits: int = 4) -> None:
        self.columns, self.digits = columns, digits
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch + 1,
            "step": trainer.global_step,
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        row.update({col: round(float(metrics[name]), self.digits) for col, name in self.columns.items()})
        self.rows.append(row)
        print(row, flush=True)
