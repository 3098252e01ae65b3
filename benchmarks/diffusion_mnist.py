"""DDPM on MNIST: the bound on the 8-bit images' negative log-likelihood in bits/dim, with steps and time.

Trains ``configs/diffusion_mnist.yaml`` (its model, data and EMA callback; batch 128) with a plain Trainer
on one process for at most ``--minutes`` of wall time or ``--steps`` optimiser steps, whichever comes first.
Every ``--curve_every`` steps it estimates the bound of the live (not averaged) weights on the first
``--curve_images`` validation images (8 stratified terms each), so the curve shows whether training had
stopped improving. At the end, with the EMA weights, it estimates the bound on the whole held-out test split
with ``--terms`` stratified terms per image (``Diffusion.elbo``: unbiased; the standard error is over images,
so it covers the term sampling too) and writes a picture of 64 DDIM-25 samples next to ``--json``.

The split: the offline copy in ../shared/data holds only MNIST's 10,000-image t10k file, cut into 8,000
training / 1,000 validation / 1,000 test images (``MNIST(source="test")``). Bits per dimension are
-ELBO / (784 ln 2) of the discretised 8-bit image (Ho et al. 2020, sec. 3.3), the unit of the published
figures (DDPM on CIFAR-10: <= 3.70 bits/dim, Ho et al. Table 1). Nothing here asserts on time.

    .venv/bin/python benchmarks/diffusion_mnist.py --minutes 60 --json benchmarks/diffusion_mnist.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from recipes import recipe

from callbacks.samples import image_grid
from datamodules import MNIST
from zoo import Diffusion


def bits_per_dim(model: Diffusion, x: torch.Tensor, terms: int, seed: int, batch: int = 128) -> torch.Tensor:
    """Per-image bound in bits per dimension, ``[N]`` (``terms`` stratified terms of 2..T per image)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        elbo = torch.cat(
            [model.elbo(chunk, generator=generator, timesteps=terms) for chunk in x.split(batch)]
        )
    return -elbo / (x[0].numel() * math.log(2))


class Curve(Callback):
    """Every ``every`` optimiser steps: step, seconds since the start of training, bits/dim on ``x``."""

    def __init__(self, x: torch.Tensor, every: int) -> None:
        self.x, self.every, self.rows, self.started = x, every, [], time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        seconds = time.perf_counter() - self.started
        pl_module.eval()
        bpd = bits_per_dim(pl_module, self.x, terms=8, seed=step).mean().item()
        pl_module.train()
        self.rows.append({"step": step, "train_seconds": round(seconds, 1), "val_bpd_live": round(bpd, 3)})
        print(json.dumps(self.rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-time budget of the training")
    parser.add_argument("--steps", type=int, default=100_000, help="optimiser-step budget of the training")
    parser.add_argument("--terms", type=int, default=50, help="stratified terms of the final bound per image")
    parser.add_argument("--curve_every", type=int, default=500)
    parser.add_argument("--curve_images", type=int, default=256)
    parser.add_argument("--test_images", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    model_args, data_args, _, callbacks = recipe("diffusion_mnist")
    ema_args = callbacks["EMAWeightAveraging"]
    L.seed_everything(args.seed, verbose=False)
    data = MNIST(**data_args)
    data.prepare_data()
    data.setup("fit")
    model = Diffusion(shape=(1, 28, 28), **{**model_args, "seed": args.seed})
    curve = Curve(torch.cat(list(data.val_dataloader()))[: args.curve_images], args.curve_every)
    trainer = L.Trainer(
        max_steps=args.steps, max_time={"minutes": args.minutes}, max_epochs=-1, accelerator="cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[EMAWeightAveraging(**ema_args), curve],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - started
    model.eval()  # the EMA weights: WeightAveraging copies the average into the model when training ends

    data.setup("test")
    x = torch.cat(list(data.test_dataloader()))[: args.test_images]
    started = time.perf_counter()
    bpd = bits_per_dim(model, x, args.terms, seed=args.seed + 1)
    eval_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        samples = model.sample(64, generator=torch.Generator().manual_seed(2))
    sample_seconds = time.perf_counter() - started
    n = len(x)
    result = {
        "recipe": "configs/diffusion_mnist.yaml",
        "model": model_args,
        "ema": ema_args,
        "seed": args.seed,
        "optimizer_steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_seconds": round(train_seconds, 1),
        "test_images": n,
        "test_bpd": round(bpd.mean().item(), 4),
        "test_bpd_se": round(bpd.std().item() / math.sqrt(n), 4),
        "terms_per_image": args.terms,
        "eval_seconds": round(eval_seconds, 1),
        "ddim_25_seconds_64": round(sample_seconds, 1),
        "curve": curve.rows,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, lightning {L.__version__}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        image_grid(samples).save(args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
