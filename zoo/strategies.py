"""Which Lightning strategies a family can train under, checked before the first step.

Lightning's ``FSDPStrategy`` (FSDP1, ``--trainer.strategy fsdp``) runs ``training_step`` inside the root
FSDP module's forward. A family that trains by manual optimisation calls ``manual_backward`` there, so the
backward runs while FSDP is still in its forward state and the first step fails deep inside PyTorch with
``AssertionError: Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD``
(Lightning issues #19626 and #19685, open: "manual optimization with FSDP is currently not possible"). The
R1 / R2 penalties' double backward (``autograd.grad(create_graph=True)`` inside the step) is one more such
pass. DDP has no such limit: Lightning disables DDP's reducer hook around ``manual_backward``.

So every manual-optimisation family (GAN, FGAN, DiracGAN, ...) refuses FSDP at ``setup``, before anything is
sharded, and names the strategies that work: ``fsdp2`` (:mod:`zoo.sharding`, PyTorch's FSDP2 through
Lightning's ``ModelParallelStrategy``, which calls ``training_step`` directly, so ``manual_backward`` and
the penalties' double backward run as under DDP) and ``ddp``. Families with automatic optimisation (VAE,
...) train under FSDP. See docs/cli.md, "Sharded training".

:class:`SpawnedDDPStrategy` is Lightning's ``ddp_spawn`` that destroys the spawned workers' process group at
teardown (registered under the ``ddp_spawn`` names on import), so a finished CPU run never aborts at exit.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from zoo.sharding import FSDP2  # importing it registers the "fsdp2" strategy


class UnsupportedStrategyError(ValueError):
    """A family cannot train under the chosen strategy; the message names the one to use."""


def check_strategy(module: LightningModule, strategy: object) -> None:
    """Raise :class:`UnsupportedStrategyError` if ``module`` trains by manual optimisation and ``strategy``
    is Lightning's ``FSDPStrategy`` (which cannot run a backward inside ``training_step``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if module.automatic_optimization or not isinstance(strategy, FSDPStrategy):
        return
    name = type(module).__name__
    penalties = [
        f"{key}={value:g}"
        for key in ("r1_gamma", "r2_gamma", "gamma")
        if isinstance(value := getattr(module, key, None), (int, float)) and value > 0
    ]
    double = f", and its {' / '.join(penalties)} penalty adds a double backward" if penalties else ""
    raise UnsupportedStrategyError(
        f"{name} trains by manual optimisation (manual_backward inside training_step{double}), which "
        "Lightning's FSDP strategy does not support: the first step would fail with FSDP's 'Expects "
        "BACKWARD_PRE or BACKWARD_POST state' AssertionError (Lightning issue #19685). To shard it, use "
        f'--trainer.strategy {FSDP2} (Trainer(strategy="{FSDP2}"): PyTorch\'s FSDP2, each network sharded); '
        "--trainer.strategy ddp (or ddp_spawn) gives the same numbers with every parameter replicated"
    )


class SpawnedDDPStrategy(DDPStrategy):
    """Lightning's DDP with ``start_method="spawn"`` (``ddp_spawn``), plus: a spawned worker destroys its
    process group at teardown.

    Lightning's spawn launcher leaves the workers' gloo group alive when ``fit`` returns, so it is destroyed
    by the interpreter's exit, and on the CPU that aborted a worker now and then after a finished fit
    ("terminate called without an active exception", SIGABRT: 2 of 5 runs of tests/test_spawn.py). What the
    worker does after teardown (rank 0 saves the weights the launcher hands back) needs no collective.
    Registered under Lightning's ``ddp_spawn`` names when ``zoo`` is imported
    (:func:`register_spawn_teardown`), so ``--trainer.strategy ddp_spawn`` and
    ``Trainer(strategy="ddp_spawn")`` get it; a ``DDPStrategy`` built by hand does not.
    """

    def teardown(self) -> None:
        super().teardown()
        spawned = self._start_method == "spawn"  # the caller's process never joins the group: a no-op there
        if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def register_spawn_teardown() -> None:
    """Point every registered ``ddp_spawn*`` name (Lightning's DDP with the spawn start method) at
    :class:`SpawnedDDPStrategy`, with the same arguments."""
    for name, entry in list(StrategyRegistry.items()):
        params = dict(entry["init_params"])
        if entry["strategy"] is DDPStrategy and params.get("start_method") == "spawn":
            StrategyRegistry.register(
                name, SpawnedDDPStrategy, description=entry["description"], override=True, **params
            )


register_spawn_teardown()
