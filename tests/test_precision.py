"""Every family under ``bf16-mixed`` and ``16-mixed`` on the CPU: the loss at initialisation under autocast is
the float32 loss to half precision and is itself float32 (the reductions, log-sum-exps, triangular solves
and KL terms run in float32 inside autocast), and a few training steps through a ``Trainer`` keep every loss
and weight finite (``16-mixed`` with its GradScaler built explicitly: Lightning maps it to bf16 on the CPU).
tests/gpu/test_precision_gpu.py runs the same cases on a CUDA GPU.

A new family adds ONE line to :data:`CASES`: ``Case(id, model factory, data factory[, loss function])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

from datamodules import Digits, Dirac, Episodes, Toy2D
from datamodules.base import InMemoryDataset, TensorDataModule
from zoo import (
    FGAN,
    GAN,
    MADE,
    NCE,
    VAE,
    Diffusion,
    DiracGAN,
    DiscreteVAE,
    ExplicitGaussian,
    Flow,
    PixelCNN,
    Set2Model,
)
from zoo.noise import pinned_noise

# bf16 keeps 8 significant bits: unit roundoff u = 2^-8 (0.39%). The networks' outputs are rounded to bf16
# once per layer; everything after them (the loss's terms and their sum) is float32. A loss summed in bf16
# would be off by several ulps of its magnitude (>= u relative) and its dtype would be bfloat16.
BF16_RTOL = 2.0**-8


class RandomImages(TensorDataModule):
    """Binary 28x28 images (Bernoulli(0.3) pixels, seeded): MNIST-shaped data for the conv networks without
    the IDX files."""

    def __init__(self, n: int = 128, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.n, self.shape = n, (1, 28, 28)

    def build(self) -> list[InMemoryDataset]:
        g = torch.Generator().manual_seed(self.seed)
        images = torch.bernoulli(torch.full((self.n, *self.shape), 0.3), generator=g)
        return [InMemoryDataset(images), InMemoryDataset(images[:32]), InMemoryDataset(images[:0])]


def adversarial_loss(model, x: Tensor) -> Tensor:
    """The opponent's loss (penalties included) plus the generator's, with the first step's noise."""
    z = model._train_noise(x, 0, 0)
    return model.opponent_loss(x, z)[0] + model.generator_step_loss(x, z)[0]


def dirac_loss(model: DiracGAN, x: Tensor) -> Tensor:
    critic_loss, generator_loss, _ = model.losses(x, simultaneous=True)
    return critic_loss + generator_loss


def training_loss(model, x: Tensor) -> Tensor:
    with pinned_noise(model):  # the same draws in float32 and under autocast
        return model.training_loss(x)


@dataclass
class Case:
    """A family (``model()``), data it trains on (``data()``), and ``loss(model, batch)`` to compare."""

    id: str
    model: Callable[[], L.LightningModule]
    data: Callable[[], L.LightningDataModule]
    loss: Callable = field(default=training_loss)


def toy(**kwargs) -> Toy2D:
    return Toy2D("8gaussians", n_train=128, n_val=32, n_test=0, batch_size=32, **kwargs)


def digits() -> Digits:
    return Digits(batch_size=32, binarize="static")


class UserEncoder(nn.Module):
    """A user's own encoder and decoder (no genzoo layers) for 1x8x8 images: autocast casts them too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(512, 32))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class UserDecoder(nn.Module):
    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        layers = [nn.Linear(latent, 64), nn.SiLU(), nn.Linear(64, 64), nn.Unflatten(1, (1, 8, 8))]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


def user_gan() -> GAN:
    generator = nn.Sequential(UserDecoder(), nn.Sigmoid())
    discriminator = nn.Sequential(UserEncoder(), nn.SiLU(), nn.Linear(32, 1))
    return GAN(shape=(1, 8, 8), latent_dim=16, r1_gamma=1.0, generator=generator, discriminator=discriminator)


CASES: list[Case] = [
    Case("vae_user_networks", lambda: VAE((1, 8, 8), encoder=UserEncoder(), decoder=UserDecoder()), digits),
    Case("gan_user_networks_r1", lambda: user_gan(), digits, adversarial_loss),
    Case("flow_spline", lambda: Flow(shape=(2,), transform="spline", n_layers=2, hidden=(32,)), toy),
    Case("vae_diag", lambda: VAE(shape=(1, 8, 8), hidden=(64, 64)), digits),
    Case("vae_full", lambda: VAE(shape=(1, 8, 8), hidden=(64, 64), posterior="full", latent_dim=6), digits),
    Case("iwae_full_k5", lambda: VAE(shape=(1, 8, 8), hidden=(64,), posterior="full", k=5), digits),
    Case("vae_score", lambda: VAE(shape=(1, 8, 8), hidden=(64,), estimator="score", k=3), digits),
    Case(
        "vae_conv_full",
        lambda: VAE(shape=(1, 28, 28), decoder="conv", posterior="full", hidden=(32,), latent_dim=4),
        RandomImages,
    ),
    Case("vae_linear", lambda: VAE(shape=(2,), decoder="linear", likelihood="gaussian", latent_dim=2), toy),
    Case(
        "gan_mlp_r1_r2",
        lambda: GAN(shape=(2,), hidden=(32, 32), r1_gamma=1.0, r2_gamma=0.5),
        toy,
        adversarial_loss,
    ),
    Case(
        "gan_conv_r1",
        lambda: GAN(shape=(1, 28, 28), hidden=(32,), latent_dim=8, r1_gamma=1.0),
        RandomImages,
        adversarial_loss,
    ),
    Case("fgan_js", lambda: FGAN(shape=(2,), divergence="js", hidden=(32,)), toy, adversarial_loss),
    Case("fgan_kl_nwj", lambda: FGAN(shape=(2,), divergence="kl_nwj", hidden=(32,)), toy, adversarial_loss),
    Case(
        "fgan_kl_dv_r1",
        lambda: FGAN(shape=(2,), divergence="kl_dv", hidden=(32,), r1_gamma=1.0),
        toy,
        adversarial_loss,
    ),
    Case(
        "dirac_gan_r1",
        lambda: DiracGAN(gamma=1.0, psi0=0.3),
        lambda: Dirac(n_train=32, batch_size=8),
        dirac_loss,
    ),
    Case(
        "diffusion_mlp_hybrid",
        lambda: Diffusion(
            shape=(2,), timesteps=50, hidden=(32, 32), variance="learned", loss="hybrid", elbo_timesteps=5
        ),
        toy,
    ),
    Case(
        "diffusion_unet_vlb",
        lambda: Diffusion(shape=(1, 28, 28), timesteps=50, hidden=(8, 16, 16), loss="vlb", elbo_timesteps=2),
        RandomImages,
    ),
    Case("made_2_orderings", lambda: MADE(shape=(1, 8, 8), hidden=(64,), n_orderings=2), digits),
    Case("pixelcnn", lambda: PixelCNN(shape=(1, 8, 8), channels=16, n_layers=3, kernel_size=5), digits),
    Case("flow_coupling", lambda: Flow(shape=(2,), transform="coupling", n_layers=4, hidden=(32,)), toy),
    Case("flow_maf", lambda: Flow(shape=(2,), transform="maf", n_layers=4, hidden=(32,)), toy),
    Case(
        "flow_planar_reverse",
        lambda: Flow(shape=(2,), transform="planar", objective="reverse", target="U1"),
        toy,
    ),
    Case(
        "flow_radial_reverse",
        lambda: Flow(shape=(2,), transform="radial", objective="reverse", target="U2"),
        toy,
    ),
    Case(
        "discrete_vae_gumbel_k3",
        lambda: DiscreteVAE(shape=(1, 8, 8), n_latents=8, n_categories=4, hidden=(64,), k=3),
        digits,
    ),
    Case(
        "discrete_vae_score",
        lambda: DiscreteVAE(shape=(1, 8, 8), n_latents=8, n_categories=4, hidden=(64,), estimator="score"),
        digits,
    ),
    Case("nce_mlp", lambda: NCE(shape=(2,), hidden=(32, 32), k=5), toy),
    Case("explicit_gaussian_natural", lambda: ExplicitGaussian(shape=(2,), fisher_samples=64), toy),
    Case(
        "set2model",
        lambda: Set2Model(shape=(1, 8, 8), embedding_dim=4, n_components=2, em_steps=5, hidden=(16,)),
        lambda: Episodes(train_episodes=32, val_episodes=8, test_episodes=8, batch_size=8),
    ),
]


def first_batch(data: L.LightningDataModule) -> Tensor:
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return batch[0] if isinstance(batch, list | tuple) and len(batch) == 1 else batch  # Set2Model: 3


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_half_precision_loss_at_init_is_the_float32_loss(case: Case, half: torch.dtype) -> None:
    """Same weights, batch and noise: |loss_half - loss_fp32| <= 2^-8 |loss_fp32| (+ 2^-8 absolute for a
    loss near 0), and the loss under autocast is a float32 tensor (fp16 keeps 11 bits: the bound holds)."""
    torch.manual_seed(0)
    model, x = case.model(), first_batch(case.data())
    exact = case.loss(model, x).detach()
    with torch.autocast("cpu", dtype=half):
        mixed = case.loss(model, x).detach()
    assert mixed.dtype == torch.float32 and exact.dtype == torch.float32
    assert math.isfinite(mixed.item())
    assert abs(mixed.item() - exact.item()) <= BF16_RTOL * (abs(exact.item()) + 1.0)


def fp16_with_a_scaler() -> MixedPrecision:
    """``16-mixed`` as Lightning builds it on a GPU (fp16 autocast + GradScaler), here on the CPU: Lightning
    itself turns ``precision="16-mixed"`` into bf16 on the CPU."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mixed_precision_trains_a_few_steps_with_finite_losses_and_float32_weights(
    case: Case, precision: str, tmp_path: Path
) -> None:
    """Finite losses and float32 weights after 4 steps; the weights moved, or (16-mixed) the GradScaler
    skipped the steps whose scaled gradients overflowed and lowered its scale, as it does on a GPU. fp16
    convolutions are not tested here (~10 s a step on the CPU): tests/gpu/ covers them."""
    torch.manual_seed(0)
    model = case.model()
    if precision == "16-mixed" and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        pytest.skip("fp16 convolutions on the CPU take ~10 s a step; tests/gpu/test_precision_gpu.py")
    before = [p.detach().clone() for p in model.parameters()]
    how = {"precision": "bf16-mixed"} if precision == "bf16-mixed" else {"plugins": [fp16_with_a_scaler()]}
    trainer = L.Trainer(
        **how, accelerator="cpu", devices=1, max_steps=4, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,  # pictures (DiracGAN) go there, not to ./
    )  # fmt: skip
    trainer.fit(model, case.data())  # the guards raise on any non-finite loss or gradient
    assert trainer.global_step >= 3
    losses = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    after = list(model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    scaler = trainer.precision_plugin.scaler if precision == "16-mixed" else None
    assert moved or (scaler is not None and scaler.get_scale() < 2.0**16)
