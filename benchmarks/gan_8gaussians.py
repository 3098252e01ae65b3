"""A GAN with R1 on the 8-Gaussian ring: how many modes, how many high-quality samples, how fast on a CPU?

The ring: 8 isotropic Gaussians with std 0.02 and means 2 (cos 2πi/8, sin 2πi/8) (``Toy2D("8gaussians")``).
A sample is high quality within 3 std (0.06) of its nearest mean; a mode is covered when it is the nearest
mean of at least one high-quality sample (``callbacks.quality``). Published anchors reach 8/8 modes; exact
samples of the ring are 98.9% high quality (1 - e^(-9/2)).

The run is ``configs/gan_8gaussians.yaml``'s recipe (read from the file: MLPs 128x3, latent 2, nonsaturating
loss, R1 γ = 0.01, Adam 1e-3 with betas (0.5, 0.9) decayed linearly to 5%, batch 256, 80 epochs of 79 batches)
fit by a plain ``Trainer`` on one process with validation (2,000 held-out examples, as many fixed samples)
every epoch, then scored on 10,000 fresh samples drawn with a fixed generator. ``--seed`` changes both the
initial weights (``seed_everything``) and the model's noise seed. Nothing here asserts on time.

    .venv/bin/python benchmarks/gan_8gaussians.py [--epochs N] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from recipes import EpochLog, recipe

from callbacks.quality import mode_coverage
from datamodules import Toy2D
from zoo import GAN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's max_epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    model_args, data_args, trainer_args, _ = recipe("gan_8gaussians")
    epochs = args.epochs or trainer_args.get("max_epochs", 30)
    L.seed_everything(args.seed, verbose=False)
    model = GAN(shape=(2,), **{**model_args, "seed": args.seed})
    data = Toy2D(**data_args)
    log = EpochLog({"modes_covered": "val/modes_covered", "high_quality": "val/high_quality"})
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[log],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - started

    samples = model.sample(10_000, generator=torch.Generator().manual_seed(1))
    final = mode_coverage(samples, data.centers, data.std)
    reference = mode_coverage(data.sample(10_000, torch.Generator().manual_seed(2)), data.centers, data.std)
    first_full = next((r for r in log.rows if r["modes_covered"] == 8 and r["high_quality"] >= 0.9), None)
    result = {
        "recipe": {"model": model_args, "data": data_args, "epochs": epochs, "seed": args.seed},
        "batches": trainer.fit_loop.epoch_loop._batches_that_stepped,
        "optimizer_steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "final_10k_samples": {
            "modes_covered": int(final["modes_covered"]),
            "high_quality": round(float(final["high_quality"]), 4),
            "per_mode": final["counts"].tolist(),
        },
        "data_10k_samples": {
            "modes_covered": int(reference["modes_covered"]),
            "high_quality": round(float(reference["high_quality"]), 4),
        },
        "first_epoch_at_8_modes_and_90pct": first_full,
        "per_epoch": log.rows,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, lightning {L.__version__}",
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_epoch"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
