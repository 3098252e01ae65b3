"""One contract over every family configuration in the zoo (sample shapes, a gradient on every parameter,
determinism given a generator, checkpoint round-trip, float64). Family maths lives in its own test file;
add every new family here."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from zoo import VAE
from zoo.capabilities import LatentVariableModel, Samplable, SingleObjective, require

FAMILIES = {
    "vae-mlp-bernoulli": lambda: VAE(shape=(1, 8, 8), latent_dim=4, hidden=(32, 32)),
    "iwae-conv-full": lambda: VAE(shape=(1, 28, 28), latent_dim=3, decoder="conv", posterior="full", k=3,
                                  hidden=(32,)),
    "vae-linear-gaussian": lambda: VAE(shape=(3,), latent_dim=2, decoder="linear", likelihood="gaussian"),
    "vae-score": lambda: VAE(shape=(5,), latent_dim=2, hidden=(16,), estimator="score", k=2),
}  # fmt: skip


def batch_for(model, n: int = 6) -> torch.Tensor:
    return torch.rand(n, *model.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=sorted(FAMILIES), ids=str)
def model(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]()


def test_capabilities(model) -> None:
    for capability in (Samplable, LatentVariableModel, SingleObjective):
        require(model, capability, "the contract")


def test_samples_have_the_data_shape_and_follow_the_generator(model) -> None:
    a = model.sample(7, generator=torch.Generator().manual_seed(1))
    b = model.sample(7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (7, *model.shape) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(7, generator=torch.Generator().manual_seed(2)))


def test_every_parameter_gets_a_finite_gradient(model) -> None:
    model.training_loss(batch_for(model)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_bounds_are_deterministic_given_a_generator_and_agree_in_float64(model) -> None:
    x = batch_for(model)
    first = model.log_importance_weights(x, 4, generator=torch.Generator().manual_seed(3))
    again = model.log_importance_weights(x, 4, generator=torch.Generator().manual_seed(3))
    assert first.shape == (4, len(x)) and torch.equal(first, again)
    double = model.double().log_importance_weights(x.double(), 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(double.float(), first, atol=1e-3, rtol=1e-4)


def test_checkpoint_round_trip(model, tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = type(model).load_from_checkpoint(path)
    x = batch_for(model)
    for m in (model, restored):
        m.eval()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(model.log_importance_weights(x, 3, g()), restored.log_importance_weights(x, 3, g()))
