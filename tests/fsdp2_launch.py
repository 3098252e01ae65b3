"""One 2-process gloo job that trains every family a few steps under each strategy it is given and saves
the weights: the launcher behind tests/test_fsdp2.py (``python tests/fsdp2_launch.py ddp,fsdp2 OUT [RUN]``).

Lightning's launcher re-runs this script in the second process, so both processes go through the same fits
in the same order. Rank 0 writes ``OUT/<strategy>/<run>.pt``: the full weights after the fit (gathered from
the shards under ``fsdp2``), the logged values, the names of the sharded parameters and the step count; the
``resume`` runs go through ``genzoo fit`` (cli.run) and leave their checkpoints in ``OUT/<strategy>/resume``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from test_precision import CASES
from torch.distributed.tensor import DTensor

from callbacks import DivergenceEstimator, EigenvalueTracker, ELBOGapMonitor, SampleGrid
from datamodules import Toy2D
from zoo import GAN

STEPS = 4
BY_ID = {case.id: case for case in CASES}


def toy(batch_size: int = 32) -> Toy2D:
    return Toy2D("8gaussians", n_train=128, n_val=33, n_test=0, batch_size=batch_size)


@dataclass
class Run:
    """A model, its data and the callbacks of one fit (``limit_val_batches``: None runs all of them)."""

    model: Callable[[], L.LightningModule]
    data: Callable[[], L.LightningDataModule]
    callbacks: Callable[[], list] = field(default=lambda: [])
    steps: int = STEPS
    trainer: dict = field(default_factory=dict)


def case(case_id: str, **kwargs) -> Run:
    return Run(BY_ID[case_id].model, BY_ID[case_id].data, **kwargs)


RUNS: dict[str, Run] = {
    # the adversarial hard cases: R1 and R2 (double backward through a sharded discriminator), n_critic,
    # EMA (Lightning's EMAWeightAveraging on sharded parameters), user networks
    "gan_r1": Run(lambda: GAN(shape=(2,), hidden=(16, 16), r1_gamma=1.0), toy),
    "gan_r2_ncritic": Run(lambda: GAN(shape=(2,), hidden=(16, 16), r2_gamma=0.5, n_critic=2), toy, steps=6),
    "gan_ema": Run(
        lambda: GAN(shape=(2,), hidden=(16, 16), r1_gamma=1.0), toy, lambda: [EMAWeightAveraging(decay=0.9)]
    ),
    "gan_user_networks_r1": case("gan_user_networks_r1"),
    # the eigenvalue tracker's Jacobian-vector products (a game) and Hessian-vector products (a VAE)
    "gan_eigen": Run(
        lambda: GAN(shape=(2,), hidden=(8,), r1_gamma=1.0),
        toy,
        lambda: [EigenvalueTracker(every_n_steps=2, k=2)],
    ),
    "fgan_kl_dv_r1": case("fgan_kl_dv_r1"),
    "dirac_gan_r1": case("dirac_gan_r1"),
    # every other family, and the diagnostics that differentiate through it
    "vae_full": case("vae_full", callbacks=lambda: [SampleGrid(every_n_epochs=1, n=4)]),
    "vae_elbo_gap_refined": case(
        "vae_diag",
        callbacks=lambda: [
            ELBOGapMonitor(every_n_steps=STEPS, n_examples=24, k=8, batch_size=8, refine_steps=3, plot=False)
        ],
    ),
    "vae_user_networks": case("vae_user_networks"),
    "gan_divergence": Run(
        lambda: GAN(shape=(2,), hidden=(8,)),
        toy,
        lambda: [DivergenceEstimator(every_n_steps=STEPS, n_examples=24, batch_size=8, refit_steps=20)],
    ),
    "vae_hessian": case("vae_score", callbacks=lambda: [EigenvalueTracker(every_n_steps=2, k=2)]),
    "discrete_vae_gumbel_k3": case("discrete_vae_gumbel_k3"),
    "diffusion_mlp_hybrid": case("diffusion_mlp_hybrid"),
    "made_2_orderings": case("made_2_orderings"),
    "pixelcnn": case("pixelcnn"),
    "flow_maf": case("flow_maf"),
    "flow_planar_reverse": case("flow_planar_reverse"),
    "nce_mlp": case("nce_mlp"),
    "nce_clipped": case("nce_mlp", trainer={"gradient_clip_val": 0.05}),  # a sharded net and a replicated c
    "gan_clipped": Run(lambda: GAN(shape=(2,), hidden=(16, 16), r1_gamma=1.0, clip_norm=0.05), toy),
    "explicit_gaussian_natural": case("explicit_gaussian_natural"),
    "set2model": case("set2model"),
}


class SaveFullWeights(L.Callback):
    """At the end of training every process takes part in gathering the full weights; rank 0 saves them,
    with the EMA's averaged weights when an ``EMAWeightAveraging`` is there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        if trainer.global_rank == 0:
            torch.save({
                "state": {k: v.detach().cpu().clone() for k, v in state.items()},
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                "sharded": sorted(n for n, p in pl_module.named_parameters() if isinstance(p, DTensor)),
                "steps": trainer.global_step,
            }, self.path)  # fmt: skip


def fit(run: Run, strategy: str, path: Path, ckpt_path: str | None = None, **trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = run.model()
    trainer_kwargs = {"max_steps": run.steps, **run.trainer, **trainer_kwargs}
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy,
        limit_val_batches=2, num_sanity_val_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=path.parent,
        callbacks=[*run.callbacks(), SaveFullWeights(path), *trainer_kwargs.pop("callbacks", [])],
        **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, run.data(), ckpt_path=ckpt_path)


def resume(strategy: str, out: Path) -> None:
    """``genzoo fit --trainer.strategy <strategy> --trainer.devices 2``: the GAN with R1 and an EMA of its
    weights (``EMAWeightAveraging``, whose average and current weights the checkpoint holds), one batch (two
    optimizer steps) per epoch, 2 epochs in one go (a checkpoint at each epoch's end), then the second epoch
    again, resumed from the first one's checkpoint."""
    from cli import run

    folder = out / "resume"
    common = [
        "--model=GAN", "--model.hidden=[16,16]", "--model.r1_gamma=1.0",
        "--data=Toy2D", "--data.n_train=32", "--data.n_val=33", "--data.n_test=0", "--data.batch_size=32",
        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={strategy}",
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={folder}", "--trainer.callbacks+=EMAWeightAveraging",
        "--trainer.callbacks.decay=0.9", "--trainer.callbacks+=fsdp2_launch.SaveFullWeights",
    ]  # fmt: skip
    every_epoch = ["--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={folder}",
                   "--trainer.callbacks.every_n_epochs=1", "--trainer.callbacks.save_top_k=-1",
                   "--trainer.callbacks.filename={epoch}"]  # fmt: skip
    torch.manual_seed(0)
    run(["fit", *common, f"--trainer.callbacks.path={out / 'resume_straight.pt'}", *every_epoch])
    torch.manual_seed(0)
    run(["fit", *common, f"--trainer.callbacks.path={out / 'resume_resumed.pt'}",
         f"--ckpt_path={folder / 'epoch=0.ckpt'}"])  # fmt: skip


def main(strategies: list[str], out: Path, names: list[str]) -> None:
    """Every run (or those ``names``) under each of ``strategies`` in turn, into ``out/<strategy>/``; the
    ``resume`` runs last. A run that fails the same way on every process (e.g. a CLI argument refused) is
    reported on stderr and the job goes on, so it fails only its own tests."""
    torch.set_num_threads(1)
    names = names or [*RUNS, "resume"]
    for strategy in strategies:
        (out / strategy).mkdir(parents=True, exist_ok=True)
        for name in names:
            if name != "resume":
                fit(RUNS[name], strategy, out / strategy / f"{name}.pt")
    for strategy in strategies if "resume" in names else []:
        try:
            resume(strategy, out / strategy)
        except (Exception, SystemExit):
            traceback.print_exc()


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1].split(","), Path(sys.argv[2]), sys.argv[3:])
