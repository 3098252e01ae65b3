"""f-GANs (Nowozin, Cseke & Tomioka 2016): a critic T maximises a variational lower bound on a divergence
between the data p and the generator's q, the generator minimises the bound's estimate. Bounds in nats.

``divergence`` (seed 003, Q6; seed 002, Q4):

* ``"kl_nwj"``: R1[T] = E_p T - E_q e^(T-1) <= KL(p || q) (Nguyen, Wainwright & Jordan 2010; the f-GAN bound
  of f(u) = u log u, whose convex conjugate is f*(t) = e^(t-1)); equality at T* = 1 + log p/q.
* ``"kl_dv"``: R2[T] = E_p T - log E_q e^T <= KL(p || q) (Donsker-Varadhan); equality iff
  T = log p/q + c for any constant c. For every T, R1[T] <= R2[T] (log a <= a - 1 with a = E_q e^(T-1)).
* ``"js"``: the critic's output is a logit l (the GAN discriminator) and
  JSD(p, q) >= log 2 + ½ (E_p log σ(l) + E_q log σ(-l)), with equality at σ(l*) = p / (p + q).
  The generator minimising it is the minimax GAN.

The critic's loss is -bound (+ R1/R2 penalties, as in :mod:`zoo.adversarial`), the generator's is the bound.

Estimating log E_q e^T on a minibatch: ``logsumexp(T) - log n``, stable for any T. Under DDP the batch is
split, and the mean of per-process log-mean-exps is NOT the log-mean-exp of the global batch, so its gradient
would differ from one process's. :func:`log_mean_exp` therefore all-gathers the per-process logsumexps (no
gradient) and returns a term whose value is the global estimate and whose gradient, once DDP averages it over
the W processes, is exactly the global-batch gradient Σ_j softmax(T)_j ∇T_j (first derivatives only: second
derivatives through it are exact on one process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from zoo.adversarial import Adversarial, Network
from zoo.plugins import LRSchedulerCallable, OptimizerCallable

Divergence = Literal["js", "kl_nwj", "kl_dv"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
LOG2 = math.log(2.0)


def log_mean_exp(t: Tensor, all_gather=None, world: int = 1) -> Tensor:
    """log (1/N) Σ_j e^(t_j) over the GLOBAL batch of ``world`` equal shards, from this shard's ``t [n]``.

    ``all_gather(tensor) -> [world, ...]`` collects the shards' logsumexps (detached). The result has the
    global value; its gradient is ``world`` times this shard's part of the global gradient, so DDP's average
    over the processes gives the one-process gradient.
    """
    lse = torch.logsumexp(t, dim=0)
    if world == 1 or all_gather is None:
        return lse - math.log(t.shape[0])
    lse_global = torch.logsumexp(all_gather(lse.detach()).reshape(-1), dim=0)
    share = torch.exp(lse - lse_global)  # this shard's share of Σ_j e^(t_j); carries the gradient
    value = lse_global - math.log(t.shape[0] * world)
    return value + world * (share - share.detach())


def variational_bound(divergence: str, real: Tensor, fake: Tensor, fake_log_mean_exp=None) -> Tensor:
    """The lower bound (nats) from the critic's outputs ``real [B]`` on p and ``fake [B]`` on q.

    ``fake_log_mean_exp``: log E_q e^T computed elsewhere (the DDP-aware :func:`log_mean_exp`); default: this
    batch's ``logsumexp(fake) - log B``.
    """
    if divergence == "js":
        return LOG2 + 0.5 * (F.logsigmoid(real).mean() + F.logsigmoid(-fake).mean())
    lme = fake_log_mean_exp if fake_log_mean_exp is not None else log_mean_exp(fake)
    if divergence == "kl_nwj":
        return real.mean() - torch.exp(lme - 1.0)  # E_q e^(T-1), from the log-mean-exp: no overflow
    return real.mean() - lme


def _logsumexp_over_ranks(stacked: Tensor) -> Tensor:
    return torch.logsumexp(stacked, dim=0)


class BoundMetric(Metric):
    """The bound over a whole evaluation set, exact over processes: sums and counts reduced by sum, log Σ e^T
    reduced by logsumexp (never a mean of per-process means; RELIABILITY.md #22)."""

    full_state_update = False

    def __init__(self, divergence: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.divergence = divergence
        zero = torch.zeros((), dtype=torch.float64)
        self.add_state("real_sum", zero.clone(), dist_reduce_fx="sum")  # Σ T (kl) or Σ log σ(l) (js) on p
        self.add_state("fake_sum", zero.clone(), dist_reduce_fx="sum")  # Σ log σ(-l) on q (js)
        self.add_state(
            "fake_lse", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx=_logsumexp_over_ranks
        )
        self.add_state("n_real", zero.clone(), dist_reduce_fx="sum")
        self.add_state("n_fake", zero.clone(), dist_reduce_fx="sum")

    def update(self, real: Tensor, fake: Tensor) -> None:
        real, fake = real.detach().double(), fake.detach().double()
        if self.divergence == "js":
            self.real_sum += F.logsigmoid(real).sum()
            self.fake_sum += F.logsigmoid(-fake).sum()
        else:
            self.real_sum += real.sum()
            self.fake_lse = torch.logaddexp(self.fake_lse, torch.logsumexp(fake, dim=0))
        self.n_real += real.numel()
        self.n_fake += fake.numel()

    def compute(self) -> Tensor:
        mean_real = self.real_sum / self.n_real
        if self.divergence == "js":
            return LOG2 + 0.5 * (mean_real + self.fake_sum / self.n_fake)
        lme = self.fake_lse - torch.log(self.n_fake)
        return mean_real - (torch.exp(lme - 1.0) if self.divergence == "kl_nwj" else lme)


class FGAN(Adversarial):
    """An f-GAN with a critic T: ``divergence="kl_nwj"``, ``"kl_dv"`` (KL(p || q) bounds) or ``"js"``.

    The same networks, penalties, schedule and DDP handling as :class:`zoo.GAN` (both are
    :class:`zoo.adversarial.Adversarial`); only the objective differs. The critic T is the module
    ``self.critic``: ``critic(x) -> T [B]``. With ``divergence="js"`` its output is a logit and the model also
    offers ``discriminator(x)`` (the same module), so JSD diagnostics apply; with the KL bounds it has no
    ``discriminator`` (T is not a logit).

    Args: as :class:`zoo.GAN`, with ``divergence`` instead of ``loss`` and the critic's names instead of the
    discriminator's:

    * ``critic``: your critic, ``x [B, *shape] -> T [B]`` or ``[B, 1]`` (a ``[B, 1]`` one is wrapped as
      ``nn.Sequential(yours, nn.Flatten(0))``); None: the ``network`` / ``hidden`` preset. With R1 / R2 it
      must treat examples independently (no batch norm). ``generator``: ``z [B, latent_dim] -> x
      [B, *shape]``.
    * ``critic_optimizer``, ``generator_optimizer``: callables ``params -> Optimizer``; None: Adam at
      ``lr_d`` / ``lr_g`` with ``betas`` (``lr_d`` is the critic's rate).
    * ``critic_lr_scheduler``, ``generator_lr_scheduler``: callables ``optimizer -> scheduler``, stepped once
      per batch; None: the ``lr_final_factor`` shorthand.

    Logged: ``train/bound`` (the critic step's estimate, nats), ``train/d_loss`` (= -bound + penalties),
    ``train/g_loss`` (= the bound on the generator's step), ``train/r1``, ``train/r2``; ``val/bound`` over the
    validation set (exact under DDP), and ``val/modes_covered``, ``val/high_quality`` on Gaussian mixtures.

    Example:
        >>> import torch
        >>> fgan = FGAN(shape=(2,), divergence="kl_dv", hidden=(16,))
        >>> fgan.critic(torch.randn(5, 2)).shape, hasattr(fgan, "discriminator")
        (torch.Size([5]), False)
    """

    generator_needs_real = True  # the generator's loss is the whole bound (E_p T is computed without a graph)

    def __init__(
        self,
        shape: Sequence[int],
        divergence: Divergence = "kl_nwj",
        latent_dim: int = 16,
        hidden: Sequence[int] = (128, 128, 128),
        network: Network = "auto",
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
        critic: nn.Module | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        critic_lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}; got {divergence!r}"
            )
        super().__init__(
            shape, latent_dim, hidden, network, r1_gamma, r2_gamma, n_critic, lr_g, lr_d, betas, clip_norm,
            lr_final_factor, seed, opponent_name="critic",
            generator=generator, opponent_network=critic,
            generator_optimizer=generator_optimizer, opponent_optimizer=critic_optimizer,
            generator_lr_scheduler=generator_lr_scheduler, opponent_lr_scheduler=critic_lr_scheduler,
        )  # fmt: skip
        self.save_hyperparameters(ignore=self._live_arguments)
        self.divergence = divergence
        self.val_bound, self.test_bound = BoundMetric(divergence), BoundMetric(divergence)

    @property
    def discriminator(self):
        """The critic as a GAN discriminator (logits), for ``divergence="js"`` only."""
        if self.divergence != "js":
            raise AttributeError(
                f"FGAN(divergence={self.divergence!r}) has a critic T (use .critic), not a discriminator: "
                "T is not a logit. divergence='js' offers one."
            )
        return self.critic

    def bound(self, real: Tensor, fake: Tensor) -> Tensor:
        """The bound's estimate (nats) from the critic's outputs on data and samples, over the GLOBAL batch
        when several processes train (see :func:`log_mean_exp`)."""
        lme = None
        if self.divergence != "js":
            trainer = self._trainer
            world = trainer.world_size if trainer is not None else 1
            lme = log_mean_exp(fake, self.all_gather if world > 1 else None, world)
        return variational_bound(self.divergence, real, fake, lme)

    def objective(self, real: Tensor | None, fake: Tensor, player: Literal["opponent", "generator"]):
        bound = self.bound(real, fake)
        if player == "opponent":
            return -bound, {"bound": bound.detach()}
        return bound, {}

    def validation_scores(self, real: Tensor, fake: Tensor, stage: str = "val") -> None:
        metric = self.test_bound if stage == "test" else self.val_bound
        metric.update(real, fake)
        self.log(f"{stage}/bound", metric, prog_bar=stage == "val")
