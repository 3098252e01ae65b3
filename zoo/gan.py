"""Generative adversarial networks (Goodfellow et al. 2014) with R1 / R2 gradient penalties.

A generator G maps z ~ N(0, I) to x = G(z); a discriminator D returns a logit l = D(x) (P(real) = σ(l)).

* Losses, each minimised by its player (``loss=``): ``"minimax"`` (D: -E log σ(l_r) - E log(1 - σ(l_f)),
  G: E log(1 - σ(l_f))), ``"nonsaturating"`` (same D, G: -E log σ(l_f); the default) and ``"hinge"``
  (D: E relu(1 - l_r) + E relu(1 + l_f), G: -E l_f). At the minimax game's optimum D*(x) = p(x) / (p(x) +
  q(x)) and D's loss is log 4 - 2 JSD(p, q) (seed 002, Q4).
* Penalties on D (Mescheder et al. 2018; seed 002, Q5): R1 = r1_gamma/2 E_data ||∇_x D(x)||² and
  R2 = r2_gamma/2 E_G ||∇_x D(x)||², with D the logit. This γ/2 convention is the Dirac-GAN derivation's;
  some libraries write γ E||∇D||² (halve their γ). R1 makes the Dirac-GAN's equilibrium locally stable for
  any γ > 0.
* ``n_critic`` discriminator steps per generator step; manual optimisation with ``manual_backward`` (details,
  and why it runs under plain DDP, in :mod:`zoo.adversarial`).

Networks are plug-ins: ``generator`` ([B, latent_dim] -> [B, *shape]) and ``discriminator`` ([B, *shape]
-> [B] or [B, 1] logits) take any ``nn.Module``, checked once at construction. Without one, the presets
follow the data's shape: ``network="auto"`` picks DCGAN-style convolutions for (C, H, H) images, H in
{16, 28, 32, 64} (``zoo.networks.conv_decoder`` / ``conv_encoder``), and MLPs otherwise; preset image
generators end in a sigmoid. Each player takes its own optimiser and schedule (``generator_optimizer``,
``discriminator_optimizer``, ``generator_lr_scheduler``, ``discriminator_lr_scheduler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn
from torchmetrics import MeanMetric

from zoo.adversarial import (
    GAN_LOSSES,
    Adversarial,
    GanLoss,
    Network,
    discriminator_loss,
    generator_loss,
)
from zoo.plugins import LRSchedulerCallable, OptimizerCallable


class GAN(Adversarial):
    """A GAN on any data with a ``shape``: your networks, or MLPs for vectors and DCGAN-style convolutions for
    (C, H, H) images, H in {16, 28, 32, 64}.

    Args:
        shape: shape of one example, linked from the datamodule by the CLI, e.g. ``(2,)`` or ``(1, 28, 28)``.
        latent_dim: dimension of z ~ N(0, I).
        hidden: widths of the preset MLPs' hidden layers (G: latent -> hidden -> data; D: data -> hidden ->
            1); with convolutions only ``hidden[-1]`` is used (D's feature width). Ignored for a given
            network.
        network: the presets: ``"auto"`` (conv for (C, H, H) images with H in {16, 28, 32, 64}, else mlp),
            ``"mlp"`` or ``"conv"``. Ignored for a role whose network is given.
        loss: ``"minimax"``, ``"nonsaturating"`` or ``"hinge"``.
        r1_gamma: weight γ of R1 = γ/2 E_data ||∇_x D(x)||² (0: off).
        r2_gamma: weight γ of R2 = γ/2 E_G ||∇_x D(x)||² (0: off).
        n_critic: discriminator steps (batches) per generator step.
        lr_g, lr_d: Adam learning rates of the generator and the discriminator (the default optimisers'
            shorthand: ignored for a player whose ``*_optimizer`` is given).
        betas: Adam's (β1, β2) for both default optimisers.
        clip_norm: clip each player's gradient norm to this value before its step (0: off). Use it instead of
            ``Trainer(gradient_clip_val=...)``, which manual optimisation refuses.
        lr_final_factor: the learning rate of each player without a ``*_lr_scheduler`` decays linearly to
            ``lr * lr_final_factor`` over the run (``LinearLR`` stepped once per batch, saved in checkpoints);
            1 keeps it constant.
        seed: seed of the training and validation noise (see :mod:`zoo.noise`).
        generator: your generator, ``z [B, latent_dim] -> x [B, *shape]`` (None: the ``network`` preset). Its
            output range is yours; image data must still be in [0, 1].
        discriminator: your discriminator, ``x [B, *shape] -> logits [B]`` or ``[B, 1]`` (a ``[B, 1]`` one is
            wrapped as ``nn.Sequential(yours, nn.Flatten(0))``, so ``gan.discriminator(x)`` is ``[B]``).
            With R1 / R2 it must treat examples independently (no batch norm); the check cannot see that.
        generator_optimizer, discriminator_optimizer: callables ``params -> Optimizer`` (e.g.
            ``functools.partial(torch.optim.AdamW, lr=1e-4)``, or ``class_path`` / ``init_args`` in a recipe);
            None: Adam at ``lr_g`` / ``lr_d`` with ``betas``.
        generator_lr_scheduler, discriminator_lr_scheduler: callables ``optimizer -> scheduler``, stepped once
            per batch (so ``T_max`` / ``total_iters`` / ``step_size`` count batches); None: the
            ``lr_final_factor`` shorthand.

    A network or callable given from Python is not saved in the hyperparameters (reload with
    ``GAN.load_from_checkpoint(path, generator=MyGenerator(), ...)``); given from a recipe it is, as its
    ``class_path`` / ``init_args`` (reload with no arguments).

    Logged: ``train/d_loss`` (penalties included), ``train/g_loss``, ``train/r1`` and ``train/r2`` when on,
    ``val/d_loss`` (no penalties) and, on Gaussian-mixture data (``Toy2D`` 8 / 25 Gaussians),
    ``val/modes_covered`` and ``val/high_quality`` (``callbacks.quality.ModeCoverage``).

    Example:
        >>> import torch
        >>> gan = GAN(shape=(2,), latent_dim=4, hidden=(32, 32), r1_gamma=1.0)
        >>> gan.discriminator(torch.randn(5, 2)).shape, gan.sample(3).shape
        (torch.Size([5]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int = 16,
        hidden: Sequence[int] = (128, 128, 128),
        network: Network = "auto",
        loss: GanLoss = "nonsaturating",
        r1_gamma: float = 0.0,
        r2_gamma: float = 0.0,
        n_critic: int = 1,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas: Sequence[float] = (0.5, 0.999),
        clip_norm: float = 0.0,
        lr_final_factor: float = 1.0,
        seed: int = 0,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        discriminator_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        discriminator_lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if loss not in GAN_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, GAN_LOSSES))}; got {loss!r}")
        super().__init__(
            shape, latent_dim, hidden, network, r1_gamma, r2_gamma, n_critic, lr_g, lr_d, betas, clip_norm,
            lr_final_factor, seed, opponent_name="discriminator",
            generator=generator, opponent_network=discriminator,
            generator_optimizer=generator_optimizer, opponent_optimizer=discriminator_optimizer,
            generator_lr_scheduler=generator_lr_scheduler, opponent_lr_scheduler=discriminator_lr_scheduler,
        )  # fmt: skip
        self.save_hyperparameters(ignore=self._live_arguments)
        self.loss = loss
        self.val_d_loss, self.test_d_loss = MeanMetric(), MeanMetric()

    def objective(self, real: Tensor | None, fake: Tensor, player: Literal["opponent", "generator"]):
        if player == "opponent":
            return discriminator_loss(self.loss, real, fake), {}
        return generator_loss(self.loss, fake), {}

    def validation_scores(self, real: Tensor, fake: Tensor, stage: str = "val") -> None:
        metric = self.test_d_loss if stage == "test" else self.val_d_loss
        metric.update(discriminator_loss(self.loss, real, fake), weight=real.shape[0])
        self.log(f"{stage}/d_loss", metric)
