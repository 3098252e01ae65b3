"""The pixel convention for likelihoods on discrete data (zoo.pixels): dequantisation and bits per dimension.

Known answers: a uniform model of 8-bit data is 8 bits/dim, as a categorical over the 256 levels and as a
uniform density on the dequantisation cells; a density's dequantised bits/dim bound the exact discrete
bits/dim from above (Jensen) and meet them when the density is flat over each cell; the families log
``val/bpd`` by that convention, and the CLI hands them the datamodule's ``levels``.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.distributions import Normal
from zuko.distributions import BoxUniform
from zuko.lazy import UnconditionalDistribution

from zoo import VAE, Diffusion, DiscreteVAE, Flow
from zoo.noise import pinned_noise
from zoo.pixels import bits_per_dim, dequantize, dequantize_eval, dequantize_train, from_logit, to_logit

F64 = torch.float64
QUIET = dict(
    accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
)  # fmt: skip


def grid(levels: int, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``n`` examples of ``dim`` pixels on the grid k / (levels - 1), float64."""
    k = torch.randint(0, levels, (n, dim), generator=torch.Generator().manual_seed(seed))
    return k.to(F64) / (levels - 1)


def test_uniform_categorical_is_eight_bits_per_dim() -> None:
    dim = 784
    log_p = torch.full((3,), -dim * math.log(256.0), dtype=F64)  # P(k) = 256^-D
    torch.testing.assert_close(bits_per_dim(log_p, dim), torch.full((3,), 8.0, dtype=F64))


def test_uniform_density_on_the_cells_is_eight_bits_per_dim() -> None:
    """The union of the 256 cells of width h = 1/255 centred on k/255 is [-h/2, 1 + h/2]: a uniform density
    there has log p = -D log(1 + h), and its dequantised bits/dim are exactly log2 256 = 8."""
    dim, levels = 12, 256
    h = 1.0 / (levels - 1)
    uniform = BoxUniform(torch.full((dim,), -h / 2, dtype=F64), torch.full((dim,), 1 + h / 2, dtype=F64))
    y = dequantize(grid(levels, 64, dim), levels, torch.rand(64, dim, dtype=F64))
    log_p = uniform.log_prob(y)
    assert torch.isfinite(log_p).all()  # every dequantised point lies inside the support
    torch.testing.assert_close(
        bits_per_dim(log_p, dim, levels, dequantized=True), torch.full((64,), 8.0, dtype=F64)
    )


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantize_fills_each_cell_around_its_level(levels: int) -> None:
    x = grid(levels, 200, 5)
    h = 1.0 / (levels - 1)
    u = torch.rand(200, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = dequantize(x, levels, u)
    assert ((y - x).abs() <= h / 2).all()
    torch.testing.assert_close(torch.round(y * (levels - 1)) / (levels - 1), x)  # the level is recovered
    torch.testing.assert_close(dequantize(x, levels, torch.full_like(x, 0.5)), x)  # u = 1/2: the centre
    torch.testing.assert_close(dequantize(x, levels, torch.zeros_like(x)), x - h / 2)


def test_dequantised_bits_bound_the_exact_discrete_bits() -> None:
    """A 1-D Gaussian density p, and its discretisation P(k) = ∫_cell p: E_u[dequantised bpd] >= exact bpd
    (Jensen), and the gap shrinks like the curvature of log p over a cell (wide Gaussian: < 1e-4 bits)."""
    levels = 8
    h = 1.0 / (levels - 1)
    k = torch.arange(levels, dtype=F64)
    x = k / (levels - 1)
    u = (torch.arange(4000, dtype=F64) + 0.5) / 4000  # midpoint rule over the cell
    for scale, gap_at_most in ((0.15, 1.0), (5.0, 1e-4)):  # narrow: up to 0.77 bits on the tails
        p = Normal(torch.tensor(0.4, dtype=F64), torch.tensor(scale, dtype=F64))
        exact = torch.log(p.cdf(x + h / 2) - p.cdf(x - h / 2))  # log P(k), [levels]
        y = dequantize(x[:, None], levels, u[None, :])  # [levels, 4000]
        dequantised = bits_per_dim(p.log_prob(y), 1, levels, dequantized=True).mean(1)
        gap = dequantised - bits_per_dim(exact, 1)
        assert (gap >= 0).all() and gap.max() < gap_at_most, (scale, gap)


def test_bits_of_a_dequantised_density_need_levels() -> None:
    with pytest.raises(ValueError, match="needs the number of levels"):
        bits_per_dim(torch.zeros(2), 4, None, dequantized=True)


@pytest.mark.parametrize("family", [VAE, Flow, DiscreteVAE, Diffusion])
@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_levels_must_be_an_integer_of_at_least_two(family, bad) -> None:
    with pytest.raises(ValueError, match=f"{family.__name__}: levels={bad!r}"):
        family(shape=(4,), levels=bad)


def test_dequantisation_noise_is_keyed_like_the_rest_of_genzoo() -> None:
    """Training noise: fresh per call outside a Trainer (repeatable under manual_seed); evaluation noise: a
    function of (seed, batch_idx) and the example's global position, the same on every call and shard."""
    model = VAE(shape=(6,), likelihood="gaussian", levels=256, hidden=(8,))
    x = grid(256, 4, 6).float()
    torch.manual_seed(0)
    a, b = dequantize_train(model, x, 256, 3), dequantize_train(model, x, 256, 3)
    torch.manual_seed(0)
    assert not torch.equal(a, b) and torch.equal(dequantize_train(model, x, 256, 3), a)
    e1, e2 = dequantize_eval(model, x, 256, 3, batch_idx=0), dequantize_eval(model, x, 256, 3, batch_idx=0)
    assert torch.equal(e1, e2) and not torch.equal(e1, dequantize_eval(model, x, 256, 3, batch_idx=1))


def uniform_on_cells(dim: int, levels: int) -> UnconditionalDistribution:
    h = 1.0 / (levels - 1)
    return UnconditionalDistribution(
        BoxUniform, torch.full((dim,), -h / 2), torch.full((dim,), 1 + h / 2), buffer=True
    )


def validate(model: L.LightningModule, x: torch.Tensor) -> dict[str, float]:
    trainer = L.Trainer(**QUIET)
    (out,) = trainer.validate(model, torch.utils.data.DataLoader(x, batch_size=8), verbose=False)
    return out


def test_a_flow_that_is_uniform_on_the_cells_logs_eight_bits_per_dim() -> None:
    dim = 6
    model = Flow(shape=(dim,), flow=uniform_on_cells(dim, 256), levels=256, logit_alpha=None)
    out = validate(model, grid(256, 24, dim).float())
    assert out["val/bpd"] == pytest.approx(8.0, abs=1e-5)
    assert out["val/nll"] == pytest.approx(dim * math.log(256 / 255), rel=1e-4)  # -log p = D log(1 + h)


def test_the_vae_reports_the_iwae_bound_in_bits() -> None:
    """Gaussian likelihood on 8-bit data: bpd = (-iwae / D + ln 255) / ln 2 of the bound on dequantised data;
    Bernoulli on binary data: bpd = -iwae / (D ln 2); Bernoulli on 8-bit grey levels (not a distribution over
    them) and continuous data (levels None): no bpd."""
    dim = 6
    torch.manual_seed(0)
    gaussian = VAE(shape=(dim,), latent_dim=2, likelihood="gaussian", hidden=(8,), eval_k=4, levels=256)
    out = validate(gaussian, grid(256, 24, dim).float())
    assert out["val/bpd"] == pytest.approx((-out["val/iwae"] / dim + math.log(255)) / math.log(2), rel=1e-5)
    binary = VAE(shape=(dim,), latent_dim=2, hidden=(8,), eval_k=4, levels=2)
    out = validate(binary, grid(2, 24, dim).float())
    assert out["val/bpd"] == pytest.approx(-out["val/iwae"] / (dim * math.log(2)), rel=1e-5)
    for model in (VAE(shape=(dim,), hidden=(8,), eval_k=4, levels=256), VAE(shape=(dim,), hidden=(8,))):
        assert "val/bpd" not in validate(model, grid(256, 8, dim).float())
    discrete = DiscreteVAE(shape=(dim,), n_latents=2, n_categories=2, hidden=(8,), eval_k=4, levels=2)
    out = validate(discrete, grid(2, 24, dim).float())
    assert out["val/bpd"] == pytest.approx(-out["val/iwae"] / (dim * math.log(2)), rel=1e-5)


def test_the_vae_dequantises_only_with_the_gaussian_likelihood_and_levels() -> None:
    """The dequantised training loss is the plain model's loss on the dequantised batch (pinned noise)."""
    model = VAE(shape=(4,), latent_dim=2, likelihood="gaussian", hidden=(8,), levels=256, logit_alpha=None)
    plain = VAE(shape=(4,), latent_dim=2, likelihood="gaussian", hidden=(8,))
    plain.load_state_dict(model.state_dict())
    x = grid(256, 8, 4).float()
    with pinned_noise(model, plain):
        y = dequantize_train(model, x, 256, 3)
        assert not torch.equal(y, x)
        torch.testing.assert_close(model.training_loss(x), plain.training_loss(y))
        torch.testing.assert_close(model.training_loss(x), plain.training_loss(x), rtol=0.05, atol=0)  # close
        assert model.training_loss(x) != plain.training_loss(x)


def test_diffusion_logs_bits_with_the_discretised_decoder_only() -> None:
    """Discretised decoder (images with levels): bpd = -elbo / (D ln 2), a bound on the discrete data's
    bits; the Gaussian decoder (levels None) models a density and logs none."""
    x = grid(256, 8, 16).float().reshape(8, 1, 4, 4)
    for levels, decoder in ((256, "discretized"), (None, "gaussian")):
        model = Diffusion(shape=(1, 4, 4), timesteps=4, network="mlp", hidden=(8,), levels=levels)
        assert model.decoder_kind == decoder
        out = validate(model, x)
        if decoder == "discretized":
            assert out["val/bpd"] == pytest.approx(-out["val/elbo"] / (16 * math.log(2)), rel=1e-5)
        else:
            assert "val/bpd" not in out


def test_the_cli_links_the_datamodules_levels_into_the_families_that_take_them(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``levels`` goes from the datamodule into VAE / Diffusion (Digits: 17; binarised: 2; Toy2D: None);
    a family without the argument (GAN) neither gets it nor saves it, so its checkpoint reloads."""
    from cli import run as main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    quiet = [
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    fit = ["fit", "--trainer.max_steps=1", "--trainer.limit_val_batches=1", *quiet]
    assert main([*fit, "--model=VAE", "--data=Digits"]).model.levels == 17
    assert main([*fit, "--model=VAE", "--data=Digits", "--data.binarize=static"]).model.levels == 2
    diffusion = main([*fit, "--model=Diffusion", "--model.timesteps=4", "--data=Toy2D", "--data.n_train=64"])
    assert diffusion.model.levels is None and diffusion.model.decoder_kind == "gaussian"
    gan = ["--model=GAN", "--model.hidden=[8]", "--data=Toy2D", "--data.n_train=64", "--data.batch_size=32"]
    (tmp_path / "gan").mkdir()
    monkeypatch.chdir(tmp_path / "gan")  # its own runs/ folder
    main([*fit, *gan])
    (ckpt,) = (tmp_path / "gan" / "runs" / "checkpoints").glob("*.ckpt")
    assert "levels" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    tested = main(["test", *gan, *quiet, f"--ckpt_path={ckpt}"])
    assert "test/d_loss" in tested.trainer.callback_metrics


def test_the_logit_transform_is_invertible_with_its_exact_log_determinant() -> None:
    """RealNVP's logit space: from_logit inverts to_logit, and log|det dz/dx| is the log-determinant of the
    Jacobian (autograd) at every example."""
    x = dequantize(
        grid(256, 4, 5), 256, torch.rand(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    )
    z, log_det = to_logit(x, 256, 0.05)
    back, inverse_log_det = from_logit(z, 256, 0.05)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inverse_log_det, -log_det)
    for i in range(4):
        jacobian = torch.autograd.functional.jacobian(lambda t: to_logit(t, 256, 0.05)[0], x[i])
        torch.testing.assert_close(torch.logdet(jacobian), log_det[i])


def test_densities_in_logit_space_are_densities_of_the_pixels() -> None:
    """VAE (linear-Gaussian, exact log p) and Flow with levels: the pixels' log-density is the logit-space
    model's at to_logit(x) plus log|det dz/dx| (the same weights without the transform as the reference),
    and samples come back in pixel space."""
    x = dequantize(grid(256, 6, 4), 256, torch.full((6, 4), 0.3, dtype=F64)).float()
    z, log_det = to_logit(x, 256, 0.05)
    pixels = VAE(shape=(4,), latent_dim=2, decoder="linear", likelihood="gaussian", levels=256)
    plain = VAE(shape=(4,), latent_dim=2, decoder="linear", likelihood="gaussian")
    plain.load_state_dict(pixels.state_dict())
    torch.testing.assert_close(pixels.log_prob(x), plain.log_prob(z) + log_det)
    torch.manual_seed(0)
    flow = Flow(shape=(4,), transform="coupling", n_layers=2, hidden=(8,), levels=256)
    direct = Flow(shape=(4,), transform="coupling", n_layers=2, hidden=(8,))
    direct.load_state_dict(flow.state_dict())
    torch.testing.assert_close(flow.log_prob(x), direct.log_prob(z) + log_det)
    samples, log_q = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow.log_prob(samples), log_q, atol=1e-3, rtol=1e-4)
    h = 1 / 255
    assert samples.min() > -0.05 - h and samples.max() < 1.05 + h  # s = sigmoid(z) in (0, 1)
