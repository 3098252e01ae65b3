"""Held-out NLL on binarised Digits: MADE and PixelCNN (exact) next to the VAE and IWAE (IWAE-k bounds).

Data: ``datamodules.Digits(binarize="dynamic", batch_size=64, seed=0)``, the split of
``configs/vae_digits.yaml``: 1,500 training images redrawn as Bernoulli(grey / 16) every epoch, 297 held-out
images (Digits' val and test splits, 150 + 147) binarised once. Every model trains for the same number of
epochs (24 Adam steps of 64 per epoch, lr 1e-3) on one process; then the 297 held-out images are scored:

* MADE, PixelCNN: the exact -log p(x) (``log_prob``), nats per image.
* VAE, IWAE (k = 5): -L_k with k = ``--eval-k`` importance samples
  (``callbacks.elbo_gap.iwae_log_likelihood``), an upper bound on their NLL that tightens with k; the
  negative ELBO is printed too.

The same numbers on the 1,500 training images (one static draw, the held-out draw's generator) show how much
each model overfits. Times are wall clock and the process's CPU time (this machine is shared: the CPU time is
the steadier number; one thread). Nothing asserts on time.

    .venv/bin/python benchmarks/autoregressive_nll.py [--epochs 100] [--eval-k 1000] [--json out.json]
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

from callbacks.elbo_gap import iwae_log_likelihood
from datamodules import Digits
from datamodules.base import binarize_static
from zoo import MADE, VAE, PixelCNN

SHAPE = (1, 8, 8)
MODELS = {
    "MADE": lambda: MADE(SHAPE, hidden=(500,)),
    "MADE, 8 orderings": lambda: MADE(SHAPE, hidden=(500,), n_orderings=8),
    "PixelCNN": lambda: PixelCNN(SHAPE, channels=32, n_layers=5, kernel_size=5),
    "VAE": lambda: VAE(SHAPE, latent_dim=16, hidden=(256, 256)),
    "IWAE, k=5": lambda: VAE(SHAPE, latent_dim=16, hidden=(256, 256), k=5),
}


@torch.no_grad()
def nll(model: L.LightningModule, x: torch.Tensor, eval_k: int) -> dict[str, float]:
    """Mean NLL (nats per image): exact for the autoregressive models, -L_k and -ELBO for the VAEs."""
    model.eval()
    if isinstance(model, VAE):
        g = torch.Generator().manual_seed(0)
        bound = iwae_log_likelihood(model, x, k=eval_k, chunk_size=100, generator=g)
        elbo = model.elbo(x, generator=g)
        return {"nll": -bound.mean().item(), "neg_elbo": -elbo.mean().item()}
    return {"nll": -model.log_prob(x).mean().item()}


def run(name: str, epochs: int, eval_k: int) -> dict:
    L.seed_everything(0, verbose=False)
    model, data = MODELS[name](), Digits(binarize="dynamic", batch_size=64, seed=0)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    held_out = torch.cat([data.splits["val"].data, data.splits["test"].data])  # the 297 held-out images
    train = binarize_static(data.splits["train"].grey, seed=1)
    result = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": trainer.global_step,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "held_out": nll(model, held_out, eval_k),
        "train": nll(model, train, eval_k),
    }
    result["held_out"]["bpd"] = result["held_out"]["nll"] / (64 * math.log(2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-k", type=int, default=1000)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the CPU clock then measures work, not spinning on a busy machine
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)")
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {machine}, {torch.get_num_threads()} threads")
    print(f"{'model':<20}{'params':>9}{'steps':>7}{'wall s':>8}{'cpu s':>8}{'held-out NLL':>14}{'bpd':>7}"
          f"{'-ELBO':>8}{'train NLL':>11}")  # fmt: skip
    results = []
    for name in args.models:
        r = run(name, args.epochs, args.eval_k)
        results.append(r)
        h, t = r["held_out"], r["train"]
        elbo = f"{h['neg_elbo']:8.2f}" if "neg_elbo" in h else f"{'':8}"
        print(f"{name:<20}{r['parameters']:>9}{r['steps']:>7}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}"
              f"{h['nll']:>14.2f}{h['bpd']:>7.3f}{elbo}{t['nll']:>11.2f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"epochs": args.epochs, "eval_k": args.eval_k, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
