"""Set2Model vs the prototype baseline: retrieval mAP on held-out classes at an equal training budget.

Both models are ``configs/set2model_digits.yaml``'s recipe (MLP 256x256 -> 16, Adam 1e-3, the same
episodes: sets of 5 digits from 0-5 for training, 20 queries; evaluation on the held-out digits 6-9, 256
fixed val and 256 fixed test episodes from disjoint images), trained for the same number of epochs from
the same initial weights (``seed``):

* ``set2model``: ``n_components`` diagonal components fitted by ``em_steps`` EM steps, implicit gradients;
* ``set2model_k1``: one diagonal Gaussian (the mixture's contribution isolated from the learned scales);
* ``prototype``: one fixed unit isotropic Gaussian per set (prototypical networks, the baseline).

Reported per model: test mAP (ranked by log-likelihood), test mAP of the same embedding ranked by
distance to the set's mean (``map_mean``), val mAP, training wall-clock seconds (one process, one thread;
other work on the machine adds noise; nothing here asserts on time), and the share of training sets whose
responsibilities were hard (block-diagonal solve). Chance mAP with 5 members among 20 queries is ~0.3.

    .venv/bin/python benchmarks/set2model.py [--epochs 30] [--seeds 0 1 2] [--json out.json]
    .venv/bin/python benchmarks/set2model.py --config configs/set2model_mnist.yaml --epochs 10  # MNIST
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
import yaml

import zoo.set2model as s2m
from datamodules import Episodes
from zoo import Set2Model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "set2model_digits.yaml"
VARIANTS = {
    "set2model": {},
    "set2model_k1": {"n_components": 1},
    "prototype": {"n_components": 1, "covariance": "fixed"},
}


class HardShare:
    """Counts, during training, how many sets the backward pass solved block-diagonally (hard r)."""

    def __init__(self) -> None:
        self.hard = self.total = 0
        self.original = s2m.implicit_solve

    def __enter__(self):
        def counting(x, fit, rhs, frozen, mask, hard):
            self.hard += int(hard.sum())
            self.total += hard.numel()
            return self.original(x, fit, rhs, frozen, mask, hard)

        s2m.implicit_solve = counting
        return self

    def __exit__(self, *args) -> None:
        s2m.implicit_solve = self.original


def run(variant: str, epochs: int, seed: int, config_path: Path = CONFIG) -> dict:
    config = yaml.safe_load(config_path.read_text())
    model_args = {**config["model"]["init_args"], **VARIANTS[variant], "seed": seed}
    L.seed_everything(seed, verbose=False)
    data_args = config["data"]["init_args"]
    if data_args.get("root"):  # configs name data relative to the repository root
        data_args["root"] = str(ROOT / data_args["root"])
    data = Episodes(**data_args, seed=seed)
    model = Set2Model(shape=data.shape, **model_args)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, check_val_every_n_epoch=epochs,
    )  # fmt: skip
    with HardShare() as share:
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(model, data, verbose=False)[0]
    return {
        "variant": variant, "seed": seed, "epochs": epochs, "steps": trainer.global_step,
        "n_components": model_args["n_components"], "covariance": model_args["covariance"],
        "em_steps": model_args["em_steps"], "seconds": round(seconds, 1),
        "val_map": val["val/map"], "test_map": test["test/map"], "test_map_mean": test["test/map_mean"],
        "hard_share": share.hard / max(share.total, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--config", type=Path, default=CONFIG, help="e.g. configs/set2model_mnist.yaml")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(run(variant, args.epochs, seed, args.config))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread")
    print(f"{'model':<14}{'seed':>5}{'K':>3}{'cov':>9}{'test mAP':>10}{'mean-rank':>10}{'val mAP':>9}"
          f"{'hard':>6}{'s':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['variant']:<14}{r['seed']:>5}{r['n_components']:>3}{r['covariance']:>9}"
              f"{r['test_map']:>10.3f}{r['test_map_mean']:>10.3f}{r['val_map']:>9.3f}"
              f"{r['hard_share']:>6.2f}{r['seconds']:>7.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
