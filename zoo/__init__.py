"""genzoo's model families: one LightningModule per generative family, built from shared pieces."""

from zoo.autoregressive import MADE, PixelCNN
from zoo.diffusion import Diffusion
from zoo.dirac_gan import DiracGAN
from zoo.discrete_vae import DiscreteVAE
from zoo.explicit_gaussian import ExplicitGaussian
from zoo.fgan import FGAN
from zoo.flows import Flow
from zoo.gan import GAN
from zoo.nce import NCE
from zoo.set2model import Set2Model
from zoo.vae import VAE

__all__ = [
    "FGAN",
    "GAN",
    "MADE",
    "NCE",
    "VAE",
    "Diffusion",
    "DiracGAN",
    "DiscreteVAE",
    "ExplicitGaussian",
    "Flow",
    "PixelCNN",
    "Set2Model",
]
