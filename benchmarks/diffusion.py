"""DDPM on the 2-D Gaussian mixtures: how tight is its bound, how many modes, how many high-quality samples?

Trains ``configs/diffusion_<name>.yaml`` (read from the file: model, data, epochs, and the EMA callback's
decay and start) with a plain ``Trainer`` on one process, then, with the EMA weights:

* the ELBO of every one of the ``n_eval`` (2,000) test examples with all T terms (one draw each), the exact
  log p(x) of the mixture at the same points (``Toy2D.log_prob``), and their difference, whose mean bounds
  KL(p_data || p_model) = E[log p_data(x) - log p_model(x)] from above (E[log p_model] >= E[ELBO]);
  the standard error is over examples;
* the mode coverage and the share of high-quality samples (within 3 std of a mode, ``callbacks.quality``,
  the GAN benchmark's measure) of 10,000 samples from the ancestral DDPM sampler (all T steps) and from
  DDIM (η = 0) with 100 and 20 steps, each with its wall time.

Nothing here asserts on time. ``--epochs`` overrides the config.

    .venv/bin/python benchmarks/diffusion.py --name 8gaussians [--epochs N] [--seed 0] [--json out.json]
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
from lightning.pytorch.callbacks import EMAWeightAveraging
from recipes import recipe

from callbacks.quality import mode_coverage
from datamodules import Toy2D
from zoo import Diffusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", choices=["8gaussians", "25gaussians"], default="8gaussians")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's max_epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n_eval", type=int, default=2000)
    parser.add_argument("--n_samples", type=int, default=10_000, help="samples per sampler for mode coverage")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    model_args, data_args, trainer_args, callbacks = recipe(f"diffusion_{args.name}")
    ema_args = callbacks.get("EMAWeightAveraging")
    epochs = args.epochs or trainer_args.get("max_epochs", 100)
    L.seed_everything(args.seed, verbose=False)
    model = Diffusion(shape=(2,), **{**model_args, "seed": args.seed})
    data = Toy2D(**data_args)
    callbacks = [EMAWeightAveraging(**ema_args)] if ema_args is not None else []
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - started
    model.eval()

    data.setup("test")
    x = torch.cat(list(data.test_dataloader()))[: args.n_eval]
    started = time.perf_counter()
    with torch.no_grad():
        elbo = model.elbo(x, generator=torch.Generator().manual_seed(1), timesteps=None)
    elbo_seconds = time.perf_counter() - started
    log_p = data.log_prob(x)
    gap = log_p - elbo
    n = len(x)

    samplers = {}
    for label, kwargs in {
        f"ddpm_{model.timesteps}": dict(sampler="ddpm"),
        "ddim_100": dict(sampler="ddim", steps=100, eta=0.0),
        "ddim_20": dict(sampler="ddim", steps=20, eta=0.0),
    }.items():
        started = time.perf_counter()
        samples = model.sample(args.n_samples, generator=torch.Generator().manual_seed(2), **kwargs)
        seconds = time.perf_counter() - started
        coverage = mode_coverage(samples, data.centers, data.std)
        samplers[label] = {
            "modes_covered": int(coverage["modes_covered"]),
            "of": len(data.centers),
            "high_quality": round(float(coverage["high_quality"]), 4),
            "seconds": round(seconds, 1),
        }
    reference = mode_coverage(
        data.sample(args.n_samples, torch.Generator().manual_seed(3)), data.centers, data.std
    )
    result = {
        "recipe": {
            "model": model_args,
            "data": data_args,
            "epochs": epochs,
            "ema": ema_args,
            "seed": args.seed,
        },
        "optimizer_steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
        "test_examples": n,
        "elbo_nats": round(elbo.mean().item(), 4),
        "elbo_se": round(elbo.std().item() / math.sqrt(n), 4),
        "exact_log_p_nats": round(log_p.mean().item(), 4),
        "kl_bound_nats": round(gap.mean().item(), 4),
        "kl_bound_se": round(gap.std().item() / math.sqrt(n), 4),
        "elbo_seconds_all_terms": round(elbo_seconds, 1),
        "samples_10k": samplers,  # the name of the default; n_samples says how many
        "n_samples": args.n_samples,
        "data_10k": {
            "modes_covered": int(reference["modes_covered"]),
            "high_quality": round(float(reference["high_quality"]), 4),
        },
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, lightning {L.__version__}",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
