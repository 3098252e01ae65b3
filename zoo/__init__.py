"""genzoo's model families: one LightningModule per generative family, built from shared pieces."""

from zoo.vae import VAE

__all__ = ["VAE"]
