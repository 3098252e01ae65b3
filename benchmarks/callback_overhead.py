"""How much training time do the diagnostic callbacks add to the recipes in configs/?

Each case trains one recipe twice per round, with and without a diagnostic callback, everything else equal
(the recipe's own callbacks, validation and checkpoints included; no logger, so pictures go to files only;
one unrecorded 1-epoch warm-up run with the callback first, so one-off imports such as matplotlib's are not
billed to a short run):

* ``elbo_gap``:            configs/vae_digits.yaml + ``ELBOGapMonitor()`` at its defaults;
* ``elbo_gap_showcase``:   configs/vae_digits.yaml + the monitor as configs/vae_digits_elbo_gap.yaml sets it
                           (with the per-point refinement);
* ``divergence``:          configs/gan_8gaussians.yaml + ``DivergenceEstimator()`` at its defaults.

The time is that of ``Trainer.fit`` from ``on_train_start`` to ``on_train_end`` (wall clock and this process's
CPU time), over a whole number of the callback's periods, so the ratio is the run-average overhead. Rounds are
interleaved (with/without, then without/with, ...) so a slow phase of a shared machine hits both; the output
is the median over rounds of the within-round ratio, with its min-max. Nothing here asserts on time.

    .venv/bin/python benchmarks/callback_overhead.py [--cases elbo_gap divergence] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import GenZooCLI  # noqa: E402


def showcase_flags() -> list[str]:
    """The ELBOGapMonitor arguments of configs/vae_digits_elbo_gap.yaml as command-line flags."""
    config = yaml.safe_load((ROOT / "configs" / "vae_digits_elbo_gap.yaml").read_text())
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "ELBOGapMonitor"]
    return [f"--trainer.callbacks.{k}={v}" for k, v in entry.get("init_args", {}).items()]


# name: (recipe, epochs per run, flags that add the callback)
CASES = {
    "elbo_gap": ("vae_digits.yaml", 100, ["--trainer.callbacks+=ELBOGapMonitor"]),
    "elbo_gap_showcase": ("vae_digits.yaml", 200, ["--trainer.callbacks+=ELBOGapMonitor", *showcase_flags()]),
    "divergence": ("gan_8gaussians.yaml", 20, ["--trainer.callbacks+=DivergenceEstimator"]),
}


class FitTimer(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def fit_once(recipe: str, epochs: int, extra: list[str], folder: str) -> dict[str, float]:
    args = [
        "-c", str(ROOT / "configs" / recipe), f"--trainer.max_epochs={epochs}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={folder}", *extra,
    ]  # fmt: skip
    cli = GenZooCLI(args=args, run=False)
    timer = FitTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return {"wall": timer.wall, "cpu": timer.cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the quietest on a shared CPU)"
    )
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "lightning": L.__version__, "threads": options.threads,
        "repeats": options.repeats, "cases": {},
    }  # fmt: skip
    print(f"{report['date']}  {report['machine']}  torch {torch.__version__}  threads {options.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.cases:
            recipe, epochs, flags = CASES[name]
            runs = {"with": [], "without": []}
            fit_once(
                recipe, 1, flags, tempfile.mkdtemp(dir=tmp)
            )  # unrecorded warm-up: one-off imports, caches
            for r in range(options.repeats):
                order = ("with", "without") if r % 2 == 0 else ("without", "with")
                for variant in order:
                    folder = tempfile.mkdtemp(dir=tmp)
                    runs[variant].append(fit_once(recipe, epochs, flags if variant == "with" else [], folder))
            ratios = {
                clock: [w[clock] / wo[clock] for w, wo in zip(runs["with"], runs["without"], strict=True)]
                for clock in ("wall", "cpu")
            }
            report["cases"][name] = {
                "recipe": recipe,
                "epochs": epochs,
                "flags": flags,
                "runs": runs,
                "ratios": ratios,
            }
            print(f"\n{name}: configs/{recipe}, {epochs} epochs a run, {' '.join(flags)}")
            for clock in ("wall", "cpu"):
                with_s = statistics.median(run[clock] for run in runs["with"])
                without_s = statistics.median(run[clock] for run in runs["without"])
                values = ratios[clock]
                print(
                    f"  {clock:4s}  without {without_s:7.2f} s  with {with_s:7.2f} s  ratio "
                    f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"
                )
    if options.json:
        options.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
