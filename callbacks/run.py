"""Where a run lives and how pictures reach its logger: shared by every callback that writes something.

Only rank 0 calls these (callers check ``trainer.is_global_zero`` first); nothing here runs a collective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image


def run_dir(trainer: Trainer) -> Path:
    """The folder of this run's files: W&B's run folder (``.../files``, so ``wandb sync`` uploads what is
    put there), else the first logger's ``log_dir``, else the trainer's ``default_root_dir``."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        directory = _wandb_files_dir(logger)
        if directory is not None:
            return directory
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    path = Path(log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wandb_files_dir(logger: WandbLogger) -> Path | None:
    """The W&B run's ``files`` folder, or ``None`` for a disabled run (it has none).

    A process that attached to a run started by another one (``ddp_spawn`` pickles the logger into its
    workers) reports the folder relative to its own working directory and default root, where it does not
    exist; the run's real folder is then the one of that name under the logger's ``save_dir``.
    """
    directory = getattr(logger.experiment, "dir", None)
    if not directory:
        return None
    path = Path(directory)
    if not path.is_dir():
        candidate = Path(logger.save_dir or ".") / "wandb" / path.parent.name / path.name
        path = candidate if candidate.is_dir() else path
    path.mkdir(parents=True, exist_ok=True)
    return path


def wandb_offline_dir(trainer: Trainer) -> Path | None:
    """The folder to pass to ``wandb sync`` when this run was logged offline, else ``None``."""
    logger = trainer.logger
    if isinstance(logger, WandbLogger) and getattr(logger.experiment, "offline", False):
        directory = _wandb_files_dir(logger)
        return directory.parent if directory is not None else None
    return None


def log_image(trainer: Trainer, key: str, image: Image.Image, caption: str | None = None) -> Path:
    """Save ``image`` as ``<run dir>/<key>/step<global_step>.png`` and send it to the logger:
    a ``wandb.Image`` for W&B, ``add_image`` for TensorBoard (other loggers keep the file only)."""
    step = trainer.global_step
    path = run_dir(trainer) / key.replace("/", "_") / f"step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=step, caption=[caption or f"step {step}"])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    return path
