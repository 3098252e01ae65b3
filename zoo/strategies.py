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
"""

from __future__ import annotations

from lightning.pytorch import LightningModule

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
