"""Discrete latents and unnormalised models: what the estimators and NCE reach at equal optimizer steps.

1. DiscreteVAE on Digits (dynamic binarisation, batch 64): the three gradient estimators (``gumbel``,
   ``straight_through``, ``score``) with the recipe of ``configs/discrete_vae_digits.yaml`` (16 latents x 8
   categories, MLP 256-256, Adam 1e-3, temperature 1 -> 0.5), next to the Gaussian ``VAE`` of
   ``configs/vae_digits.yaml`` (16-D latent), each trained for ``--steps`` optimizer steps by a plain Trainer.
   Reported: the held-out (test split, 147 statically binarised digits) negative log-likelihood estimated by
   IWAE-k (k = ``--k``, default 1000) and the ELBO, in nats per digit.
2. NCE on Toy2D 25 Gaussians (``configs/nce_toy2d.yaml``: MLP energy 128-128, k = 20, batch 256) for
   ``--steps`` steps: KL(p_data ‖ p_model) on 20,000 fresh data points from Toy2D's exact density, next to the
   maximum-likelihood Gaussian (NCE's own noise) and a forward-KL (maximum-likelihood) coupling flow
   (``zoo.Flow``, when present) trained for the same steps; plus NCE's self-normalisation, ∫ exp(log_prob)
   on a 0.02 grid over [-6, 6]².

Nothing asserts on time or quality; the numbers go to benchmarks/README.md.

    .venv/bin/python benchmarks/discrete.py [--steps 3000] [--k 1000] [--part vae|nce|all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import lightning as L
import torch

from callbacks.elbo_gap import iwae_log_likelihood
from datamodules import Digits, Toy2D
from zoo import NCE, VAE, DiscreteVAE

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def fit(model: L.LightningModule, data: L.LightningDataModule, steps: int) -> float:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


@torch.no_grad()
def held_out(model, x: torch.Tensor, k: int) -> dict[str, float]:
    model.eval()
    g = torch.Generator().manual_seed(0)
    iwae = torch.cat([iwae_log_likelihood(model, xb, k, chunk_size=250, generator=g) for xb in x.split(50)])
    elbo = torch.cat([model.elbo(xb, generator=g) for xb in x.split(50)])
    return {"nll_iwae": -iwae.mean().item(), "nll_elbo": -elbo.mean().item()}


def vae_part(steps: int, k: int) -> dict:
    results = {}
    data = Digits(binarize="dynamic", batch_size=64)
    data.setup()
    x_test = data.splits["test"].data
    discrete = dict(n_latents=16, n_categories=8, temperature=1.0, temperature_min=0.5, anneal_steps=5000)
    models = {
        f"DiscreteVAE {e}": (lambda e=e: DiscreteVAE(shape=(1, 8, 8), estimator=e, **discrete))
        for e in ("gumbel", "straight_through", "score")
    }
    models["VAE (Gaussian, 16-D)"] = lambda: VAE(shape=(1, 8, 8), latent_dim=16)
    for name, build in models.items():
        L.seed_everything(0, verbose=False)
        model = build()
        seconds = fit(model, Digits(binarize="dynamic", batch_size=64), steps)
        results[name] = {**held_out(model, x_test, k), "seconds": seconds}
        r = results[name]
        print(
            f"{name:28s} NLL (IWAE-{k}) {r['nll_iwae']:7.2f}  -ELBO {r['nll_elbo']:7.2f}  ({seconds:.0f} s)"
        )
    return results


def nce_part(steps: int) -> dict:
    results = {}
    truth = Toy2D("25gaussians")
    held = truth.sample(20_000, torch.Generator().manual_seed(123))
    log_p_data = truth.log_prob(held)
    L.seed_everything(0, verbose=False)
    nce = NCE(shape=(2,), energy="mlp", k=20, hidden=(128, 128), lr=1e-3)
    seconds = fit(nce, Toy2D("25gaussians", batch_size=256), steps)
    h = 0.02
    grid = torch.arange(-6, 6, h) + h / 2
    with torch.no_grad():
        nce.eval()
        mass = nce.log_prob(torch.cartesian_prod(grid, grid)).exp().sum().item() * h * h
        results["NCE (MLP energy)"] = {
            "kl": (log_p_data - nce.log_prob(held)).mean().item(), "mass": mass, "seconds": seconds,
        }  # fmt: skip
        results["Gaussian (ML fit)"] = {"kl": (log_p_data - nce.noise_log_prob(held)).mean().item()}
    try:
        from zoo import Flow
    except ImportError:
        Flow = None
    if Flow is not None:
        L.seed_everything(0, verbose=False)
        flow = Flow(shape=(2,), transform="coupling")
        seconds = fit(flow, Toy2D("25gaussians", batch_size=256), steps)
        with torch.no_grad():
            flow.eval()
            results["Flow (coupling, forward KL)"] = {
                "kl": (log_p_data - flow.log_prob(held)).mean().item(), "seconds": seconds,
            }  # fmt: skip
    for name, r in results.items():
        extra = f"  ∫p = {r['mass']:.3f}" if "mass" in r else ""
        print(f"{name:28s} KL(p_data || p_model) {r['kl']:6.3f} nats{extra}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--part", choices=["vae", "nce", "all"], default="all")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {"steps": args.steps, "k": args.k, "torch": torch.__version__}
    if args.part in ("vae", "all"):
        out["digits"] = vae_part(args.steps, args.k)
    if args.part in ("nce", "all"):
        out["toy2d"] = nce_part(args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
