"""VAE and DiscreteVAE with the user's own networks, optimiser and schedule (issue 17): user networks train
under a Trainer with the family's bounds around them, wrong shapes fail at construction naming the role,
the optimiser and schedule given are the ones the Trainer steps, checkpoints reload (from Python with the
networks passed again, from a recipe with no arguments), and the presets are genzoo's earlier networks
(same layers, same initialisation, same state_dict), the conv ones at every size."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR, StepLR
from torch.utils.data import DataLoader

from zoo import VAE, DiscreteVAE
from zoo.gaussian import GaussianHead
from zoo.networks import conv_decoder, conv_encoder, mlp
from zoo.noise import pinned_noise

SHAPE = (1, 4, 4)


class MyEncoder(nn.Module):
    """A user's encoder (not genzoo's): ``[B, *shape] -> [B, features]``; ``extra_dim`` breaks the
    contract."""

    def __init__(self, in_features: int = 16, features: int = 12, extra_dim: bool = False) -> None:
        super().__init__()
        self.linear, self.extra_dim = nn.Linear(in_features, features), extra_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.linear(x.flatten(1)))  # [B, F]
        return h.unsqueeze(-1) if self.extra_dim else h


class MyDecoder(nn.Module):
    """A user's decoder: ``[B, in_features] -> [B, *shape]``; ``flat`` returns ``[B, prod(shape)]``."""

    def __init__(self, in_features: int = 3, shape: list[int] = list(SHAPE), flat: bool = False) -> None:  # noqa: B006
        super().__init__()
        self.shape, self.flat = tuple(shape), flat
        self.hidden, self.out = nn.Linear(in_features, 10), nn.Linear(10, math.prod(shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.out(torch.relu(self.hidden(z)))  # [B, D]
        return out if self.flat else out.unflatten(1, self.shape)


def vae(**kwargs) -> VAE:
    return VAE(shape=SHAPE, latent_dim=3, hidden=(8,), **kwargs)


def discrete_vae(**kwargs) -> DiscreteVAE:
    return DiscreteVAE(shape=SHAPE, n_latents=2, n_categories=3, hidden=(8,), **kwargs)


FAMILIES = {"VAE": (vae, 3), "DiscreteVAE": (discrete_vae, 6)}  # family, decoder input width


def data(n: int = 64) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=torch.Generator().manual_seed(0))


def fit(model: L.LightningModule, folder: Path, steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=folder)  # fmt: skip
    trainer.fit(model, DataLoader(data(), batch_size=16))
    return trainer


def user_networks(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    return MyEncoder(), MyDecoder(in_features=FAMILIES[name][1])


# -- the user's networks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [("VAE", {}), ("VAE", dict(posterior="full", k=3)), ("VAE", dict(estimator="score")),
     ("DiscreteVAE", {}), ("DiscreteVAE", dict(estimator="straight_through", k=3))],
)  # fmt: skip
def test_user_networks_train_under_a_trainer(name: str, kwargs: dict, tmp_path: Path) -> None:
    """Four steps: the loss is finite and every parameter of the user's encoder and decoder moved; the family
    added its head on the user's features (F = 12)."""
    family, _ = FAMILIES[name]
    encoder, decoder = user_networks(name)
    before = {n: p.detach().clone() for n, p in [*encoder.named_parameters(), *decoder.named_parameters()]}
    torch.manual_seed(0)
    model = family(encoder=encoder, decoder=decoder, **kwargs)
    assert model.encoder is encoder and model.decoder is decoder
    head = model.posterior_head.linear if name == "VAE" else model.posterior_head
    assert head.in_features == 12
    trainer = fit(model, tmp_path)
    assert trainer.global_step == 4 and math.isfinite(trainer.callback_metrics["train/loss"].item())
    for n, p in [*encoder.named_parameters(), *decoder.named_parameters()]:
        assert not torch.equal(p, before[n]), f"{n} did not train"
    assert model.elbo(data(8)).isfinite().all()


@pytest.mark.parametrize("name", FAMILIES)
def test_networks_breaking_the_contract_fail_at_construction_naming_the_role(name: str) -> None:
    family, width = FAMILIES[name]
    with pytest.raises(ValueError, match=rf"{name}: the encoder \(MyEncoder\) must map \[B, 1, 4, 4\] to "
                       r"\[B, F\] .*it returned \[2, 12, 1\]"):  # fmt: skip
        family(encoder=MyEncoder(extra_dim=True))
    with pytest.raises(ValueError, match=rf"{name}: the decoder \(MyDecoder\) must map \[B, {width}\] to "
                       r"\[B, 1, 4, 4\] .*it returned \[2, 16\]"):  # fmt: skip
        family(decoder=MyDecoder(in_features=width, flat=True))
    with pytest.raises(
        ValueError, match=rf"the decoder \(MyDecoder\) failed on a dummy input \[B, {width}\]"
    ):
        family(decoder=MyDecoder(in_features=width + 1))


# -- optimiser and schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_the_default_optimiser_is_adam_at_lr_with_no_schedule(name: str, tmp_path: Path) -> None:
    trainer = fit(FAMILIES[name][0](lr=3e-3), tmp_path, steps=1)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 3e-3
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999) and trainer.lr_scheduler_configs == []


@pytest.mark.parametrize(
    "name,scheduler,factor",
    [
        ("VAE", functools.partial(StepLR, step_size=2, gamma=0.5), 0.25),  # halved after steps 2 and 4
        ("DiscreteVAE", functools.partial(LinearLR, start_factor=1.0, end_factor=0.5, total_iters=8), 0.75),
    ],
)
def test_the_given_optimiser_and_schedule_are_what_the_trainer_steps(
    name, scheduler, factor, tmp_path
) -> None:
    """SGD at 0.05 (the family's ``lr=1.0`` ignored), the schedule stepped after each of 4 optimizer steps;
    the DiscreteVAE's temperature annealing runs beside it."""
    annealing = {"temperature_min": 0.5, "anneal_steps": 4} if name == "DiscreteVAE" else {}
    sgd = functools.partial(torch.optim.SGD, lr=0.05)
    model = FAMILIES[name][0](lr=1.0, optimizer=sgd, lr_scheduler=scheduler, **annealing)
    trainer = fit(model, tmp_path)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * factor, rel=1e-12)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    if name == "DiscreteVAE":
        assert trainer.callback_metrics["train/temperature"].item() == pytest.approx(model.temperature(3))
        assert model.temperature(4) == 0.5


# -- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_a_checkpoint_with_user_networks_reloads_with_them_passed_again(name: str, tmp_path: Path) -> None:
    """Live networks and the optimiser are left out of the hyperparameters; reloaded with fresh instances
    of the user's classes, the model has the trained weights and gives the same bounds."""
    family, width = FAMILIES[name]
    encoder, decoder = user_networks(name)
    model = family(encoder=encoder, decoder=decoder, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = fit(model, tmp_path, steps=3)
    path = tmp_path / "user.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["hyper_parameters"]
    assert not {"encoder", "decoder", "optimizer"} & set(saved) and saved["lr_scheduler"] is None
    loaded = type(model).load_from_checkpoint(path, encoder=MyEncoder(), decoder=MyDecoder(in_features=width))
    assert type(loaded.encoder) is MyEncoder and type(loaded.decoder) is MyDecoder
    x, g = data(8), lambda: torch.Generator().manual_seed(5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.iwae_bound(x, 7, g()), model.iwae_bound(x, 7, g()), atol=0, rtol=0)
        z = torch.rand(2, width, generator=g())
        z = z if name == "VAE" else z.view(2, 2, 3)  # DiscreteVAE.decode takes [..., L, C]
        torch.testing.assert_close(loaded.decode(z), model.decode(z), atol=0, rtol=0)


RECIPE = """
model:
  class_path: {family}
  init_args:
    {sizes}
    encoder:
      class_path: test_vae_plugins.MyEncoder
      init_args: {{in_features: 64, features: 12}}
    decoder:
      class_path: test_vae_plugins.MyDecoder
      init_args: {{in_features: {width}, shape: [1, 8, 8]}}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {{lr: 0.05, momentum: 0.5}}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {{step_size: 2, gamma: 0.5}}
data:
  class_path: Digits
  init_args: {{batch_size: 64, binarize: static}}
trainer:
  max_steps: 4
  limit_val_batches: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.mark.slow  # 3-7 s: the first builds the CLI's parser
@pytest.mark.parametrize(
    "name,sizes",
    [("VAE", "latent_dim: 3"), ("DiscreteVAE", "n_latents: 2\n    n_categories: 3")],
    ids=["VAE", "DiscreteVAE"],
)
def test_a_recipe_fills_the_roles_and_its_checkpoint_reloads_with_no_arguments(
    name: str, sizes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``class_path`` / ``init_args`` for encoder, decoder, optimizer and lr_scheduler through ``cli.py``;
    ``load_from_checkpoint(path)`` alone rebuilds the user's networks with the trained weights."""
    from cli import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(family=name, sizes=sizes, width=FAMILIES[name][1]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = run(["fit", "-c", str(recipe), f"--trainer.default_root_dir={tmp_path}"])
    model, (optimizer,) = cli.model, cli.trainer.optimizers
    assert type(model.encoder) is MyEncoder and type(model.decoder) is MyDecoder
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    path = tmp_path / "recipe.ckpt"
    cli.trainer.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path)
    assert type(loaded.encoder) is MyEncoder and type(loaded.decoder) is MyDecoder
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(loaded.elbo(x, g()), model.elbo(x, g()), atol=0, rtol=0)


# -- the family's maths around the user's networks ---------------------------------------------------------


def test_linear_gaussian_log_prob_is_exact_with_a_user_encoder_and_refused_with_a_user_decoder() -> None:
    """log p(x) reads only the linear decoder and the scales: a user encoder leaves it exact (equal to the
    preset model's with the same decoder), a user decoder makes it raise."""
    torch.manual_seed(0)
    preset = VAE(shape=(3,), latent_dim=2, decoder="linear", likelihood="gaussian")
    mine = VAE(shape=(3,), latent_dim=2, decoder="linear", likelihood="gaussian", encoder=MyEncoder(3, 5))
    mine.decoder.load_state_dict(preset.decoder.state_dict())
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mine.log_prob(x), preset.log_prob(x), atol=0, rtol=0)
    with torch.no_grad():  # the bound stays below the truth (mean of 200 draws of L_10, 4 SE of slack)
        bounds = mine.iwae_bound(x.repeat(200, 1), 10, torch.Generator().manual_seed(1)).view(200, 6)
    assert (bounds.mean(0) < mine.log_prob(x) + 4 * bounds.std(0) / math.sqrt(200)).all()
    user = VAE(shape=(3,), latent_dim=2, likelihood="gaussian", decoder=MyDecoder(2, [3]))
    with pytest.raises(NotImplementedError, match=r"preset decoder='linear'.*decoder=MyDecoder"):
        user.log_prob(x)


def test_discrete_vae_with_user_networks_keeps_an_exact_normalised_likelihood() -> None:
    """The enumeration of log p(x) works with any decoder: Σ_x p(x) = 1 over the 64 six-bit vectors (float64,
    1e-12), and the discrete ELBO stays below log p(x)."""
    torch.manual_seed(0)
    model = DiscreteVAE(shape=(6,), n_latents=2, n_categories=4, encoder=MyEncoder(6, 5),
                        decoder=MyDecoder(8, [6])).double()  # fmt: skip
    every = torch.tensor(list(itertools.product((0.0, 1.0), repeat=6)), dtype=torch.float64)
    log_p = model.log_prob(every)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        elbo = model.elbo(every.repeat(500, 1), torch.Generator().manual_seed(0)).view(500, 64)
    assert (elbo.mean(0) < log_p + 4 * elbo.std(0) / math.sqrt(500)).all()


# -- the presets: genzoo's earlier networks, now returning [B, *shape] ------------------------------------


def earlier_vae_networks(decoder: str, shape, latent_dim: int, hidden) -> dict[str, torch.Tensor]:
    """The state_dict genzoo's VAE had before networks became arguments, built in the same order."""
    dim_x = math.prod(shape)
    parts = nn.Module()
    if decoder == "conv":
        parts.encoder, parts.decoder = conv_encoder(shape, hidden[-1]), conv_decoder(latent_dim, shape)
    elif decoder == "mlp":
        parts.encoder = nn.Sequential(nn.Flatten(), mlp(dim_x, hidden[:-1], hidden[-1]), nn.ReLU())
        parts.decoder = mlp(latent_dim, hidden[::-1], dim_x)
    else:
        parts.encoder, parts.decoder = nn.Flatten(), nn.Linear(latent_dim, dim_x)
    features = dim_x if decoder == "linear" else hidden[-1]
    parts.posterior_head = GaussianHead(features, latent_dim, "diagonal")
    return parts.state_dict()


@pytest.mark.parametrize(
    "decoder,shape", [("mlp", (1, 8, 8)), ("conv", (1, 28, 28)), ("linear", (3,)), ("linear", (1, 2, 2))]
)
def test_vae_presets_are_the_earlier_networks_and_return_the_data_shape(decoder: str, shape) -> None:
    """Same seed -> the same state_dict (keys and values) as the earlier flat networks, so old checkpoints
    load; the decoder now returns ``[B, *shape]``, the earlier flat output reshaped."""
    torch.manual_seed(0)
    earlier = earlier_vae_networks(decoder, shape, 4, (32, 16))
    torch.manual_seed(0)
    model = VAE(shape=shape, latent_dim=4, hidden=(32, 16), decoder=decoder)
    assert list(model.state_dict()) == list(earlier)
    for key, value in earlier.items():
        assert torch.equal(model.state_dict()[key], value), key
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    out = model.decoder(z)
    assert out.shape == (5, *shape)
    flat = nn.functional.linear(z, model.decoder.weight, model.decoder.bias) if decoder == "linear" else None
    if flat is not None:
        torch.testing.assert_close(out.flatten(1), flat)


def test_discrete_vae_presets_are_the_earlier_networks() -> None:
    torch.manual_seed(0)
    parts = nn.Module()
    parts.encoder = nn.Sequential(nn.Flatten(), mlp(16, (8,), 6))
    parts.decoder = mlp(6, (8,), 16)
    torch.manual_seed(0)
    model = discrete_vae()
    assert list(model.state_dict()) == list(parts.state_dict())
    for key, value in parts.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.decoder(z), parts.decoder(z).unflatten(1, SHAPE), atol=0, rtol=0)
    model.load_state_dict(parts.state_dict(), strict=True)


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (3, 64, 64)])
def test_conv_vae_builds_and_trains_at_every_size(shape) -> None:
    """decoder="conv" for (C, H, H), H in {16, 32, 64}: a finite ELBO, decoder outputs ``[B, *shape]``, and
    one Adam step lowers the loss on the same batch with the same noise."""
    torch.manual_seed(0)
    model = VAE(shape=shape, latent_dim=4, decoder="conv", hidden=(32,))
    x = torch.bernoulli(torch.full((4, *shape), 0.3), generator=torch.Generator().manual_seed(0))
    assert model.elbo(x).isfinite().all() and model.decode(torch.zeros(2, 4)).shape == (2, *shape)
    optimizer = model.configure_optimizers()
    with pinned_noise(model):
        loss = model.training_loss(x)
    loss.backward()
    optimizer.step()
    with pinned_noise(model), torch.no_grad():
        after = model.training_loss(x)
    assert math.isfinite(loss.item()) and after < loss
