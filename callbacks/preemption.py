"""Stop cleanly when the job is told to stop: SIGTERM (a cluster's preemption, ``kill``, a time limit).

Lightning turns SIGTERM into a ``SIGTERMException`` raised on every rank at the same step (it broadcasts the
flag), but by default saves nothing and the process exits with status 0, as if training had finished
(RELIABILITY.md #13). :class:`PreemptionCheckpoint` saves ``last.ckpt`` at that moment and makes the process
exit with 143 (128 + SIGTERM, what a scheduler expects of a terminated job), printing the path to resume from.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.run import run_dir

SIGTERM_EXIT_CODE = 143


class PreemptionCheckpoint(Callback):
    """On SIGTERM: save ``<checkpoint dir>/last.ckpt`` (the ``ModelCheckpoint``'s folder, else
    ``<run dir>/checkpoints``) and exit with ``exit_code``. Other exceptions pass through untouched.

    Under DDP rank 0 writes it without any collective: Lightning raises the exception on the signalled rank
    alone, and the other ranks stop when it exits (FSDP, whose state is sharded, is not covered). The resumed
    run continues from the saved step with the saved weights and optimizer state; after a SIGTERM in the
    middle of an epoch, the rest of that epoch is not replayed batch for batch (the loaders are not stateful,
    RELIABILITY.md #11). ``genzoo fit`` adds it to every run.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[PreemptionCheckpoint()])  # doctest: +SKIP
        >>> # kill -TERM <pid>  ->  "genzoo: SIGTERM at step 310: saved .../last.ckpt", exit status 143
    """

    def __init__(self, exit_code: int = SIGTERM_EXIT_CODE) -> None:
        self.exit_code = exit_code
        self.saved: Path | None = None

    @staticmethod
    def checkpoint_path(trainer: Trainer) -> Path:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath or run_dir(trainer) / "checkpoints") / "last.ckpt"

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        if trainer.world_size == 1:
            trainer.save_checkpoint(path)
        elif trainer.is_global_zero:
            # Lightning 2.6.6 raises on the signalled rank alone; the others may be blocked in a collective or
            # gone, so nothing here may wait for them (trainer.save_checkpoint ends with a barrier and would
            # hang): rank 0 writes its replica of the DDP state by itself.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        self.saved = path
        exception.code = self.exit_code  # Lightning re-raises this exception: it becomes the exit status
        rank_zero_info(
            f"genzoo: SIGTERM at step {trainer.global_step}: saved {path}; resume with --ckpt_path {path}"
        )
