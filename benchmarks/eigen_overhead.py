"""What does the eigenvalue tracker (callbacks.EigenvalueTracker) add to training time on configs/ recipes?

Two recipes, each trained with and without the tracker, everything else equal:

* ``vae_digits_hessian``: the model, data and tracker of ``configs/vae_digits_hessian.yaml`` (the demo VAE on
  Digits, 24 steps an epoch; the tracker on the loss Hessian, k = 1 by Lanczos, at the tracker's DEFAULT
  cadence ``every_n_steps``). A run lasts exactly ``every_n_steps`` steps, so it holds one probe (the cadence
  probe and the end-of-fit probe fall on the same step): the ratio is the amortised cost of one probe per
  ``every_n_steps`` steps, which is what a long run pays.
* ``dirac_gan_eigen``: ``configs/dirac_gan_eigen.yaml`` as it is (the Dirac-GAN, 1,000 steps, the game
  Jacobian every 50 steps, a picture every 10 probes and at the end).

Trainer settings as in benchmarks/vae_overhead.py (no logger, no checkpoints, no validation, one thread). Runs
alternate (without, with), (with, without), ... so slow phases of a shared machine hit both. Time is the main
thread's CPU time (``--clock cpu``; ``wall`` for the wall clock) from ``on_train_start`` to ``on_train_end``,
probes included (they run in the training loop). Per recipe it prints the ratio with/without (median over
the pairs and min-max, and the ratio of the fastest runs, the robust number on a busy machine: load only adds
time) and the tracker's own time per probe, summed over a run as a share of the run without it (the least
noisy estimate). Nothing here asserts on time.

    .venv/bin/python benchmarks/eigen_overhead.py [--repeats 5] [--recipes vae_digits_hessian dirac_gan_eigen]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

import callbacks
import datamodules
import zoo
from callbacks import EigenvalueTracker

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("vae_digits_hessian", "dirac_gan_eigen")
CLOCK = time.thread_time


def build(spec: dict, *packages):
    """An object from a config entry ``{class_path, init_args}``, the class looked up by name like the CLI."""
    name = spec["class_path"]
    for package in packages:
        if hasattr(package, name):
            return getattr(package, name)(**spec.get("init_args", {}))
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)(**spec.get("init_args", {}))


class Timer(L.Callback):
    """CPU (or wall) time from ``on_train_start`` to ``on_train_end``."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.elapsed = CLOCK()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = CLOCK() - self.elapsed


class TimedTracker(EigenvalueTracker):
    """The tracker, also recording the time of each of its probes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_times: list[float] = []

    def probe(self, trainer, pl_module, last: bool = False):
        start = CLOCK()
        out = super().probe(trainer, pl_module, last)
        self.probe_times.append(CLOCK() - start)
        return out


def recipe(name: str) -> dict:
    """Model, data and tracker arguments of ``configs/<name>.yaml``, and the benchmark's trainer limits."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    trackers = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EigenvalueTracker")]
    tracker_args = trackers[0].get("init_args", {})
    default_cadence = inspect.signature(EigenvalueTracker).parameters["every_n_steps"].default
    if name == "vae_digits_hessian":
        limits = {"max_steps": tracker_args.get("every_n_steps", default_cadence), "max_epochs": -1}
    else:
        limits = {"max_epochs": config["trainer"]["max_epochs"]}
    return {"config": config, "tracker_args": tracker_args, "limits": limits}


def run(name: str, with_tracker: bool, max_steps: int | None = None) -> dict:
    spec = recipe(name)
    L.seed_everything(spec["config"].get("seed_everything", 0), verbose=False)
    data = build(spec["config"]["data"], datamodules)
    model_spec = spec["config"]["model"]
    model_spec = {**model_spec, "init_args": {**model_spec.get("init_args", {}), "shape": data.shape}}
    model = build(model_spec, zoo)  # the data's shape linked into the model, as the CLI does
    limits = spec["limits"] if max_steps is None else {"max_steps": max_steps, "max_epochs": -1}
    timer = Timer()
    tracker = TimedTracker(**spec["tracker_args"]) if with_tracker else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer] + ([tracker] if tracker else []),
        default_root_dir=os.environ.get("TMPDIR", "/tmp") + "/genzoo_eigen_overhead",
        **limits,
    )
    trainer.fit(model, data)
    return {
        "seconds": timer.elapsed,
        "steps": trainer.global_step,
        "probes": [h["step"] for h in tracker.history] if tracker else [],
        "probe_seconds": tracker.probe_times if tracker else [],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs (without, with) per recipe")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (
        "does not have many workers",
        "smaller than the logging interval",
        "val_dataloader",
        "LeafSpec",
    ):
        warnings.filterwarnings("ignore", f".*{message}.*")
    default = inspect.signature(EigenvalueTracker).parameters["every_n_steps"].default
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, 1 thread, {os.cpu_count()} CPUs, "
        f"{args.clock} clock"
    )
    print(f"EigenvalueTracker default every_n_steps = {default}; callbacks: {callbacks.__all__}")
    results = {}
    for name in args.recipes:
        spec = recipe(name)
        print(f"\n{name}: tracker {spec['tracker_args'] or '(defaults)'}, trainer {spec['limits']}")
        run(name, True, max_steps=5)  # warm-up, not recorded: imports, matplotlib, allocator, first calls
        rows = {False: [], True: []}
        for r in range(args.repeats):
            for with_tracker in (False, True) if r % 2 == 0 else (True, False):
                rows[with_tracker].append(run(name, with_tracker))
        ratios = [w["seconds"] / wo["seconds"] for w, wo in zip(rows[True], rows[False], strict=True)]
        probe = [t for row in rows[True] for t in row["probe_seconds"]]
        steps = rows[False][0]["steps"]
        without = statistics.median(r["seconds"] for r in rows[False])
        pairs = zip(rows[True], rows[False], strict=True)
        own = statistics.median(sum(w["probe_seconds"]) / wo["seconds"] for w, wo in pairs)
        results[name] = {
            "steps": steps,
            "probe_steps": rows[True][0]["probes"],
            "without_s": [r["seconds"] for r in rows[False]],
            "with_s": [r["seconds"] for r in rows[True]],
            "ratios": ratios,
            "probe_s": probe,
            "probe_share": own,
        }
        print(f"  {steps} steps, probes at steps {rows[True][0]['probes']}")
        print(f"  without tracker: median {without:.2f} s ({1e3 * without / steps:.2f} ms/step)")
        print(f"  with tracker:    median {statistics.median(r['seconds'] for r in rows[True]):.2f} s")
        print(
            f"  tracker's own time per probe: median {statistics.median(probe):.3f} s "
            f"(max {max(probe):.3f}); all probes of a run / the run without: {100 * own:.1f}%"
        )
        best = min(r["seconds"] for r in rows[True]) / min(r["seconds"] for r in rows[False])
        results[name]["best_ratio"] = best
        print(f"  ratio of the fastest runs (load only adds time): {best:.3f}")
        verdict = "within" if statistics.median(ratios) <= 1.05 else "OVER"
        print(
            f"  ratio with/without: median {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}] over {args.repeats} repeats: {verdict} the 5% target"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
