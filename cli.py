"""genzoo's one entry point: ``genzoo fit -c configs/vae_digits.yaml`` (or ``python cli.py ...``).

* Model and data by class name: ``--model VAE --data Digits``; any importable class through
  ``class_path`` (``--model my_package.MyModel``).
* The datamodule's ``shape`` is linked into the model, so nobody types it twice; so are its ``levels`` (256
  for 8-bit images, 2 for binary data, None for continuous data) into the families that take them (the
  likelihood families, which dequantise and report bits/dim on discrete data: :mod:`zoo.pixels`).
* Logging goes to Weights & Biases by default, offline unless ``WANDB_API_KEY`` or ``WANDB_MODE`` says
  otherwise, under ``runs/``; ``--trainer.logger`` overrides it (CSVLogger, TensorBoardLogger, or false).
* The resolved config is saved into every run's own folder (and, for W&B, uploaded with it).
* A short summary is printed when ``fit`` ends; on SIGTERM the run saves ``last.ckpt`` and exits with 143.
* ``genzoo predict`` writes ``--samples.n`` samples of any ``Samplable`` family to ``--samples.out`` (.pt,
  .npz, .png); ``genzoo test`` runs ``test_step`` on the data's test split. A ``--ckpt_path`` that cannot be
  used fails naming the file and the likely cause (callbacks/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings

import lightning as L
from lightning.pytorch.cli import (  # the model's instantiator, extended
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
    _get_module_type,
    _InstantiatorFn,
)
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer import Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

import datamodules  # registers the datamodules' class names
import zoo  # registers the models' class names
from callbacks.checkpoint import CheckpointError, check_class, check_weights, is_local_path, read_checkpoint
from callbacks.predict import SampleWriter, install_sample_predict_step
from callbacks.preemption import PreemptionCheckpoint
from callbacks.run import run_dir
from callbacks.summary import RunSummary
from zoo.strategies import check_strategy

RUNS_DIR = "runs"


def wandb_offline() -> bool:
    """Offline unless the user gave credentials or chose a mode themselves."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own folder (rank 0 only), so relaunching
    never collides with an earlier run (RELIABILITY.md #18), and hands it to W&B as the run config."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: L.LightningModule, stage: str) -> None:
        path = run_dir(trainer) / self.config_filename
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        if isinstance(trainer.logger, WandbLogger):
            trainer.logger.experiment.config.update({"cli": self.config.as_dict()}, allow_val_change=True)


def available(package, base: type) -> list[str]:
    """Public classes of ``package`` that are concrete subclasses of ``base``: the names the CLI takes."""
    names = []
    for name in getattr(package, "__all__", ()):
        obj = getattr(package, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ != "datamodules.base":
            names.append(name)
    return sorted(names)


class GenZooParser(LightningArgumentParser):
    """Adds the names that would have worked to errors about ``--model`` and ``--data``."""

    def error(self, message: str, ex: Exception | None = None):
        hints = {
            '"model"': ("models", available(zoo, L.LightningModule)),
            '"data"': ("data", available(datamodules, L.LightningDataModule)),
        }
        for key, (what, names) in hints.items():
            if f"Parser key {key}" in message and "import path" in message:
                message += (
                    f"\nAvailable {what}: {', '.join(names)} "
                    "(or any importable class as package.module.ClassName)"
                )
        return super().error(message, ex)


class GenZooCLI(LightningCLI):
    """LightningCLI with genzoo's defaults: registered families and data by name, shape linked, W&B."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("parser_class", GenZooParser)
        trainer_defaults = {"logger": default_logger(), "default_root_dir": RUNS_DIR, "log_every_n_steps": 10}
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters into the model config here; read the file
        first, so a bad one fails with a :class:`CheckpointError` naming it and the likely cause."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not is_local_path(ckpt_path):
            return super()._parse_ckpt_path()
        self._checkpoint = read_checkpoint(ckpt_path)
        model = getattr(self.config[subcommand].get("model"), "class_path", None)
        if model is not None:
            check_class(ckpt_path, self._checkpoint, model)
        try:
            super()._parse_ckpt_path()
        except SystemExit:  # the saved hyperparameters are not arguments of the configured model
            saved = sorted(k for k in self._checkpoint.get("hyper_parameters", {}) if not k.startswith("_"))
            raise CheckpointError(
                f"checkpoint {ckpt_path} holds hyperparameters {saved} that {model} does not take: it was "
                "saved from another family (or another version of this one). Use the --model (and config) "
                "of the run that saved it"
            ) from None

    def _add_instantiators(self) -> None:
        """LightningCLI's instantiators, the model's replaced by :class:`LinkedHyperparameters`."""
        super()._add_instantiators()
        model_type = _get_module_type(self._model_class)
        self.parser.add_instantiator(
            LinkedHyperparameters(cli=self, key="model"), model_type, subclasses=self.subclass_mode_model
        )

    def _run_subcommand(self, subcommand: str) -> None:
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        # Weights that do not fit: a CheckpointError, not torch's message. A model that builds layers in
        # configure_model has not got them yet; Lightning's strict load checks those.
        if is_local_path(ckpt_path) and not is_overridden("configure_model", self.model, L.LightningModule):
            checkpoint = getattr(self, "_checkpoint", None) or read_checkpoint(ckpt_path)
            check_weights(ckpt_path, checkpoint, self.model)
        if subcommand == "fit":  # e.g. manual optimisation under FSDP: refuse before anything runs
            check_strategy(self.model, self.trainer.strategy)
        with wandb_dir_of(self.trainer.logger):
            super()._run_subcommand(subcommand)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.shape", "model.init_args.shape", apply_on="instantiate")
        # Only into families that have a ``levels`` argument (jsonargparse skips the others).
        parser.link_arguments(
            "data", "model.init_args.levels", compute_fn=data_levels, apply_on="instantiate"
        )
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # --samples.n, --samples.out, --samples.seed, --samples.batch_size
            parser.add_lightning_class_args(SampleWriter, "samples")
        return parser

    def predict(self, model: L.LightningModule, datamodule=None, **kwargs):
        """``genzoo predict``: ``n`` samples from ``model.sample`` written by :class:`SampleWriter` (the
        configured data only supplies the shape). Families need only ``sample(n, generator=None)``."""
        writer = self._get(self.config_init, "samples")
        if not kwargs.get("ckpt_path"):
            rank_zero_warn("genzoo predict without --ckpt_path samples the untrained model")
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer has them; do not hold them twice
        model = install_sample_predict_step(model)
        return self.trainer.predict(model, datamodule=writer.requests(), **kwargs)


class LinkedHyperparameters(_InstantiatorFn):
    """LightningCLI's model instantiator, which saves the hyperparameters with every applied link's value; the
    ``levels`` link (applied by jsonargparse to every family, also one without that argument) is left out of a
    family that has no ``levels`` argument, so its checkpoint reloads (``--ckpt_path``,
    ``load_from_checkpoint``)."""

    def __call__(self, class_type: type, *args, applied_instantiation_links: dict, **kwargs):
        links = applied_instantiation_links
        if "levels" not in inspect.signature(class_type).parameters:
            links = {key: value for key, value in links.items() if not key.endswith(".levels")}
        return super().__call__(class_type, *args, applied_instantiation_links=links, **kwargs)


def data_levels(data: L.LightningDataModule) -> int | None:
    """The datamodule's ``levels`` (how many discrete values its data take), None when it does not say."""
    return getattr(data, "levels", None)


def default_logger() -> dict:
    """The default ``--trainer.logger``: offline W&B under ``runs/``. A config, not a lazy instance: a lazily
    built logger's generated class cannot be pickled into the processes ``ddp_spawn`` starts."""
    return {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "genzoo", "save_dir": RUNS_DIR, "offline": wandb_offline()},
    }


@contextlib.contextmanager
def wandb_dir_of(logger):
    """Sets ``WANDB_DIR`` to a W&B logger's ``save_dir`` for the duration (unless the user set it), restoring
    it after. Processes that attach to the run (``ddp_spawn``'s workers) place W&B's media under
    ``WANDB_DIR`` or their working directory, not under the run's ``save_dir``; this points them at it."""
    if not isinstance(logger, WandbLogger) or not logger.save_dir or "WANDB_DIR" in os.environ:
        yield
        return
    os.environ["WANDB_DIR"] = os.path.abspath(logger.save_dir)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DIR", None)


def run(args: list[str] | None = None) -> GenZooCLI:
    """Parse ``args`` (default: ``sys.argv[1:]``), run the subcommand and return the CLI object."""
    # Lightning 2.6 + torch 2.13 warn about their own internals on every run; users can't act on it.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    os.makedirs(RUNS_DIR, exist_ok=True)
    return GenZooCLI(args=args)


def main() -> None:
    """The ``genzoo`` console script (returns nothing, so the process exits with status 0; an unusable
    ``--ckpt_path`` exits with status 2 and one line saying why)."""
    try:
        run()
    except CheckpointError as e:
        print(f"genzoo: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
