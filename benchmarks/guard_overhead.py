"""What the run guards (``zoo.guards``) cost per training step of the zoo VAE, side by side in one run.

Variants, all ``zoo.VAE`` on Digits with the settings of ``vae_overhead.py`` (batch 64, 24 steps an epoch),
fit by the same Trainer; only ``training_step`` differs:

* ``none``:      no guard at all (``training_loss`` + ``self.log``).
* ``loss_only``: the guard before issue 11: ``isfinite(loss)`` read on the host at once (one sync a step).
* ``zoo``:       ``zoo.VAE`` as shipped: ``check_data`` (first batch) + ``check_finite`` deferred to
                 ``FiniteGuard.on_before_optimizer_step``: loss AND gradients, one sync a step.

Repetitions are interleaved (the order rotates) and each run is reduced to its median and its best epoch
(first epoch dropped), CPU-time clock of this thread, as in ``vae_overhead.py``. Nothing is asserted.

    .venv/bin/python benchmarks/guard_overhead.py [--epochs 12] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vae_overhead as vo  # the shared settings, data and Trainer of the VAE benchmark

from zoo import VAE


class NoGuard(VAE):
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class LossOnly(VAE):
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        bad = self.trainer.strategy.reduce(
            (~torch.isfinite(loss.detach())).to(torch.float32), reduce_op="sum"
        )
        if bad.item() > 0:
            raise FloatingPointError("non-finite loss")
        self.log("train/loss", loss, prog_bar=True)
        return loss


def factory(cls):
    def build():
        return cls(shape=vo.SHAPE, latent_dim=vo.LATENT, hidden=vo.HIDDEN, lr=vo.LR)

    return build


VARIANTS = {"none": factory(NoGuard), "loss_only": factory(LossOnly), "zoo": factory(VAE)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    train, source = vo.training_tensor()
    steps = -(-len(train) // vo.BATCH)
    names = list(VARIANTS)
    for name in names:  # warm-up
        vo.run_lightning(VARIANTS[name], train, 2)
    runs: dict[str, list[list[float]]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(args.repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            runs[name].append(vo.run_lightning(VARIANTS[name], train, args.epochs))
    print(f"data: {source}; {steps} steps/epoch; {args.repeats} repeats x {args.epochs} epochs, CPU clock")
    print(f"{'variant':<10} {'ms/step (median epochs)':>24} {'ms/step (best epochs)':>22}")
    per = {}
    for name in names:
        med = [statistics.median(t[1:]) / steps for t in runs[name]]
        best = [min(t[1:]) / steps for t in runs[name]]
        per[name] = (med, best)
        print(f"{name:<10} {1e3 * statistics.median(med):>24.3f} {1e3 * statistics.median(best):>22.3f}")
    for a, b in (("zoo", "none"), ("loss_only", "none"), ("zoo", "loss_only")):
        ratios = [
            statistics.median([x / y for x, y in zip(per[a][i], per[b][i], strict=True)]) for i in range(2)
        ]
        print(f"{a}/{b}: {ratios[0]:.3f} (median epochs), {ratios[1]:.3f} (best epochs)")
    print(f"timed section {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
