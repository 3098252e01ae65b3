"""Which strategy each family trains under: manual-optimisation families refuse Lightning's FSDP at once,
naming ``fsdp2`` and ``ddp``, instead of failing inside PyTorch on the first step (zoo/strategies.py,
docs/cli.md); ``fsdp2`` is a registered strategy and what it shards of each family (zoo/sharding.py; the
2-process runs are in tests/test_fsdp2.py)."""

from __future__ import annotations

import lightning as L
import pytest
import zuko
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from zoo import FGAN, GAN, VAE, DiracGAN, Flow
from zoo.sharding import FSDP2Strategy, double_backward_units, sharded_units
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
def test_manual_optimisation_families_refuse_fsdp_naming_fsdp2_and_ddp(make, penalty: str) -> None:
    model = make()
    with pytest.raises(UnsupportedStrategyError, match=r"--trainer\.strategy ddp") as info:
        check_strategy(model, FSDPStrategy())
    assert penalty in str(info.value) and type(model).__name__ in str(info.value)
    assert "--trainer.strategy fsdp2" in str(info.value)
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


def test_fsdp2_is_a_registered_strategy_name_for_python_and_the_cli(tmp_path, monkeypatch) -> None:
    from cli import GenZooCLI

    strategy = L.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False).strategy
    assert type(strategy) is FSDP2Strategy and strategy._tensor_parallel_size == 1
    check_strategy(GAN(shape=(2,), hidden=(8,), r1_gamma=1.0), strategy)  # manual optimisation is fine here
    monkeypatch.chdir(tmp_path)
    cli = GenZooCLI(args=["--model=GAN", "--data=Toy2D", "--trainer.strategy=fsdp2", "--trainer.logger=false",
                          "--trainer.accelerator=cpu", "--trainer.devices=2"], run=False)  # fmt: skip
    assert type(cli.trainer.strategy) is FSDP2Strategy


def test_what_fsdp2_shards_of_each_family() -> None:
    """One unit per network (each player of a game separately, user networks too), zuko's lazy flows by
    their hyper-networks, and the R1 / R2 opponent kept gathered through its double backward."""
    vae = VAE(shape=(1, 8, 8), hidden=(8,))
    assert sharded_units(vae) == [vae.encoder, vae.decoder, vae.posterior_head]
    gan = GAN(shape=(2,), hidden=(8,), r1_gamma=1.0)
    assert sharded_units(gan) == [gan.generator, gan.discriminator]
    assert double_backward_units(gan) == [gan.discriminator]
    r2 = GAN(shape=(2,), hidden=(8,), r2_gamma=1.0)
    assert double_backward_units(r2) == [r2.discriminator]
    assert double_backward_units(GAN(shape=(2,), hidden=(8,))) == []
    fgan = FGAN(shape=(2,), hidden=(8,), divergence="kl_dv")
    assert sharded_units(fgan) == [fgan.generator, fgan.critic]
    maf = Flow(shape=(2,), transform="maf", n_layers=2, hidden=(8,))
    assert sharded_units(maf) == [layer.hyper for layer in maf.layers]
    nsf = Flow(shape=(2,), flow=zuko.flows.NSF(2, transforms=2, hidden_features=(8,)))
    hypers = [t.hyper for t in nsf.flow.transform.transforms]
    assert sharded_units(nsf) == hypers and all(isinstance(h, nn.Sequential) for h in hypers)
    assert sharded_units(DiracGAN()) == []  # three scalars: replicated, gradients averaged as under DDP
