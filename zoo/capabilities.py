"""Capabilities: the small protocols callbacks ask for instead of concrete classes.

A family offers a capability by having the method; nothing needs to inherit from these. Callbacks check
with :func:`require`, which names the missing method in its error, so attaching a diagnostic to a module
that cannot serve it fails at once and clearly.

===================  =============================================  =====================================
capability           methods                                        used by
===================  =============================================  =====================================
LatentVariableModel  ``log_importance_weights(x, k) -> [k, B]``,     ELBO-gap monitor, IWAE likelihoods
                     ``elbo(x) -> [B]``, ``sample(n)``
DiscriminatedModel   ``discriminator(x) -> logits``, ``sample(n)``  divergence (JSD) estimator
CriticModel          ``critic(x) -> T``, ``sample(n)``              divergence (KL bounds) estimator
Game                 ``game(batch) -> [(loss_i, params_i), ...]``   eigenvalue tracker (game Jacobian)
SingleObjective      ``training_loss(batch) -> scalar``             eigenvalue tracker (loss Hessian)
Samplable            ``sample(n)``                                  sample grids, quality metrics
ExactLikelihood      ``log_prob(x) -> [B]``                          checks of bounds against the truth
===================  =============================================  =====================================
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Samplable(Protocol):
    def sample(self, n: int, generator=None) -> Tensor: ...


@runtime_checkable
class LatentVariableModel(Protocol):
    def log_importance_weights(self, x: Tensor, k: int, generator=None) -> Tensor: ...

    def elbo(self, x: Tensor) -> Tensor: ...

    def sample(self, n: int, generator=None) -> Tensor: ...


@runtime_checkable
class DiscriminatedModel(Protocol):
    def discriminator(self, x: Tensor) -> Tensor: ...

    def sample(self, n: int, generator=None) -> Tensor: ...


@runtime_checkable
class CriticModel(Protocol):
    """A critic T(x) of an f-divergence bound (f-GAN / NWJ / Donsker-Varadhan), in nats."""

    def critic(self, x: Tensor) -> Tensor: ...

    def sample(self, n: int, generator=None) -> Tensor: ...


@runtime_checkable
class Game(Protocol):
    """A differentiable game: ``game(batch)`` returns one ``(loss_i, params_i)`` pair per player, where player
    i MINIMISES ``loss_i`` over its parameters ``params_i`` (a list of tensors). The losses are built from the
    module's current parameters with a graph, deterministic for a fixed batch (fixed noise), so callers can
    differentiate them twice. The dynamics field is v = (-∇_{θ_i} L_i)_i (simultaneous gradient descent)."""

    def game(self, batch) -> list[tuple[Tensor, list[Tensor]]]: ...


@runtime_checkable
class SingleObjective(Protocol):
    def training_loss(self, batch) -> Tensor: ...


@runtime_checkable
class ExactLikelihood(Protocol):
    def log_prob(self, x: Tensor) -> Tensor: ...


def require(module: object, capability: type, user: str) -> None:
    """Raise a ``TypeError`` naming every method of ``capability`` that ``module`` lacks.

    ``user`` names who needs it (a callback, a function) so the message says what to do.
    """
    members = [m for m in vars(capability) if not m.startswith("_")]
    missing = [m for m in members if not callable(getattr(module, m, None))]
    if missing:
        raise TypeError(
            f"{user} needs a module with the {capability.__name__} capability; "
            f"{type(module).__name__} has no {', '.join(f'`{m}`' for m in missing)}."
        )
