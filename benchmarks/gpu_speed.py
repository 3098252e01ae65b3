"""GPU speed (issue 11 item 3): steps/s of a bare PyTorch loop, the zoo eager and the zoo compiled.

Models (MNIST shape, 1x28x28): the conv VAE of configs/vae_mnist.yaml with a diagonal posterior
(``vae``), the same with k = 5 importance samples (``iwae``), and the conv GAN with R1 of
configs/gan_mnist.yaml (``gan``); batches 128 and 512; ``fp32`` (``32-true``) and ``bf16`` (``bf16-mixed``).

Variants, all on the same device-resident batches (8 distinct random batches in [0, 1], cycled; no loader):

* ``bare``: a plain loop over the family's own loss, no Lightning: ``Adam``, ``zero_grad(set_to_none)``,
  ``training_loss(x)`` (GAN: ``opponent_loss`` then ``generator_step_loss``, one update each), ``backward``,
  ``step``; ``torch.autocast`` for bf16. What a hand-written loop of the same maths costs.
* ``zoo_eager``: ``Trainer.fit`` of the family (its ``training_step``: data check, NaN guard with its one sync
  per optimizer step, logging; GAN: DDP-safe zero-touch terms), no logger / checkpoint / progress bar.
* ``zoo_compiled``: the same plus ``callbacks.Compile(backend=--backend, mode=--mode)`` (the GAN's
  discriminator stays eager under R1: AOTAutograd has no double backward; see callbacks/compile.py).

One step = one training batch (GAN: one discriminator AND one generator update). Timing: ``--warmup`` steps
first (compilation included there), then ``torch.cuda.synchronize()``, ``--steps`` steps, synchronize; the
clock is ``time.perf_counter``. ``--rounds`` rounds per configuration, the variants' order rotating each
round; the table gives the median over rounds. Nothing asserts on time. Results go to
``<--out>/gpu_speed.json`` (rewritten after every configuration, so a run cut short keeps what it measured).

    python benchmarks/gpu_speed.py --out runs/gpu_speed                # on the GPU machine
    python benchmarks/gpu_speed.py --smoke --out /tmp/gs               # CPU check: tiny sizes, aot_eager
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from callbacks.compile import Compile  # noqa: E402
from zoo import GAN, VAE  # noqa: E402

VARIANTS = ("bare", "zoo_eager", "zoo_compiled")
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
N_DISTINCT = 8  # distinct device batches, cycled


def build(name: str, smoke: bool) -> L.LightningModule:
    torch.manual_seed(0)
    hidden = (16,) if smoke else (256,)
    if name in ("vae", "iwae"):
        return VAE(shape=(1, 28, 28), latent_dim=4 if smoke else 16, decoder="conv", hidden=hidden,
                   k=5 if name == "iwae" else 1)  # fmt: skip
    if name == "gan":
        return GAN(shape=(1, 28, 28), latent_dim=4 if smoke else 64, hidden=hidden, network="conv",
                   r1_gamma=1.0)  # fmt: skip
    raise ValueError(f"unknown model {name!r}; use vae, iwae or gan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bare(model, batches, device, precision: str, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps of a plain loop after ``warmup`` steps."""
    model = model.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if isinstance(model, GAN):
        d_opt = torch.optim.Adam(model.opponent_parameters(), lr=model.lr_d, betas=model.betas)
        g_opt = torch.optim.Adam(model.generator_parameters(), lr=model.lr_g, betas=model.betas)

        def step(x):
            z = torch.randn(x.shape[0], model.latent_dim, device=device)
            with autocast:
                d_loss, _ = model.opponent_loss(x, z)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            with autocast:
                g_loss, _ = model.generator_step_loss(x, torch.randn_like(z))
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
    else:
        opt = torch.optim.Adam(model.parameters(), lr=model.lr)

        def step(x):
            with autocast:
                loss = model.training_loss(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for i in range(warmup):
        step(batches[i % N_DISTINCT])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[(warmup + i) % N_DISTINCT])
    sync(device)
    return time.perf_counter() - start


class StepTimer(Callback):
    """Wall time from the start of batch ``warmup`` to the end of training, synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.batches = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()
        self.batches += batch_idx >= self.warmup

    def on_train_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


class Batches:
    """``n`` device batches, cycled: an iterable Lightning takes as a loader (a list would be read as a list
    of loaders)."""

    def __init__(self, batches: list, n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.n))


def run_zoo(model, batches, device, precision, warmup, steps, compile_callback) -> float:
    timer = StepTimer(warmup)
    per_batch = 2 if isinstance(model, GAN) else 1  # GAN: global_step counts both players' updates
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=PRECISIONS[precision],
        max_steps=per_batch * (warmup + steps), max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer] + ([compile_callback] if compile_callback is not None else []),
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=Batches(batches, warmup + steps))
    if timer.batches != steps:
        raise RuntimeError(f"{type(model).__name__}: timed {timer.batches} batches, expected {steps}")
    return timer.seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_speed.json")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU check: tiny nets, batch 4, 2 steps, aot_eager"
    )
    parser.add_argument("--models", default="vae,iwae,gan")
    parser.add_argument("--batches", default="128,512")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.precisions, args.steps, args.warmup, args.rounds = "4", "fp32,bf16", 2, 1, 1
        args.backend = "aot_eager"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    warnings.filterwarnings(
        "ignore", message=".*(val_dataloader|does not have many workers|Compile:|treespec).*"
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__, "lightning": L.__version__, "smoke": args.smoke, "backend": args.backend,
        "mode": args.mode, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "rows": [],
    }  # fmt: skip
    print(f"device {result['device']}, torch {torch.__version__}, backend {args.backend}, mode {args.mode}")
    print(f"{'model':6} {'batch':>5} {'prec':5} " + " ".join(f"{v:>13}" for v in VARIANTS)
          + f" {'zoo/bare':>9} {'comp/zoo':>9}  (steps/s, median of rounds)")  # fmt: skip
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for precision in args.precisions.split(","):
                g = torch.Generator().manual_seed(1)
                batches = [torch.rand(batch, 1, 28, 28, generator=g).to(device) for _ in range(N_DISTINCT)]
                models = {v: build(name, args.smoke) for v in VARIANTS}
                compile_callback = Compile(backend=args.backend, mode=args.mode)
                seconds = {v: [] for v in VARIANTS}
                for r in range(args.rounds):
                    for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
                        if v == "bare":
                            s = run_bare(models[v], batches, device, precision, args.warmup, args.steps)
                        else:
                            cb = compile_callback if v == "zoo_compiled" else None
                            s = run_zoo(models[v], batches, device, precision, args.warmup, args.steps, cb)
                        seconds[v].append(s)
                rate = {v: args.steps / statistics.median(seconds[v]) for v in VARIANTS}
                for v in VARIANTS:
                    result["rows"].append({
                        "model": name, "batch": batch, "precision": precision, "variant": v,
                        "steps_per_s": rate[v], "seconds": seconds[v],
                        "compiled": compile_callback.compiled if v == "zoo_compiled" else [],
                        "left_eager": compile_callback.skipped if v == "zoo_compiled" else {},
                    })  # fmt: skip
                zoo_bare, comp_zoo = (
                    rate["zoo_eager"] / rate["bare"],
                    rate["zoo_compiled"] / rate["zoo_eager"],
                )
                rates = " ".join(f"{rate[v]:13.1f}" for v in VARIANTS)
                print(
                    f"{name:6} {batch:5d} {precision:5} {rates} {zoo_bare:9.2f} {comp_zoo:9.2f}", flush=True
                )
                (out / "gpu_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
