"""Per-device memory of training state under DDP and FSDP2 (``--trainer.strategy fsdp2``), on paper.

For every recipe in ``configs/`` whose model is built from its arguments alone, the model is instantiated
(on the CPU, nothing trained) and its parameters counted: P in total, and U, the largest FSDP2 unit
(``zoo.sharding.sharded_units``: one network, e.g. one GAN player). With float32 (4 bytes) and Adam (2
states per parameter), per device:

* DDP, any number of devices N: parameters + gradients + Adam's two states, all replicated = 16 P bytes;
* FSDP2 on N devices: the same state sharded, 16 P / N bytes, plus, while a unit runs, its gathered
  parameters and its full gradient before the reduce-scatter, 8 U bytes (N > 1; one unit at a time; a
  prefetching or R1-kept second unit adds up to 8 U more).

Not counted: activations (they depend on the batch and usually dominate for image models), the all-gather
and reduce-scatter buffers, an ``EMAWeightAveraging`` copy (+4 P under DDP, +4 P / N under FSDP2), the
CUDA context and the allocator's fragmentation. Run: ``python benchmarks/memory_table.py`` (prints a
Markdown table, docs/cli.md holds its output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

import zoo
from zoo.sharding import sharded_units

ROOT = Path(__file__).resolve().parents[1]
DEVICES = (1, 8, 64)
BYTES = 4  # float32
STATE_COPIES = 4  # parameters, gradients, Adam's exp_avg and exp_avg_sq
GATHERED_COPIES = 2  # a unit's gathered parameters and its full gradient

# the shape each datamodule links into the model (read without loading any data)
SHAPES = {
    "Toy2D": lambda a: (2,),
    "Digits": lambda a: (1, 8, 8),
    "MNIST": lambda a: (1, 28, 28),
    "CIFAR10": lambda a: (3, 32, 32),
    "ImageFolder": lambda a: (a.get("channels", 3), a.get("size", 64), a.get("size", 64)),
}


def recipe_model(path: Path) -> torch.nn.Module | None:
    """The recipe's model, or None when its data has no known shape or a network is given by class path."""
    config = yaml.safe_load(path.read_text())
    model, data = config.get("model", {}), config.get("data", {})
    name, args = model.get("class_path", ""), dict(model.get("init_args") or {})
    family = getattr(zoo, name.rsplit(".", 1)[-1], None)
    data_name = str(data.get("class_path", "")).rsplit(".", 1)[-1]
    if family is None or any(isinstance(v, dict) for v in args.values()):
        return None
    if "shape" in family.__init__.__code__.co_varnames:
        shape = SHAPES.get(data_name)
        if shape is None:
            return None
        args["shape"] = shape(data.get("init_args") or {})
    torch.manual_seed(0)
    return family(**args)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def memory(parameters: int, largest_unit: int, devices: int, sharded: bool) -> int:
    """Bytes per device (the formulas of the module docstring)."""
    if not sharded:
        return STATE_COPIES * BYTES * parameters
    gathered = GATHERED_COPIES * BYTES * largest_unit if devices > 1 else 0
    return STATE_COPIES * BYTES * parameters // devices + gathered


def rows(configs: Path) -> list[dict]:
    table = []
    for path in sorted(configs.glob("*.yaml")):
        model = recipe_model(path)
        if model is None:
            continue
        total, units = count(model), [count(u) for u in sharded_units(model)]
        largest = max(units, default=0)
        row = {
            "recipe": path.stem,
            "family": type(model).__name__,
            "parameters": total,
            "largest_unit": largest,
        }
        row["ddp"] = memory(total, largest, 1, sharded=False)
        for n in DEVICES:
            row[f"fsdp2_{n}"] = memory(total, largest, n, sharded=True)
        table.append(row)
    return sorted(table, key=lambda r: -r["parameters"])


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}" if n >= 2**20 / 100 else f"{n / 2**10:.1f} KiB"


def markdown(table: list[dict]) -> str:
    header = ["recipe", "family", "parameters", "largest unit", "DDP (any N)"]
    header += [f"FSDP2 N={n}" for n in DEVICES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cells = [r["recipe"], r["family"], f"{r['parameters']:,}", f"{r['largest_unit']:,}", mib(r["ddp"])]
        cells += [mib(r[f"fsdp2_{n}"]) for n in DEVICES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, default=ROOT / "configs", help="folder of recipes")
    args = parser.parse_args()
    print("Per-device MiB of float32 parameters + gradients + Adam states (activations not counted):\n")
    print(markdown(rows(args.configs)))


if __name__ == "__main__":
    main()
