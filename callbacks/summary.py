"""A short, human summary printed when ``fit`` ends: final metrics, where the run is, how to upload it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.run import run_dir, wandb_offline_dir


class RunSummary(Callback):
    """On rank 0, at the end of ``fit``, print the final ``val/*`` metrics (nats unless named otherwise), the
    run's folder, its saved config and pictures, and the ``wandb sync`` line for an offline W&B run."""

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix
        self._started = time.monotonic()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.monotonic()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        print(self.render(trainer))

    def render(self, trainer: Trainer) -> str:
        elapsed = time.monotonic() - self._started
        epochs, steps = trainer.current_epoch, trainer.global_step
        lines = [f"genzoo: fit finished: {epochs} epochs, {steps} steps, {elapsed:.0f} s"]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        width = max([len(k) for k in metrics] + [8])
        for name, value in sorted(metrics.items()):
            lines.append(f"  {name:<{width}}  {value:.3f}")
        folder = shown(run_dir(trainer))
        lines.append(f"  {'run':<{width}}  {folder}")
        if (folder / "config.yaml").exists():
            lines.append(f"  {'config':<{width}}  {folder / 'config.yaml'}")
        pictures = sorted(folder.glob("*/step*.png"))
        if pictures:
            lines.append(f"  {'pictures':<{width}}  {len(pictures)} PNG files, latest {pictures[-1]}")
        offline = wandb_offline_dir(trainer)
        if offline is not None:
            lines.append(f"  {'upload':<{width}}  wandb sync {shown(offline)}")
        return "\n".join(lines)


def shown(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it (shorter to read and to paste)."""
    try:
        return Path(os.path.relpath(path)) if Path(path).resolve().is_relative_to(Path.cwd()) else Path(path)
    except ValueError:  # another drive
        return Path(path)
