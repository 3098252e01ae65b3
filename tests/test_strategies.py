"""Which strategy each family trains under: manual-optimisation families refuse Lightning's FSDP at once,
naming ``ddp``, instead of failing inside PyTorch on the first step (zoo/strategies.py, docs/cli.md)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from zoo import FGAN, GAN, VAE, DiracGAN
from zoo.strategies import UnsupportedStrategyError, check_strategy


@pytest.mark.parametrize(
    "make,penalty",
    [
        (lambda: GAN(shape=(2,), hidden=(8,), r1_gamma=1.0), "r1_gamma=1 penalty adds a double backward"),
        (lambda: GAN(shape=(2,), hidden=(8,), r2_gamma=0.5), "r2_gamma=0.5 penalty"),
        (lambda: GAN(shape=(2,), hidden=(8,)), "manual_backward inside training_step)"),
        (lambda: FGAN(shape=(2,), hidden=(8,), divergence="kl_dv"), "manual optimisation"),
        (lambda: DiracGAN(gamma=0.3), "gamma=0.3 penalty"),
    ],
    ids=["gan_r1", "gan_r2", "gan", "fgan", "dirac_gan"],
)
def test_manual_optimisation_families_refuse_fsdp_naming_ddp(make, penalty: str) -> None:
    model = make()
    with pytest.raises(UnsupportedStrategyError, match=r"--trainer\.strategy ddp") as info:
        check_strategy(model, FSDPStrategy())
    assert penalty in str(info.value) and type(model).__name__ in str(info.value)
    check_strategy(model, DDPStrategy())  # DDP is fine


def test_automatic_optimisation_families_may_use_fsdp() -> None:
    check_strategy(VAE(shape=(1, 8, 8), hidden=(8,)), FSDPStrategy())


def test_the_family_itself_refuses_at_setup() -> None:
    """Without the CLI too: ``setup`` (before FSDP wraps anything) checks the trainer's strategy."""

    class Trainer:  # the one attribute setup reads besides the datamodule
        strategy = FSDPStrategy()
        datamodule = None

    for model in (GAN(shape=(2,), hidden=(8,), r1_gamma=1.0), DiracGAN()):
        model._trainer = Trainer()
        with pytest.raises(UnsupportedStrategyError):
            model.setup("fit")
