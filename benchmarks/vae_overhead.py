"""How much time per epoch does the zoo VAE add over a bare Lightning module and a bare PyTorch loop?

Three variants train the same network (encoder 64-256-256 -> diagonal Gaussian head 256-2x16, decoder
16-256-256-64 with Bernoulli logits), with the same loss (k = 1 reparameterised ELBO, closed-form KL),
batch 64, Adam(lr=1e-3), on the 1,500 Digits training images:

* ``torch``:     a plain loop: ``randperm`` per epoch, slice, forward, backward, ``Adam.step``.
* ``lightning``: a bare ``LightningModule`` doing the same arithmetic with plain tensors, fit by a Trainer.
* ``zoo``:       ``zoo.VAE(shape=(1, 8, 8), ...)``, fit by the same Trainer settings and data.

Both Lightning variants read ``datamodules.Digits(batch_size=64)`` when it exists (only the module
differs); otherwise both read one plain DataLoader over the same tensor. Repetitions are interleaved (the
order rotates every repeat: ABC, BCA, CAB, ...) so slow phases of a shared machine hit all variants alike.
Per-epoch time is measured from epoch start to epoch end, dropping each run's first (warm-up) epoch; each
run is reduced to its median epoch and to its best epoch (robust on a busy machine: load only adds time),
and the ratios are taken within a repeat. Nothing here asserts on time.

    .venv/bin/python benchmarks/vae_overhead.py [--epochs 20] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from zoo import VAE
from zoo.networks import mlp
from zoo.noise import global_normal, mix_key, pinned_noise

SHAPE, LATENT, HIDDEN, BATCH, LR, N_TRAIN, SEED = (1, 8, 8), 16, (256, 256), 64, 1e-3, 1500, 0
MIN_SCALE = 1e-4  # zoo.gaussian.MIN_SCALE
VARIANTS = ("torch", "lightning", "zoo")


# -- data -------------------------------------------------------------------------------------------------


def digits_datamodule_class():
    """``datamodules.Digits`` if the package provides it, else ``None``."""
    try:
        import datamodules
    except ImportError:
        return None
    return getattr(datamodules, "Digits", None)


def training_tensor() -> tuple[Tensor, str]:
    """The training images ``[N, 1, 8, 8]`` in [0, 1] and a line saying where they came from."""
    digits = digits_datamodule_class()
    if digits is not None:
        dm = digits(batch_size=BATCH)
        dm.setup("fit")
        data = dm.splits["train"].data
        return data, f"datamodules.Digits(batch_size={BATCH}): {len(data)} training images"
    import sklearn.datasets

    images = torch.from_numpy(sklearn.datasets.load_digits().images).float().div(16.0).unsqueeze(1)
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))[:N_TRAIN]
    return images[index], f"sklearn load_digits (no datamodules.Digits): {N_TRAIN} training images"


def lightning_data(train: Tensor) -> dict:
    """Keyword arguments for ``Trainer.fit``: the Digits datamodule if it exists, else a DataLoader."""
    digits = digits_datamodule_class()
    if digits is not None:
        return {"datamodule": digits(batch_size=BATCH)}
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    return {"train_dataloaders": loader}


# -- the bare network and loss --------------------------------------------------------------------------


class BareNets(nn.Module):
    """The zoo VAE's layers, created in the same order so a seeded build has the same initial weights."""

    def __init__(self) -> None:
        super().__init__()
        dim_x = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.encoder = nn.Sequential(nn.Flatten(), mlp(dim_x, HIDDEN[:-1], HIDDEN[-1]), nn.ReLU())
        self.decoder = mlp(LATENT, HIDDEN[::-1], dim_x)
        self.head = nn.Linear(HIDDEN[-1], 2 * LATENT)


def bare_loss(nets: BareNets, x: Tensor, eps: Tensor) -> Tensor:
    """-mean(log p(x | z) - KL(q || N(0, I))) with z = mu + scale * eps: plain tensors, no distributions."""
    out = nets.head(nets.encoder(x))
    mu, scale = out[:, :LATENT], F.softplus(out[:, LATENT:]) + MIN_SCALE
    z = mu + scale * eps
    logits = nets.decoder(z)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
    var = scale * scale
    kl = 0.5 * (var + mu * mu - 1.0 - var.log()).sum(1)
    return -(log_px_z - kl).mean()


class BareModule(L.LightningModule):
    """A bare LightningModule: the same nets and loss, ``torch.randn`` noise, no metrics, and the same
    per-step ``self.log("train/loss", prog_bar=True)`` as the zoo (any real module logs its loss; Lightning's
    logging costs ~0.5 ms a step on this tiny network, which would otherwise be billed to the zoo)."""

    def __init__(self) -> None:
        super().__init__()
        self.nets = BareNets()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        eps = torch.randn(batch.shape[0], LATENT, dtype=batch.dtype, device=batch.device)
        loss = bare_loss(self.nets, batch, eps)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=LR)


def zoo_vae() -> VAE:
    return VAE(
        shape=SHAPE,
        latent_dim=LATENT,
        decoder="mlp",
        likelihood="bernoulli",
        posterior="diagonal",
        k=1,
        estimator="reparam",
        hidden=HIDDEN,
        lr=LR,
    )


def check_same_model(train: Tensor) -> float:
    """Seeded builds have equal weights and, for the zoo's own noise, the same loss; returns |difference|."""
    torch.manual_seed(SEED)
    zoo = zoo_vae()
    torch.manual_seed(SEED)
    bare = BareNets()
    pairs = [
        (zoo.encoder, bare.encoder),
        (zoo.decoder, bare.decoder),
        (zoo.posterior_head.linear, bare.head),
    ]
    for a, b in pairs:
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            if not torch.equal(p, q):
                raise RuntimeError("the bare nets do not start from the zoo VAE's weights")
    x = train[:BATCH]
    eps = global_normal(BATCH, (1, LATENT), key=mix_key(zoo.seed, 0, 0))[:, 0]  # the zoo's step-0 noise
    with torch.no_grad(), pinned_noise(zoo, step=0):  # outside a Trainer the zoo draws fresh noise per call
        diff = (zoo.training_loss(x) - bare_loss(bare, x, eps)).abs().item()
    if diff > 1e-4:
        raise RuntimeError(f"the bare loss differs from the zoo VAE's training loss by {diff:.3g}")
    return diff


# -- the three runs ---------------------------------------------------------------------------------------


# Epoch clock. "cpu" (default) is this thread's CPU time: with torch on one thread and the data loaded in the
# main thread, it counts the work itself and little of what other processes on a shared machine do to the
# wall clock (cache and frequency effects remain). "wall" is time.perf_counter.
CLOCK = time.thread_time


class EpochTimer(L.Callback):
    """Wall time of every training epoch, from ``on_train_epoch_start`` to ``on_train_epoch_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = CLOCK()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(CLOCK() - self._start)


def run_torch(train: Tensor, epochs: int) -> list[float]:
    L.seed_everything(SEED, verbose=False)
    nets = BareNets()
    optimizer = torch.optim.Adam(nets.parameters(), lr=LR)
    nets.train()
    n, times = len(train), []
    for _ in range(epochs):
        start = CLOCK()
        perm = torch.randperm(n)
        for i in range(0, n, BATCH):
            x = train[perm[i : i + BATCH]]
            eps = torch.randn(x.shape[0], LATENT, dtype=x.dtype)
            loss = bare_loss(nets, x, eps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(CLOCK() - start)
    return times


def run_lightning(module_factory: Callable[[], L.LightningModule], train: Tensor, epochs: int) -> list[float]:
    L.seed_everything(SEED, verbose=False)
    module = module_factory()
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=epochs,
        callbacks=[timer],
    )
    trainer.fit(module, **lightning_data(train))
    return timer.times


def run(variant: str, train: Tensor, epochs: int) -> list[float]:
    if variant == "torch":
        return run_torch(train, epochs)
    return run_lightning(BareModule if variant == "lightning" else zoo_vae, train, epochs)


# -- report -----------------------------------------------------------------------------------------------


STATISTICS = {"median": statistics.median, "best": min}
RATIOS = (("zoo", "lightning"), ("lightning", "torch"), ("zoo", "torch"))


def summarise(per_run: dict[str, list[list[float]]]) -> dict:
    """Per run (first epoch dropped): its median epoch and its best (fastest) epoch. For each statistic:
    the median over repeats of each variant, and the within-repeat ratios (median, min, max over repeats).
    """
    out = {}
    for stat, reduce in STATISTICS.items():
        runs = {v: [reduce(t[1:]) for t in r] for v, r in per_run.items()}
        ratios = {f"{a}/{b}": [x / y for x, y in zip(runs[a], runs[b], strict=True)] for a, b in RATIOS}
        out[stat] = {
            "epoch_s": {
                v: {"median": statistics.median(m), "min": min(m), "max": max(m)} for v, m in runs.items()
            },
            "per_repeat_epoch_s": runs,
            "ratios": {
                k: {"median": statistics.median(r), "min": min(r), "max": max(r), "per_repeat": r}
                for k, r in ratios.items()
            },
        }
    return out


def print_report(result: dict, steps: int) -> None:
    med, best = result["median"], result["best"]
    print(f"\n{'':<10} {'median epoch per run':^30} {'best epoch per run':^18}")
    print(
        f"{'variant':<10} {'ms (median)':>11} {'min-max':>11} {'ms/step':>8} "
        f"{'ms (median)':>11} {'ms/step':>8}"
    )
    for v in VARIANTS:
        m, b = med["epoch_s"][v], best["epoch_s"][v]
        span = f"{1e3 * m['min']:.0f}-{1e3 * m['max']:.0f}"
        print(
            f"{v:<10} {1e3 * m['median']:>11.1f} {span:>11} {1e3 * m['median'] / steps:>8.2f} "
            f"{1e3 * b['median']:>11.1f} {1e3 * b['median'] / steps:>8.2f}"
        )
    print(f"\n{'ratio (within a repeat)':<24} {'median epochs':>22} {'best epochs':>22}")
    for k in med["ratios"]:
        cells = []
        for stat in (med, best):
            q = stat["ratios"][k]
            cells.append(f"{q['median']:.3f} [{q['min']:.2f}-{q['max']:.2f}]")
        print(f"{k:<24} {cells[0]:>22} {cells[1]:>22}")
    print("(ratio: median over repeats [min-max over repeats])")
    over = med["ratios"]["zoo/lightning"]["median"] - 1
    over_best = best["ratios"]["zoo/lightning"]["median"] - 1
    verdict = "within" if max(over, over_best) <= 0.05 else "OVER"
    print(
        f"zoo over bare Lightning: {100 * over:+.1f}% (median epochs), {100 * over_best:+.1f}% "
        f"(best epochs): {verdict} the 5% target. Timings are noisy and never asserted."
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions of the 3 variants")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="epoch clock (see CLOCK)")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.epochs < 2 or args.repeats < 1:
        parser.error("need --epochs >= 2 (the first epoch is dropped) and --repeats >= 1")

    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # GPU/TPU lines and tips, per fit
    for message in ("does not have many workers", "smaller than the logging interval", "Skipping val loop"):
        warnings.filterwarnings("ignore", f".*{message}.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # torch 2.13 deprecation inside Lightning 2.6
    train, source = training_tensor()
    steps = -(-len(train) // BATCH)
    diff = check_same_model(train)
    loader = (
        f"both read datamodules.Digits(batch_size={BATCH})"
        if digits_datamodule_class() is not None
        else "FALLBACK: both read one DataLoader(shuffle=True) over the tensor (no datamodules.Digits)"
    )
    print(f"data: {source}, batch {BATCH}, {steps} steps/epoch")
    print(f"Lightning variants: {loader}; torch loop: randperm + slicing of the same training tensor")
    print(f"check: same initial weights; bare loss = zoo training loss on a batch (|diff| = {diff:.1e})")
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, threads 1, {os.cpu_count()} CPUs; "
        f"{args.repeats} repeats x {args.epochs} epochs, interleaved, {args.clock} clock"
    )

    for variant in VARIANTS:  # warm-up: imports, allocator, first-call costs; not recorded
        run(variant, train, 2)
    per_run: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    total = time.perf_counter()
    for r in range(args.repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for variant in order:
            per_run[variant].append(run(variant, train, args.epochs))
    total = time.perf_counter() - total
    result = summarise(per_run)

    print_report(result, steps)
    print(f"timed section {total:.0f} s")

    result.update(
        {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": source,
            "lightning_data": loader,
            "steps_per_epoch": steps,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "threads": 1,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "epoch_s_per_run": per_run,
        }
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
