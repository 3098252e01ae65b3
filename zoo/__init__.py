"""genzoo's model families: one LightningModule per generative family, built from shared pieces."""

from zoo.dirac_gan import DiracGAN
from zoo.fgan import FGAN
from zoo.gan import GAN
from zoo.vae import VAE

__all__ = ["FGAN", "GAN", "VAE", "DiracGAN"]
