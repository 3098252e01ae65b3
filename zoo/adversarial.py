"""What the adversarial families share: networks, GAN losses, R1/R2 penalties, the NaN guard, and one
LightningModule base that runs the two-player manual optimisation (``zoo.GAN``, ``zoo.FGAN``).

A family is the base plus an :meth:`Adversarial.objective` (its losses) and the name of its second player
(``discriminator`` for the GAN, ``critic`` for the f-GAN); nothing else is written twice.

Conventions
-----------
* Every player MINIMISES its loss. The opponent (discriminator / critic) returns one real number per example,
  ``[B]`` (a logit for the GAN).
* Gradient penalties (Mescheder, Geiger & Nowozin 2018, "Which training methods for GANs do actually
  converge?", eq. 9; seed 002, Q5.4):

  .. math::  R_1 = \\frac{\\gamma_1}{2} E_{x \\sim p_D} \\lVert \\nabla_x D(x) \\rVert^2, \\qquad
             R_2 = \\frac{\\gamma_2}{2} E_{x \\sim p_\\theta} \\lVert \\nabla_x D(x) \\rVert^2,

  with D the raw output (the logit), added to the opponent's loss. This is the γ/2 convention of the Dirac-GAN
  derivation, for which a linear critic ψ0 x + ψ1 gives the penalty γ ψ0² / 2 and the Jacobian entry -γ.
  Libraries differ by a factor 2 (some write γ E||∇D||²): halve their γ to use it here.
* Noise: training noise is ``zoo.noise.global_normal`` keyed by ``(seed, stream, global_step at the start of
  the batch)``, evaluation noise ``positional_normal`` keyed by ``(seed, stream, batch_idx)``. ``global_step``
  counts OPTIMIZER steps (1 or 2 per batch here) and is restored from a checkpoint, so a resumed run draws the
  noise of an uninterrupted one and W processes draw, together, the noise of one.

Under DDP (RELIABILITY.md #1-#4)
--------------------------------
* The penalty is ``torch.autograd.grad(D(x).sum(), x, create_graph=True)`` with respect to the INPUTS,
  added to the loss, followed by ONE ordinary ``manual_backward``: DDP's gradient hooks fire once per
  parameter, in the backward that Lightning prepared; there is never a ``backward(create_graph=True)``.
* Plain DDP (``find_unused_parameters=False``) needs every parameter it tracks in every backward graph. In
  the opponent's step the fake batch is detached (no backward through the generator), so the loss gets a
  zero-valued term that touches every generator parameter (:func:`zero_touch`, StyleGAN2-ADA's trick); in
  the generator's step the opponent is in the graph anyway. So ``strategy="ddp"``, ``"ddp_spawn"`` and
  ``"ddp_find_unused_parameters_true"`` all work and give the same gradients (tests/test_gan.py checks 2
  gloo processes against 1). ``toggle_optimizer`` is deliberately NOT used: it sets ``requires_grad=False``
  on the other player, which removes it from the graph and breaks plain DDP (lightning #20328); the
  ``zero_grad`` before each player's backward does what it would, and the other player's stale gradients
  are never stepped.
* Sharded (``--trainer.strategy fsdp2``, :mod:`zoo.sharding`): each player is its own FSDP2 unit
  (:meth:`Adversarial.sharded_units`); with R1 / R2 the opponent keeps its gathered parameters from the
  penalty's ``autograd.grad`` to its optimiser step (:meth:`Adversarial.double_backward_units`; resharding in
  between would free what the second backward needs, pytorch #172543), and the strategy reshards every unit
  after each step, so the generator's step never runs through the opponent's pre-step copy. No
  :func:`zero_touch` there: FSDP2 reduces only the units a backward reached. The weights equal the DDP run's
  (tests/test_fsdp2.py). Lightning's FSDP1 strategy (``fsdp``) is refused (:mod:`zoo.strategies`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.gaussian import upcast
from zoo.guards import NonFiniteLossError, check_data, check_finite  # noqa: F401 (re-exported: it lived here)
from zoo.networks import (
    check_conv_image,
    check_role,
    conv_decoder,
    conv_encoder,
    dummy_batch,
    is_conv_image,
    mlp,
    numel,
)
from zoo.noise import global_normal, mix_key, positional_normal, randn, shard_of, step_key
from zoo.plugins import (
    LRSchedulerCallable,
    OptimizerCallable,
    adam,
    build_optimizer,
    build_scheduler,
    linear_decay,
    live_arguments,
)
from zoo.sharding import is_sharded
from zoo.strategies import check_strategy

Network = Literal["auto", "mlp", "conv"]
GanLoss = Literal["minimax", "nonsaturating", "hinge"]
GAN_LOSSES: tuple[str, ...] = ("minimax", "nonsaturating", "hinge")
_D_STREAM, _G_STREAM, _VAL_STREAM, _GAME_STREAM, _TEST_STREAM = 10, 11, 12, 13, 14


# -- networks ------------------------------------------------------------------------------------------------


def network_kind(network: str, shape: tuple[int, ...]) -> str:
    """``"auto"`` -> ``"conv"`` for (C, H, H) images with H in {16, 28, 32, 64}, ``"mlp"`` otherwise; refuse
    ``"conv"`` elsewhere."""
    if network not in ("auto", "mlp", "conv"):
        raise ValueError(f"network must be 'auto', 'mlp' or 'conv'; got {network!r}")
    if network == "auto":
        return "conv" if is_conv_image(shape) else "mlp"
    if network == "conv":
        check_conv_image(shape, "network='conv'", "network='mlp' (or 'auto')")
    return network


def build_generator(
    shape: tuple[int, ...], latent_dim: int, hidden: Sequence[int], network: str
) -> nn.Module:
    """``z [B, latent_dim] -> x [B, *shape]``. Images (3-D shapes) end in a sigmoid (data in [0, 1]), vectors
    in nothing. ``conv``: the DCGAN-style ``zoo.networks.conv_decoder``; ``mlp``: ReLU MLP through
    ``hidden``."""
    body = conv_decoder(latent_dim, shape) if network == "conv" else mlp(latent_dim, hidden, numel(shape))
    head = [nn.Sigmoid()] if len(shape) == 3 else []
    return nn.Sequential(body, *head, nn.Unflatten(1, shape))


def build_opponent(shape: tuple[int, ...], hidden: Sequence[int], network: str) -> nn.Module:
    """``x [B, *shape] -> [B]`` (one logit / critic value per example). No batch normalisation: the input
    gradient of ``out.sum()`` must be per-example for R1/R2. ``mlp``: LeakyReLU(0.2) MLP through ``hidden``;
    ``conv``: ``zoo.networks.conv_encoder`` (stride-2 down to a 4x4 or 7x7 grid) to ``hidden[-1]`` features,
    LeakyReLU, linear."""
    leaky = partial(nn.LeakyReLU, 0.2)
    if network == "conv":
        body = nn.Sequential(conv_encoder(shape, hidden[-1]), leaky(), nn.Linear(hidden[-1], 1))
    else:
        body = nn.Sequential(nn.Flatten(), mlp(numel(shape), hidden, 1, activation=leaky))
    return nn.Sequential(body, nn.Flatten(0))


def check_generator(family: str, generator: nn.Module, latent_dim: int, shape: tuple[int, ...]) -> None:
    """A user's generator must map ``z [B, latent_dim]`` to ``x [B, *shape]`` (checked on a dummy batch)."""
    z = dummy_batch((latent_dim,), like=generator)
    check_role(
        family,
        "generator",
        generator,
        [z],
        ("B", *shape),
        hint=f"Its input z has latent_dim = {latent_dim} entries. ",
    )


def check_opponent(family: str, role: str, network: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A user's discriminator / critic must map ``x [B, *shape]`` to ``[B]`` or ``[B, 1]``; a ``[B, 1]``
    network is returned as ``nn.Sequential(network, nn.Flatten(0))`` (the presets' own ending), so
    ``model.<role>(x)`` is ``[B]`` whatever the user's network returns."""
    out = check_role(family, role, network, [dummy_batch(shape, like=network)], ("B",), ("B", 1))
    return nn.Sequential(network, nn.Flatten(0)) if out.dim() == 2 else network


# -- losses and penalties ------------------------------------------------------------------------------------


def discriminator_loss(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss (minimised) from logits ``real [B]`` on data and ``fake [B]`` on samples.

    * ``minimax`` / ``nonsaturating`` (Goodfellow et al. 2014): -E log σ(l_r) - E log(1 - σ(l_f))
      = E softplus(-l_r) + E softplus(l_f) (RELIABILITY.md #23: softplus, never log(sigmoid));
    * ``hinge`` (Lim & Ye 2017; Miyato et al. 2018): E relu(1 - l_r) + E relu(1 + l_f).
    """
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def generator_loss(kind: str, fake: Tensor) -> Tensor:
    """The generator's loss (minimised) from the discriminator's logits ``fake [B]`` on its samples.

    * ``minimax``: E log(1 - σ(l_f)) = -E softplus(l_f) (the zero-sum game; saturates when D wins);
    * ``nonsaturating``: -E log σ(l_f) = E softplus(-l_f);
    * ``hinge``: -E l_f.
    """
    if kind == "minimax":
        return -F.softplus(fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    return -fake.mean()


def gradient_penalty(output: Tensor, x: Tensor) -> Tensor:
    """E_batch ||∇_x D(x)||² for ``output = D(x) [B]``, differentiable (``create_graph=True``).

    ``x`` must require grad and ``D`` must treat examples independently (no batch norm), so that the gradient
    of ``output.sum()`` holds each example's own input gradient. The caller multiplies by γ/2.
    """
    (grad,) = torch.autograd.grad(output.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1).mean()


def zero_touch(parameters: Iterable[Tensor]) -> Tensor:
    """0 · Σ_p Σ p: a term of value 0 whose graph reaches every parameter, so plain DDP sees all of them used
    (their gradient is 0). Add it to the loss only for ``backward``, never to a value you log."""
    sums = [p.sum() for p in parameters if p.requires_grad]
    return torch.stack(sums).sum() * 0.0 if sums else torch.zeros(())


_ADVERSARIAL_HINT = (
    "Look for non-finite data, a too large learning rate, or a diverging critic (lower lr_d, add r1_gamma)."
)


# -- the base module -----------------------------------------------------------------------------------------


class Adversarial(L.LightningModule):
    """Two players, a generator G and an opponent (discriminator / critic), trained by manual optimisation.

    One training batch: an opponent step on the batch (its loss + R1/R2), then, on every ``n_critic``-th
    batch of the run, a generator step. Which batches carry a generator step is a function of
    ``global_step`` (restored by a checkpoint): the batch starting at ``global_step = s`` steps the generator
    iff ``s % (n_critic + 1) == n_critic - 1``, so a resumed run keeps the schedule across epoch boundaries.
    ``global_step`` advances by 2 on a batch with both steps and by 1 otherwise (it counts optimizer steps:
    set ``max_steps`` accordingly). The optimizers are ``[opponent, generator]`` (Adam each by default).

    Networks and optimisers are plug-ins (docs/families/gan.md, "Networks"): ``generator`` and
    ``opponent_network`` (the subclass's ``discriminator`` / ``critic``) are modules or None (the presets of
    ``network`` / ``hidden``); ``*_optimizer`` and ``*_lr_scheduler`` are callables or None (Adam at
    ``lr_g`` / ``lr_d`` with ``betas``; ``LinearLR`` to ``lr_final_factor``).

    Subclasses implement :meth:`objective` and name the opponent; see ``zoo.GAN`` and ``zoo.FGAN``.
    """

    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int,
        hidden: Sequence[int],
        network: str,
        r1_gamma: float,
        r2_gamma: float,
        n_critic: int,
        lr_g: float,
        lr_d: float,
        betas: Sequence[float],
        clip_norm: float,
        lr_final_factor: float,
        seed: int,
        opponent_name: str,
        generator: nn.Module | None = None,
        opponent_network: nn.Module | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        opponent_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        opponent_lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        hidden = tuple(int(h) for h in hidden)
        _check_arguments(shape, latent_dim, hidden, r1_gamma, r2_gamma, n_critic, lr_g, lr_d, betas,
                         clip_norm, lr_final_factor)  # fmt: skip
        family = type(self).__name__
        # the names the subclass leaves out of save_hyperparameters (its own argument names; zoo.plugins)
        self._live_arguments = live_arguments(**{
            "generator": generator, opponent_name: opponent_network,
            "generator_optimizer": generator_optimizer, f"{opponent_name}_optimizer": opponent_optimizer,
            "generator_lr_scheduler": generator_lr_scheduler,
            f"{opponent_name}_lr_scheduler": opponent_lr_scheduler,
        })  # fmt: skip
        presets = generator is None or opponent_network is None
        kind = network_kind(network, shape) if presets else network  # ignored when both networks are given
        self.automatic_optimization = False
        self.shape, self.latent_dim, self.network = shape, int(latent_dim), kind
        self.r1_gamma, self.r2_gamma, self.n_critic = float(r1_gamma), float(r2_gamma), int(n_critic)
        self.lr_g, self.lr_d, self.betas = float(lr_g), float(lr_d), tuple(float(b) for b in betas)
        self.clip_norm, self.lr_final_factor, self.seed = float(clip_norm), float(lr_final_factor), int(seed)
        # presets in today's order (generator, then opponent), so a preset run's weights are unchanged
        self._preset_generator = generator is None  # ends in a sigmoid for images
        if generator is None:
            generator = build_generator(shape, self.latent_dim, hidden, kind)
        else:
            check_generator(family, generator, self.latent_dim, shape)
        self.generator = generator
        if opponent_network is None:
            opponent_network = build_opponent(shape, hidden, kind)
        else:
            opponent_network = check_opponent(family, opponent_name, opponent_network, shape)
        self._opponent_name = opponent_name
        setattr(self, opponent_name, opponent_network)
        self._generator_optimizer_callable = generator_optimizer
        self._opponent_optimizer_callable = opponent_optimizer
        self._generator_scheduler_callable = generator_lr_scheduler
        self._opponent_scheduler_callable = opponent_lr_scheduler
        self.mode_coverage = None  # a callbacks.quality.ModeCoverage when the data is a Gaussian mixture

    # -- the players -----------------------------------------------------------------------------------------

    def score(self, x: Tensor) -> Tensor:
        """The opponent's output ``[B]`` for ``x [B, *shape]`` (GAN: the logit; f-GAN: the critic T), in
        float32 also under mixed precision, so losses, log-sum-exps and penalties are computed in float32."""
        return upcast(self._modules[self._opponent_name](x))

    def opponent_parameters(self) -> list[Tensor]:
        return list(self._modules[self._opponent_name].parameters())

    def generator_parameters(self) -> list[Tensor]:
        return list(self.generator.parameters())

    def sharded_units(self) -> list[nn.Module]:
        """The FSDP2 units (:mod:`zoo.sharding`): each player separately, so a player's step gathers only the
        players it runs through."""
        return [self.generator, self._modules[self._opponent_name]]

    def double_backward_units(self) -> list[nn.Module]:
        """The opponent when R1 / R2 is on: the penalty's ``autograd.grad(..., create_graph=True)`` and the
        loss's backward both run through it, so under FSDP2 it keeps its gathered weights until its step."""
        return [self._modules[self._opponent_name]] if self.r1_gamma > 0 or self.r2_gamma > 0 else []

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, *shape]`` = G(z), z ~ N(0, I) from ``generator`` (the global RNG if None)."""
        z = randn((n, self.latent_dim), generator, device=self.device, dtype=self.dtype)
        return self.generator(z)

    # -- the objective (what a subclass defines) -------------------------------------------------------------

    def objective(self, real: Tensor | None, fake: Tensor, player: Literal["opponent", "generator"]):
        """``(loss, logs)`` of ``player`` from the opponent's outputs on data (``real [B]``) and samples
        (``fake [B]``); ``logs`` maps names to detached values to log under ``train/``. ``real`` is None in
        the generator's step unless :attr:`generator_needs_real`."""
        raise NotImplementedError

    generator_needs_real = False

    # -- losses of one batch ---------------------------------------------------------------------------------

    def opponent_loss(
        self, x: Tensor, z: Tensor | None = None, detach_fake: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The opponent's loss on data ``x`` and samples G(z), penalties included, and what to log; ``z=None``
        draws this step's latents (fresh on every call in a user's own loop, :func:`zoo.noise.step_key`)."""
        z = self._train_noise(x, _D_STREAM) if z is None else z
        fake = self.generator(z)
        if detach_fake:
            fake = fake.detach()
        if self.r1_gamma > 0:
            x = x.detach().requires_grad_(True)
        if self.r2_gamma > 0 and not fake.requires_grad:
            fake = fake.requires_grad_(True)
        real_out, fake_out = self.score(x), self.score(fake)
        loss, logs = self.objective(real_out, fake_out, "opponent")
        if self.r1_gamma > 0:
            r1 = 0.5 * self.r1_gamma * gradient_penalty(real_out, x)
            loss, logs["r1"] = loss + r1, r1.detach()
        if self.r2_gamma > 0:
            r2 = 0.5 * self.r2_gamma * gradient_penalty(fake_out, fake)
            loss, logs["r2"] = loss + r2, r2.detach()
        return loss, logs

    def generator_step_loss(self, x: Tensor, z: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator's loss on samples G(z) (and data ``x`` when the objective needs it); ``z=None`` draws
        this step's latents, as :meth:`opponent_loss`."""
        z = self._train_noise(x, _G_STREAM) if z is None else z
        real_out = None
        if self.generator_needs_real:
            with torch.no_grad():  # E_p[...] does not depend on the generator
                real_out = self.score(x)
        return self.objective(real_out, self.score(self.generator(z)), "generator")

    def _train_noise(self, x: Tensor, stream: int, step: int | None = None) -> Tensor:
        """z for this rank's rows of the global batch, keyed by ``(seed, stream, step)``; ``step=None``: this
        training step's key (:func:`zoo.noise.step_key`: fresh on every call outside a Trainer)."""
        rank, world = shard_of(self)
        key = step_key(self, stream) if step is None else mix_key(self.seed, stream, step)
        return global_normal(
            x.shape[0], (self.latent_dim,), key=key, rank=rank, world=world, device=x.device, dtype=x.dtype
        )

    def game(self, batch: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        """The ``Game`` capability: ``[(opponent_loss, opponent_params), (generator_loss, generator_params)]``

        Each loss is minimised by its player, built with this batch's fixed noise and a graph through BOTH
        players (the samples are not detached, penalties are included), so callers can differentiate twice.
        """
        z = self._train_noise(batch, _GAME_STREAM, 0)
        d_loss, _ = self.opponent_loss(batch, z, detach_fake=False)
        real_out = self.score(batch) if self.generator_needs_real else None
        g_loss, _ = self.objective(real_out, self.score(self.generator(z)), "generator")
        return [(d_loss, self.opponent_parameters()), (g_loss, self.generator_parameters())]

    # -- training --------------------------------------------------------------------------------------------

    def generator_turn(self, step: int) -> bool:
        """Whether the batch that starts at optimizer step ``step`` ends with a generator step."""
        return step % (self.n_critic + 1) == self.n_critic - 1

    def _step(self, optimizer, loss: Tensor, other_player: list[Tensor]) -> None:
        optimizer.zero_grad()
        # plain DDP needs the other player in the graph; FSDP2 reduces only the units the backward reached
        touch = other_player and not is_sharded(self)
        self.manual_backward(loss + zero_touch(other_player) if touch else loss)
        if self.clip_norm > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        x = batch
        if len(self.shape) == 3:  # images are in [0, 1] (DESIGN.md); preset generators end in a sigmoid
            option = "an image generator (sigmoid output)" if self._preset_generator else "image data"
            check_data(self, x, "unit_interval", option=option,
                       fix="a datamodule with pixels in [0, 1]")  # fmt: skip
        else:
            check_data(self, x, "real")
        d_opt, g_opt = self.optimizers()
        step = self.global_step  # at the start of this batch; restored on resume
        d_loss, logs = self.opponent_loss(x, self._train_noise(x, _D_STREAM, step))
        check_finite(self, "d_loss", d_loss, batch_idx, _ADVERSARIAL_HINT)
        self._step(d_opt, d_loss, self.generator_parameters())  # samples detached: touch G for DDP
        self.log("train/d_loss", d_loss.detach(), prog_bar=True)
        if self.generator_turn(step):
            g_loss, g_logs = self.generator_step_loss(x, self._train_noise(x, _G_STREAM, step))
            check_finite(self, "g_loss", g_loss, batch_idx, _ADVERSARIAL_HINT)
            self._step(g_opt, g_loss, [])  # the opponent is in the generator's graph
            self.log("train/g_loss", g_loss.detach(), prog_bar=True)
            logs.update({f"g_{k}": v for k, v in g_logs.items()})
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        for scheduler in self._schedulers():
            scheduler.step()

    def configure_optimizers(self):
        """The optimizers ``[opponent, generator]``: ``<player>_optimizer(params)``, default Adam at
        ``lr_d`` / ``lr_g`` with ``betas``. Each player's schedule: ``<player>_lr_scheduler(optimizer)``
        or, when none is given and ``lr_final_factor != 1``, a ``LinearLR`` from lr to lr * lr_final_factor
        over ``trainer.estimated_stepping_batches`` batches (the run's batches when it is bounded by
        ``max_epochs``). Every schedule is stepped once per batch in :meth:`training_step` (manual
        optimisation), also on batches where its player took no step."""
        name = self._opponent_name
        d_opt = build_optimizer(self, self.opponent_parameters(), self._opponent_optimizer_callable,
                                adam(self.lr_d, self.betas), f"{name}_optimizer")  # fmt: skip
        g_opt = build_optimizer(self, self.generator_parameters(), self._generator_optimizer_callable,
                                adam(self.lr_g, self.betas), "generator_optimizer")  # fmt: skip
        schedulers = [
            self._schedule(d_opt, self._opponent_scheduler_callable, f"{name}_lr_scheduler"),
            self._schedule(g_opt, self._generator_scheduler_callable, "generator_lr_scheduler"),
        ]
        schedulers = [s for s in schedulers if s is not None]
        return ([d_opt, g_opt], schedulers) if schedulers else [d_opt, g_opt]

    def _schedule(
        self, optimizer: torch.optim.Optimizer, lr_scheduler: LRSchedulerCallable | None, role: str
    ):
        """One player's schedule: the user's, else the ``lr_final_factor`` shorthand, else None."""
        if lr_scheduler is not None:
            return build_scheduler(optimizer, lr_scheduler, role, stepped_by=type(self).__name__)
        if self.lr_final_factor == 1.0:
            return None
        return linear_decay(self.trainer, optimizer, self.lr_final_factor)

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers() if self._trainer is not None else None
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    # -- evaluation ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Refuse FSDP (manual optimisation, :mod:`zoo.strategies`); attach a ``ModeCoverage`` metric when
        the datamodule is a Gaussian mixture (has ``centers``, ``std``)."""
        if self._trainer is not None:
            check_strategy(self, self._trainer.strategy)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        centers, std = getattr(datamodule, "centers", None), getattr(datamodule, "std", None)
        if self.mode_coverage is None and centers is not None and std is not None:
            from callbacks.quality import ModeCoverage

            self.mode_coverage = ModeCoverage(centers, std).to(self.device)

    def validation_fakes(self, n: int, batch_idx: int, like: Tensor, stream: int = _VAL_STREAM) -> Tensor:
        """The same ``n`` samples for this validation batch at every epoch and on any number of processes."""
        rank, world = shard_of(self)
        z = positional_normal(
            n, (self.latent_dim,), key=mix_key(self.seed, stream, batch_idx),
            rank=rank, world=world, device=like.device, dtype=like.dtype,
        )  # fmt: skip
        return self.generator(z)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        fake = self.validation_fakes(batch.shape[0], batch_idx, batch)
        if self.mode_coverage is not None:
            self.mode_coverage.update(fake)
        self.validation_scores(self.score(batch), self.score(fake))

    def validation_scores(self, real: Tensor, fake: Tensor, stage: str = "val") -> None:
        """Update and log the family's ``{stage}/...`` metrics (``val`` or ``test``) from the opponent's
        outputs."""

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        fake = self.validation_fakes(batch.shape[0], batch_idx, batch, stream=_TEST_STREAM)
        self.validation_scores(self.score(batch), self.score(fake), stage="test")

    def on_validation_epoch_end(self) -> None:
        if self.mode_coverage is not None:
            values = self.mode_coverage.compute()  # collective: every rank runs this hook
            self.log("val/modes_covered", values["modes_covered"].float(), prog_bar=True)
            self.log("val/high_quality", values["high_quality"].float(), prog_bar=True)
            self.mode_coverage.reset()


def _check_arguments(
    shape, latent_dim, hidden, r1_gamma, r2_gamma, n_critic, lr_g, lr_d, betas, clip_norm, lr_final_factor
):
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes; got {shape}")
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer; got {latent_dim}")
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive widths; got {list(hidden)}")
    for name, value in (("r1_gamma", r1_gamma), ("r2_gamma", r2_gamma), ("clip_norm", clip_norm)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off); got {value}")
    if n_critic < 1:
        raise ValueError(f"n_critic must be a positive integer; got {n_critic}")
    for name, value in (("lr_g", lr_g), ("lr_d", lr_d)):
        if not value > 0:
            raise ValueError(f"{name} must be positive; got {value}")
    if not 0 < lr_final_factor <= 1:
        raise ValueError(
            f"lr_final_factor must be in (0, 1] (1: constant learning rates); got {lr_final_factor}"
        )
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1) (Adam's β1, β2); got {list(betas)}")
