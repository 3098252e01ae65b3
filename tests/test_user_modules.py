"""Issue 17, item 5 (the other direction): genzoo's diagnostics on a user's OWN LightningModule, written
without any genzoo class, that offers the matching capability. (The divergence estimator and the eigenvalue
tracker have theirs in tests/test_divergence.py — ``ShiftGAN``, ``ShiftCritic`` — and tests/test_eigen.py —
``Regression``.)"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal, Normal

from callbacks import ELBOGapMonitor
from datamodules import Toy2D


class LinearGaussianLVM(L.LightningModule):
    """A user's latent-variable model, plain PyTorch: p(z) = N(0, I_1), p(x | z) = N(w z + b, s² I_2),
    q(z | x) = N(aᵀx + c, σ²). Its exact marginal p(x) = N(b, w wᵀ + s² I) is the check."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor([[1.0], [0.5]])), nn.Parameter(torch.zeros(2))
        self.log_s = nn.Parameter(torch.tensor(0.0))
        self.a, self.c = nn.Parameter(torch.tensor([0.3, 0.1])), nn.Parameter(torch.tensor(0.0))
        self.log_sigma = nn.Parameter(torch.tensor(-0.5))

    def _q(self, x: Tensor) -> Normal:
        return Normal(x @ self.a + self.c, self.log_sigma.exp())

    def _log_joint(self, x: Tensor, z: Tensor) -> Tensor:  # z [k, B]
        mean = z[..., None] * self.w[:, 0] + self.b  # [k, B, 2]
        log_px_z = Normal(mean, self.log_s.exp()).log_prob(x).sum(-1)
        return log_px_z + Normal(0.0, 1.0).log_prob(z)

    def log_importance_weights(self, x: Tensor, k: int, generator=None) -> Tensor:
        q = self._q(x)
        eps = torch.randn((k, x.shape[0]), generator=generator, device=x.device, dtype=x.dtype)
        z = q.loc + q.scale * eps
        return self._log_joint(x, z) - q.log_prob(z)

    def elbo(self, x: Tensor) -> Tensor:
        return self.log_importance_weights(x, 1)[0]

    @torch.no_grad()
    def sample(self, n: int, generator=None) -> Tensor:
        z = torch.randn((n, 1), generator=generator)
        return z @ self.w.T + self.b + self.log_s.exp() * torch.randn((n, 2), generator=generator)

    def log_prob(self, x: Tensor) -> Tensor:
        covariance = self.w @ self.w.T + self.log_s.exp() ** 2 * torch.eye(2)
        return MultivariateNormal(self.b, covariance).log_prob(x)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return -self.elbo(batch).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_the_elbo_gap_monitor_runs_on_a_users_own_module_and_brackets_its_exact_log_px(tmp_path) -> None:
    """One epoch on the 2-D moons, then the monitor on 200 held-out points with k = 500: its ELBO <= its
    log p(x) bound <= the exact mean log p(x) of the user's model (up to Monte Carlo noise), and the logged
    gap is the difference of the two."""
    torch.manual_seed(0)
    model = LinearGaussianLVM()
    monitor = ELBOGapMonitor(every_n_epochs=1, n_examples=200, k=500, batch_size=100, plot=False)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[monitor], limit_train_batches=20)  # fmt: skip
    trainer.fit(model, Toy2D("moons", n_train=2560, n_val=200, n_test=200, batch_size=128))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("elbo_gap/")}
    with torch.no_grad():
        exact = float(model.log_prob(monitor.fixed.to(torch.float32)).mean())
    assert math.isfinite(exact)
    assert metrics["elbo_gap/elbo"] < metrics["elbo_gap/log_px"]
    assert metrics["elbo_gap/gap"] == pytest.approx(metrics["elbo_gap/log_px"] - metrics["elbo_gap/elbo"])
    # a lower bound (up to Monte Carlo noise, ESS ~ 496 of 500 here), and k = 500 for a 1-D latent is tight:
    # 0.0003 nats under the exact value when this was written
    assert -0.01 < exact - metrics["elbo_gap/log_px"] < 0.05
