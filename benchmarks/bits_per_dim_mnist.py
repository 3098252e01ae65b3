"""Bits per dimension on 8-bit MNIST, side by side: every likelihood family that models 8-bit images.

Each family trains with a plain Trainer on the offline MNIST copy (``../shared/data``: the 10,000-image t10k
file as 8,000 training / 1,000 validation / 1,000 test images, ``MNIST(source="test")``, 8-bit grey levels,
``levels = 256``) for ``--steps`` optimiser steps of batch 128, then ``trainer.test`` reports ``test/bpd`` on
the 1,000 test images by genzoo's convention (:mod:`zoo.pixels`):

* ``VAE``: conv encoder / decoder, Gaussian likelihood on uniformly dequantised pixels; the IWAE bound
  (``eval_k`` samples) minus D log 255, in bits: an upper bound on the discrete model's bits/dim.
* ``Flow``: RealNVP-style affine coupling layers (MLP conditioners) on dequantised pixels; exact density,
  same correction.
* ``Diffusion``: not retrained here (an hour on this CPU); its row is read from ``diffusion_mnist.json``,
  written by ``benchmarks/diffusion_mnist.py`` (discretised decoder: a bound on the 8-bit probability).

MADE and PixelCNN model binary pixels (Bernoulli), so they have no 8-bit row. Nothing here asserts on time.

    .venv/bin/python benchmarks/bits_per_dim_mnist.py --steps 2000 --json benchmarks/bits_per_dim_mnist.json
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

from datamodules import MNIST, shared_data_dir
from zoo import VAE, Flow

HERE = Path(__file__).resolve().parent


def families(levels: int) -> dict[str, L.LightningModule]:
    shape = (1, 28, 28)
    return {
        "VAE": VAE(
            shape=shape, latent_dim=32, decoder="conv", likelihood="gaussian", hidden=[256], eval_k=100,
            lr=5e-4, levels=levels,
        ),
        "Flow": Flow(
            shape=shape, transform="coupling", n_layers=8, hidden=[256, 256], lr=1e-4, levels=levels
        ),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per family (batch 128)")
    parser.add_argument("--families", default="VAE,Flow", help="comma-separated: VAE, Flow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test_batches", type=int, default=None, help="batches tested (smoke runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|isinstance\(treespec).*")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = shared_data_dir() / "mnist"
    rows = []
    for name in args.families.split(","):
        L.seed_everything(args.seed, verbose=False)
        data = MNIST(str(root), source="test", batch_size=128, seed=args.seed)
        model = families(data.levels)[name]
        trainer = L.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            limit_test_batches=args.test_batches,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        (out,) = trainer.test(model, data, verbose=False)
        row = {
            "family": name, "parameters": sum(p.numel() for p in model.parameters()),
            "steps": trainer.global_step, "train_seconds": round(seconds, 1),
            "test_bpd": round(out["test/bpd"], 4),
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    diffusion = json.loads((HERE / "diffusion_mnist.json").read_text())
    rows.append({
        "family": "Diffusion (diffusion_mnist.json)", "steps": diffusion["optimizer_steps"],
        "train_seconds": diffusion["train_seconds"], "test_bpd": diffusion["test_bpd"],
    })  # fmt: skip
    result = {"data": "MNIST t10k as 8000/1000/1000, 8-bit", "machine": platform.processor(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("| family | steps | train s | test bits/dim |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['steps']} | {row['train_seconds']} | {row['test_bpd']} |")


if __name__ == "__main__":
    main()
