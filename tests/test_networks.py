"""The networks room: every conv preset maps the shapes of its contract at every supported size, the 28x28
presets are the layers genzoo always had, and ``check_role`` / ``zoo.plugins`` fail clearly on bad input."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from zoo.networks import CONV_SIDES, check_conv_image, check_role, conv_decoder, conv_encoder, dummy_batch
from zoo.plugins import adam, build_optimizer, build_scheduler, optimizer_config


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("side", CONV_SIDES)
def test_conv_presets_map_their_contract_at_every_size(side: int, channels: int) -> None:
    shape = (channels, side, side)
    x = torch.rand(2, *shape)
    features = conv_encoder(shape, 10, width=8)(x)
    assert features.shape == (2, 10)
    pixels = conv_decoder(5, shape, width=8)(torch.randn(2, 5))
    assert pixels.shape == (2, channels * side * side)
    # and the decoder's gradient reaches its first layer (no dead end in the stack)
    decoder = conv_decoder(5, shape, width=8)
    decoder(torch.randn(2, 5)).sum().backward()
    assert decoder[0].weight.grad.abs().sum() > 0


def test_the_28x28_presets_are_the_layers_genzoo_always_had() -> None:
    """Same modules, state_dict keys and shapes as before the other sizes existed (old checkpoints load)."""
    encoder, decoder = conv_encoder((1, 28, 28), 16, width=32), conv_decoder(16, (1, 28, 28), width=32)
    assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {
        "0.weight": (32, 1, 4, 4), "0.bias": (32,), "2.weight": (64, 32, 4, 4), "2.bias": (64,),
        "5.weight": (16, 64 * 7 * 7), "5.bias": (16,),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == {
        "0.weight": (64 * 7 * 7, 16), "0.bias": (64 * 7 * 7,), "3.weight": (64, 32, 4, 4), "3.bias": (32,),
        "5.weight": (32, 1, 4, 4), "5.bias": (1,),
    }  # fmt: skip


@pytest.mark.parametrize("shape", [(3, 20, 20), (3, 32, 16), (2,), (1, 8, 8), (128,)])
def test_unsupported_image_sizes_fail_naming_the_sizes(shape) -> None:
    with pytest.raises(
        ValueError, match=r"needs images of shape \(C, H, W\) with H = W in \{16, 28, 32, 64\}"
    ):
        check_conv_image(shape, "decoder='conv'", "decoder='mlp'")


def test_check_role_returns_the_output_and_names_what_was_wrong() -> None:
    shape = (1, 8, 8)
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    assert check_role("VAE", "encoder", good, [dummy_batch(shape)], ("B", "F")).shape == (2, 7)
    wrong = nn.Linear(8, 3)  # applied to the last axis: [2, 1, 8, 3]
    with pytest.raises(ValueError, match=r"VAE: the encoder \(Linear\) must map \[B, 1, 8, 8\] to \[B, F\].*"
                       r"returned \[2, 1, 8, 3\]"):  # fmt: skip
        check_role("VAE", "encoder", wrong, [dummy_batch(shape)], ("B", "F"))
    broken = nn.Linear(5, 3)
    message = r"GAN: the discriminator \(Linear\) failed on a dummy input \[B, 1, 8, 8\]"
    with pytest.raises(ValueError, match=message + r".*to \[B\] or \[B, 1\].*It raised RuntimeError"):
        check_role("GAN", "discriminator", broken, [dummy_batch(shape)], ("B",), ("B", 1))
    with pytest.raises(TypeError, match=r"decoder must be a torch\.nn\.Module; got function"):
        check_role("VAE", "decoder", lambda z: z, [torch.zeros(2, 3)], ("B", 3))


def test_check_role_leaves_the_network_in_its_mode_and_its_statistics_untouched() -> None:
    network = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = network[2].running_mean.clone()
    check_role("Set2Model", "embedding", network, [dummy_batch((4,))], ("B", 3))
    assert network.training and torch.equal(network[2].running_mean, before)


def test_optimiser_and_schedule_callables() -> None:
    model = nn.Linear(2, 1)
    optimizer = build_optimizer(model, model.parameters(), None, adam(0.01, (0.5, 0.9)))
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["betas"] == (0.5, 0.9)
    sgd = build_optimizer(model, model.parameters(), functools.partial(torch.optim.SGD, lr=0.1), adam(0.01))
    assert isinstance(sgd, torch.optim.SGD)
    with pytest.raises(TypeError, match=r"optimizer must be a callable params -> torch\.optim\.Optimizer"):
        build_optimizer(model, model.parameters(), lambda params: "adam", adam(0.01))
    assert optimizer_config(sgd, None) is sgd
    step = build_scheduler(
        sgd, functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "x"
    )
    assert optimizer_config(sgd, step)["lr_scheduler"] == {"scheduler": step, "interval": "step"}
    plateau = build_scheduler(sgd, torch.optim.lr_scheduler.ReduceLROnPlateau, "x")
    assert optimizer_config(sgd, plateau)["lr_scheduler"]["monitor"] == "train/loss"
    with pytest.raises(
        TypeError, match="lr_scheduler must be a callable optimizer -> learning-rate scheduler"
    ):
        build_scheduler(sgd, lambda opt: 3, "lr_scheduler")


def test_an_optimiser_that_needs_the_model_is_bound_to_it() -> None:
    class NeedsModel(torch.optim.SGD):
        model = None

        def bind_model(self, module) -> None:
            self.model = module

    model = nn.Linear(2, 1)
    built = build_optimizer(model, model.parameters(), functools.partial(NeedsModel, lr=0.1), adam(0.01))
    assert built.model is model
