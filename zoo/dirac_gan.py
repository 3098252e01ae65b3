"""The Dirac-GAN: the smallest GAN whose training dynamics can be solved by hand (Mescheder, Geiger & Nowozin
2018, "Which training methods for GANs do actually converge?", section 2; seed 002, Q5).

Data p_D = δ_{x0} (``datamodules.Dirac``, x0 = 0 in the seed), generator p_θ = δ_θ, linear critic
C_ψ(x) = ψ0 x + ψ1, the standard (Jensen-Shannon) GAN value

.. math::  \\mathcal{L}(ψ, θ) = E_{p_D} \\log σ(C_ψ(x)) + E_{p_θ} \\log σ(-C_ψ(x)),

the critic MINIMISES -L + (γ/2) R1 with R1 = E_{p_D} ||∇_x C_ψ(x)||² = ψ0², the generator MINIMISES L (the
seed's saturating form). The dynamics field v = (-∇_ψ(-L + γ/2 R1), -∇_θ L), in the order (ψ0, ψ1, θ), is

.. math::  v = \\big(x_0 σ(-C(x_0)) - θ σ(C(θ)) - γ ψ0,\\; σ(-C(x_0)) - σ(C(θ)),\\; ψ0 σ(C(θ))\\big),

which for x0 = 0 is the seed's v = (-θσ(C(θ)) - γψ0, σ(-ψ1) - σ(C(θ)), ψ0σ(C(θ))). Its only stationary
point is (0, 0, x0); there the Jacobian is J* = [[-γ, 0, -1/2], [0, -1/2, 0], [1/2, 0, 0]] with eigenvalues
{-1/2, ±i/2} for γ = 0 (a centre: the iterates circle) and {-1/2, (-γ ± sqrt(γ² - 1))/2} for γ > 0 (all real
parts negative: locally convergent).

Training takes simultaneous gradient steps, θ_{k+1} = θ_k + lr · v(θ_k) for all three parameters at once (the
explicit Euler discretisation of the dynamics, plain SGD), with Lightning's manual optimisation. Euler on a
centre multiplies the distance to the equilibrium by |1 + lr·i/2| = sqrt(1 + lr²/4) > 1 per step near it, so
without the penalty the iterates spiral slowly OUTWARD; with γ > 0 they converge.

Another discretisation is an ``optimizer`` (any ``torch.optim`` rule applied to the same simultaneous
gradients -v): heavy-ball momentum, Adam, extrapolation-free variants, ...; an ``lr_scheduler``
changes the step size per step. The field, its Jacobian and ``game`` do not depend on either; only the
trajectory does (Euler's closed-form behaviour above holds for the default, plain SGD at a constant ``lr``).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.guards import check_data, check_finite
from zoo.plugins import (
    LRSchedulerCallable,
    OptimizerCallable,
    build_optimizer,
    build_scheduler,
    live_arguments,
)
from zoo.strategies import check_strategy


def log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x) = -softplus(-x), stable for any x (RELIABILITY.md #23).

    Not ``F.logsigmoid``: on the CPU with more than one thread its kernel opens an OpenMP region at every
    call, ~130x slower on tiny tensors (seen 260 µs against 2 µs for 16 numbers, milliseconds on a busy
    machine). softplus is exact to e^-50 relative with ``threshold=50`` (the default 20 would cost 2e-9).
    """
    return -F.softplus(-x, threshold=50.0)


def dirac_gan_field(
    psi0: float | Tensor, psi1: float | Tensor, theta: float | Tensor, gamma: float = 0.0, loc: float = 0.0
) -> Tensor:
    """The closed-form dynamics field v(ψ0, ψ1, θ) of the Dirac-GAN, ``Tensor[3]`` in the order (ψ0, ψ1, θ).

    ``loc`` is the data point x0 (seed 002 Q5 has x0 = 0, where this is the seed's formula); ``gamma`` the R1
    weight (the critic's loss gets γ/2 · ψ0²). Differentiable in its tensor arguments.

    Example:
        >>> dirac_gan_field(0.0, 0.0, 1.0)  # generator at 1, blank critic: only ψ0 moves
        tensor([-0.5000,  0.0000,  0.0000])
    """
    given = [t for t in (psi0, psi1, theta) if isinstance(t, Tensor)]
    dtype = given[0].dtype if given else torch.get_default_dtype()
    for t in given[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    psi0, psi1, theta = (torch.as_tensor(t).to(dtype) for t in (psi0, psi1, theta))
    c_fake = psi0 * theta + psi1  # C(θ)
    c_real = psi0 * loc + psi1  # C(x0)
    return torch.stack(
        [
            loc * torch.sigmoid(-c_real) - theta * torch.sigmoid(c_fake) - gamma * psi0,
            torch.sigmoid(-c_real) - torch.sigmoid(c_fake),
            psi0 * torch.sigmoid(c_fake),
        ]
    )


class DiracGAN(L.LightningModule):
    """The Dirac-GAN of seed 002 Q5 as a LightningModule: scalar parameters ``psi0``, ``psi1``, ``theta``.

    Args:
        gamma: R1 weight γ >= 0 (the critic's loss gets γ/2 · E_pD ||∇_x C||²); 0 is the unregularised game.
        theta: initial generator position θ (the generator is the point mass δ_θ).
        psi0: initial critic slope ψ0.
        psi1: initial critic offset ψ1.
        lr: step size of the simultaneous (plain SGD) gradient steps, the Euler step of the dynamics (the
            default optimiser's shorthand: ignored when ``optimizer`` is given).
        shape: shape of one example, linked from the datamodule by the CLI; must be ``(1,)``.
        plot_every_n_epochs: log the trajectory picture every this many epochs (0: only when fit ends).
        optimizer: a callable ``params -> Optimizer`` over (ψ0, ψ1, θ) together, applied to the simultaneous
            gradients (e.g. ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5)``, heavy ball); None:
            ``SGD(lr)``, the Euler step.
        lr_scheduler: a callable ``optimizer -> scheduler``, stepped after every step; None: constant.

    Offers ``game(batch)`` (the ``Game`` capability), ``vector_field(batch)``, ``discriminator(x)`` (the
    critic's logit) and ``sample(n)``. Logs ``train/theta``, ``train/psi0``, ``train/psi1`` (the point where
    the step's gradients were taken), ``train/distance`` (its distance to the equilibrium (0, 0, x0), x0 the
    data point) and ``train/value`` (L there; the critic's loss is -L + γ/2 ψ0², the generator's L). The
    iterates are recorded (``trajectory``, saved in checkpoints) and drawn on rank 0: θ against ψ0, and the
    distance per step.

    Example:
        >>> model = DiracGAN(gamma=1.0)
        >>> model.vector_field()  # at (ψ0, ψ1, θ) = (0, 0, 1), data at 0
        tensor([-0.5000,  0.0000,  0.0000])
    """

    def __init__(
        self,
        gamma: float = 0.0,
        theta: float = 1.0,
        psi0: float = 0.0,
        psi1: float = 0.0,
        lr: float = 0.1,
        shape: Sequence[int] = (1,),
        plot_every_n_epochs: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if shape != (1,):
            raise ValueError(
                f"DiracGAN works on 1-D data of shape (1,) (datamodules.Dirac); got shape={shape}"
            )
        if not gamma >= 0:
            raise ValueError(f"gamma (the R1 weight) must be >= 0; got {gamma}")
        if not lr > 0:
            raise ValueError(f"lr must be positive; got {lr}")
        if plot_every_n_epochs < 0:
            raise ValueError(
                f"plot_every_n_epochs must be >= 0 (0: only at the end); got {plot_every_n_epochs}"
            )
        for name, value in (("theta", theta), ("psi0", psi0), ("psi1", psi1)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value}")
        self.save_hyperparameters(ignore=live_arguments(optimizer=optimizer, lr_scheduler=lr_scheduler))
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        self.automatic_optimization = False
        self.shape, self.gamma, self.lr, self.plot_every_n_epochs = (
            shape,
            float(gamma),
            lr,
            plot_every_n_epochs,
        )
        self.psi0 = nn.Parameter(torch.tensor(float(psi0)))
        self.psi1 = nn.Parameter(torch.tensor(float(psi1)))
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.trajectory: list[tuple[float, float, float]] = []  # iterate k after k steps: (ψ0, ψ1, θ)
        self.loc = 0.0  # the data point x0, read from the training batches
        self._plotted_step = -1

    # -- the game ---------------------------------------------------------------------------------------

    def critic(self, x: Tensor, psi0: Tensor | None = None, psi1: Tensor | None = None) -> Tensor:
        """C_ψ(x) = ψ0 x + ψ1 for ``x [B, 1]``: ``[B]`` logits."""
        psi0 = self.psi0 if psi0 is None else psi0
        psi1 = self.psi1 if psi1 is None else psi1
        return psi0 * x[:, 0].to(psi0.dtype) + psi1  # a 0-dim float64 ψ would not promote float32 data

    def discriminator(self, x: Tensor) -> Tensor:
        """The critic's logit C_ψ(x), ``[B]`` (the ``DiscriminatedModel`` capability)."""
        return self.critic(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from p_θ = δ_θ: ``[n, 1]`` copies of θ (``generator`` accepted for the common API)."""
        return self.theta.detach().expand(n, 1).clone()

    def value(self, real: Tensor, psi0: Tensor, psi1: Tensor, theta: Tensor) -> Tensor:
        """L = mean log σ(C(x_real)) + log σ(-C(θ)), finite for any logit (:func:`log_sigmoid`)."""
        fake = theta.expand(real.shape[0], 1)  # the generator's samples: the point mass at θ
        return (
            log_sigmoid(self.critic(real, psi0, psi1)).mean()
            + log_sigmoid(-self.critic(fake, psi0, psi1)).mean()
        )

    def r1(self, real: Tensor, psi0: Tensor, psi1: Tensor) -> Tensor:
        """R1 = E_pD ||∇_x C_ψ(x)||² (= ψ0²) by autograd w.r.t. the INPUTS, differentiable in ψ (RELIABILITY
        #1: no ``backward(create_graph=True)``)."""
        x = real.detach().to(psi0.dtype).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(x, psi0, psi1).sum(), x, create_graph=True)
        return grad.pow(2).sum(1).mean()

    def losses(self, real: Tensor, simultaneous: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(critic_loss, generator_loss, L)``: -L + γ/2 R1 and L.

        ``simultaneous=True`` detaches the other player in each loss, so ONE backward of their sum puts
        ∂critic_loss/∂ψ on ψ and ∂generator_loss/∂θ on θ: both gradients taken at the same point.
        """
        psi0, psi1, theta = self.psi0, self.psi1, self.theta
        critic_theta = theta.detach() if simultaneous else theta
        critic_loss = -self.value(real, psi0, psi1, critic_theta)
        if self.gamma > 0:
            critic_loss = critic_loss + 0.5 * self.gamma * self.r1(real, psi0, psi1)
        if simultaneous:
            generator_loss = self.value(real, psi0.detach(), psi1.detach(), theta)
        else:
            generator_loss = self.value(real, psi0, psi1, theta)
        return critic_loss, generator_loss, generator_loss.detach()

    def game(self, batch: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        """The ``Game`` capability: ``[(-L + γ/2 R1, [psi0, psi1]), (L, [theta])]``, each minimised by its
        player, with a graph through both players (differentiable twice)."""
        critic_loss, generator_loss, _ = self.losses(batch)
        return [(critic_loss, [self.psi0, self.psi1]), (generator_loss, [self.theta])]

    def vector_field(self, batch: Tensor | None = None, create_graph: bool = False) -> Tensor:
        """v = (-∇_ψ critic_loss, -∇_θ generator_loss) by autograd, ``Tensor[3]`` in the order (ψ0, ψ1, θ).

        ``batch=None`` uses the seed's data, one point at x0 = 0. ``create_graph=True`` keeps the graph (for
        the Jacobian).
        """
        if batch is None:
            batch = torch.zeros(1, 1, dtype=self.theta.dtype, device=self.theta.device)
        with torch.enable_grad():
            pieces = []
            for loss, params in self.game(batch):
                grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
                for g, p in zip(grads, params, strict=True):
                    pieces.append(0.0 - (g if g is not None else torch.zeros_like(p)))  # +0.0 where g = 0
        field = torch.stack(pieces)
        return field if create_graph else field.detach()

    def point(self) -> Tensor:
        """The current (ψ0, ψ1, θ), detached, ``Tensor[3]``."""
        return torch.stack([self.psi0, self.psi1, self.theta]).detach()

    def distance(self, point: Tensor | None = None) -> Tensor:
        """Euclidean distance of ``point`` (default: the current one) to the equilibrium (0, 0, x0)."""
        point = self.point() if point is None else point
        return torch.linalg.vector_norm(point - point.new_tensor([0.0, 0.0, self.loc]))

    # -- training -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None:  # manual optimisation: no FSDP (zoo/strategies.py)
            check_strategy(self, self._trainer.strategy)

    def on_fit_start(self) -> None:
        if not self.trajectory:
            self.trajectory.append(tuple(self.point().tolist()))

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        check_data(self, batch, "real")
        self.loc = float(batch[0, 0])  # the Dirac's point (every example is the same)
        optimizer = self.optimizers()
        point = self.point()
        critic_loss, generator_loss, value = self.losses(batch, simultaneous=True)
        check_finite(self, "critic_loss", critic_loss, batch_idx)
        check_finite(self, "generator_loss", generator_loss, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(critic_loss + generator_loss)  # one backward: every parameter, DDP-safe
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.trajectory.append(tuple(self.point().tolist()))
        psi0, psi1, theta = point.tolist()
        logs = {"theta": theta, "psi0": psi0, "psi1": psi1, "distance": self.distance(point), "value": value}
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """``test/value`` (L at the current point on the test data, nats) and ``test/distance`` (to the
        equilibrium (0, 0, x0), x0 the test data's point)."""
        with torch.no_grad():
            value = self.value(batch, self.psi0, self.psi1, self.theta)
        point = self.point()
        distance = torch.linalg.vector_norm(point - point.new_tensor([0.0, 0.0, float(batch[0, 0])]))
        self.log("test/value", value, batch_size=batch.shape[0], sync_dist=True)
        self.log("test/distance", distance, batch_size=batch.shape[0], sync_dist=True)

    def configure_optimizers(self):
        # Default, plain SGD on all three parameters: with the gradients of the simultaneous step this is
        # x_{k+1} = x_k + lr · v(x_k), the explicit Euler step of the dynamics.
        euler = functools.partial(torch.optim.SGD, lr=self.lr)
        params = [self.psi0, self.psi1, self.theta]
        optimizer = build_optimizer(self, params, self._optimizer_callable, euler)
        scheduler = build_scheduler(optimizer, self._lr_scheduler_callable, "lr_scheduler", "DiracGAN")
        return optimizer if scheduler is None else ([optimizer], [scheduler])

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        if self.plot_every_n_epochs and epoch % self.plot_every_n_epochs == 0:
            self._draw()

    def on_train_end(self) -> None:
        self._draw()

    def _draw(self) -> None:
        """Log the trajectory picture on rank 0 (once per step; no collective in here)."""
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.sanity_checking or self._plotted_step == trainer.global_step:
            return
        from callbacks.run import log_image

        self._plotted_step = trainer.global_step
        rule = f"lr={self.lr:g}" if self._optimizer_callable is None else type(trainer.optimizers[0]).__name__
        caption = f"γ={self.gamma:g}, {rule}, step {trainer.global_step}"
        log_image(
            trainer, "dirac_gan/trajectory", trajectory_plot(self.trajectory_tensor(), self.loc, caption)
        )

    # -- the trajectory, saved with the weights --------------------------------------------------------

    def trajectory_tensor(self) -> Tensor:
        """The recorded iterates ``[steps + 1, 3]`` (ψ0, ψ1, θ), float64; row k is the point after k steps."""
        return torch.tensor(self.trajectory, dtype=torch.float64).reshape(-1, 3)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dirac_gan"] = {"trajectory": self.trajectory_tensor(), "loc": self.loc}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("dirac_gan")
        if state is not None:
            self.trajectory = [tuple(row) for row in state["trajectory"].tolist()]
            self.loc = float(state["loc"])


def trajectory_plot(trajectory: Tensor, loc: float = 0.0, title: str = ""):
    """Two panels as a PIL image: θ against ψ0 (the plane where the game rotates) and the distance to the
    equilibrium (0, 0, x0) per step (log scale). ``trajectory [N, 3]`` in the order (ψ0, ψ1, θ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    points = trajectory.detach().double().cpu()
    distance = torch.linalg.vector_norm(points - points.new_tensor([0.0, 0.0, loc]), dim=1).numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100)
    left.plot(points[:, 0].numpy(), points[:, 2].numpy(), lw=0.8, c="tab:blue")
    left.scatter(points[:1, 0].numpy(), points[:1, 2].numpy(), c="tab:green", s=20, zorder=3, label="start")
    left.scatter(points[-1:, 0].numpy(), points[-1:, 2].numpy(), c="tab:red", s=20, zorder=3, label="end")
    left.scatter([0.0], [loc], marker="x", c="k", s=30, zorder=3, label="equilibrium")
    left.set_xlabel("ψ0 (critic slope)")
    left.set_ylabel("θ (generator)")
    left.set_aspect("equal", adjustable="datalim")
    left.legend(fontsize=7, loc="upper right")
    right.semilogy(range(len(distance)), distance.clip(min=1e-300), c="tab:blue")
    right.set_xlabel("step")
    right.set_ylabel("distance to (0, 0, x0)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
