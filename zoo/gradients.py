"""Gradient estimators for expectations over a distribution that depends on the parameters.

For F(θ) = E_{z ~ q_θ}[f(z)] (seed 001, "Score Function Estimator" and "Re-parameterization trick"):

* reparameterisation: z = g(ε, θ) with ε ~ p(ε) fixed, so ∇F = E_ε[∇_θ f(g(ε, θ))]; autograd does it
  when z is built from the noise with ``rsample``-style code;
* score function (REINFORCE): ∇F = E_z[(f(z) - b) ∇_θ log q_θ(z)], unbiased for any baseline b that does
  not depend on z, because E_z[∇_θ log q_θ(z)] = 0; b only lowers the variance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def score_function_surrogate(signal: Tensor, log_prob: Tensor, baseline: Tensor | float = 0.0) -> Tensor:
    """A term that is zero in value and whose gradient is the score-function estimator.

    Returns ``(signal - b) * (log_prob - log_prob.detach())`` (the "magic box" of Foerster et al., 2018):
    adding it to an objective leaves the reported value unchanged and adds ``(f - b) ∇ log q`` to the
    gradient. ``signal`` and ``baseline`` are treated as constants.
    """
    advantage = signal.detach() - (baseline.detach() if isinstance(baseline, Tensor) else baseline)
    return advantage * (log_prob - log_prob.detach())


class MovingAverageBaseline(nn.Module):
    """b ← m·b + (1 - m)·mean(signal): the classic REINFORCE baseline, kept in a buffer (so checkpoints
    hold it). Pass ``reduce`` (e.g. the strategy's all-reduce mean) so every process holds the same b."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline momentum must be in [0, 1); got {momentum}")
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, batch_mean: Tensor) -> None:
        batch_mean = batch_mean.to(self.value.dtype)
        if not bool(self.initialised):
            self.value.copy_(batch_mean)
            self.initialised.fill_(True)
        else:
            self.value.mul_(self.momentum).add_((1.0 - self.momentum) * batch_mean)
