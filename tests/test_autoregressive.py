"""MADE and PixelCNN against known answers: seed 003 Q4's receptive fields, the autoregressive property, exact
normalisation over every binary configuration, the sampler against the model's own probabilities, and the
multi-process / resume guarantees through the CLI."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_runs import check_parity_and_resume
from scipy.stats import chi2
from torch.utils.data import DataLoader

from zoo import MADE, PixelCNN
from zoo.autoregressive import MaskedConv2d, MaskedLinear, made_masks, pixelcnn_mask

# -- seed 003, Q4: masks and receptive fields on a 5x5 map ---------------------------------------------------


def test_masks_are_the_seeds_MA_and_MB() -> None:
    """(M^A)_ij = 1 iff i < 2, or i = 2 and j < 2; M^B also keeps j = 2 (1-based, 3x3)."""
    expected_a = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])
    expected_b = torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert torch.equal(pixelcnn_mask(3, "A"), expected_a)
    assert torch.equal(pixelcnn_mask(3, "B"), expected_b)
    assert torch.equal(MaskedConv2d(2, 3, 3, "B").mask[0, 0], expected_b)
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d(1, 1, 4, "A")
    with pytest.raises(ValueError, match="mask_type"):
        MaskedConv2d(1, 1, 3, "C")  # type: ignore[arg-type]


def labels(grad: torch.Tensor) -> set[int]:
    """The seed's Figure 1 labels (row, column, 1-based: 11..55) of the nonzero entries of a 5x5 map."""
    return {10 * (i + 1) + (j + 1) for i, j in (grad != 0).nonzero().tolist()}


def field_of_33(*mask_types: str) -> set[int]:
    """Receptive field of output pixel 33 read off the gradient: masked 3x3 layers, padding 1, all weights
    1 and no bias, so every path adds a positive amount and a pixel is in the field iff its gradient is not
    zero (no cancellation can hide one)."""
    layers = [MaskedConv2d(1, 1, 3, t, padding=1, bias=False) for t in mask_types]
    for layer in layers:
        torch.nn.init.ones_(layer.weight)
    x = torch.ones(1, 1, 5, 5, requires_grad=True)
    y = x
    for layer in layers:
        y = layer(y)
    y[0, 0, 2, 2].backward()
    return labels(x.grad[0, 0])


# The seed's answer, written out from its Figures 2-4: the second layer's mask A reaches hidden pixels
# 22, 23, 24, 32 (mask B also 33); a first-layer mask A gives hidden pixel ij the inputs above it
# (i-1, j-1..j+1) and left of it (i, j-1), mask B adds ij itself. Their unions (Figure 5):
ROW1 = {11, 12, 13, 14, 15}
SEED_FIELDS = {
    ("A", "A"): ROW1 | {21, 22, 23, 31},
    ("A", "B"): ROW1 | {21, 22, 23, 24, 31, 32},
    ("B", "A"): ROW1 | {21, 22, 23, 24, 31, 32},
    ("B", "B"): ROW1 | {21, 22, 23, 24, 31, 32, 33},
}


def test_one_layer_reaches_the_seeds_hidden_pixels() -> None:
    """Figure 2: pixel 33 of one layer sees 22, 23, 24, 32 through mask A and also 33 through mask B."""
    assert field_of_33("A") == {22, 23, 24, 32}
    assert field_of_33("B") == {22, 23, 24, 32, 33}


@pytest.mark.parametrize("first,second", sorted(SEED_FIELDS))
def test_receptive_field_of_pixel_33_is_the_seeds_figure(first: str, second: str) -> None:
    """Exact set equality (a gradient entry is exactly zero or at least 1 here: integer weights)."""
    assert field_of_33(first, second) == SEED_FIELDS[first, second]
    # One type-A layer anywhere keeps 33 out of its own field; BB lets it see itself, which is why a
    # PixelCNN needs one. 25 (up-right) is missing in every case: the blind spot of stacked masked
    # convolutions, although 25 comes before 33 in raster order.
    assert (33 in field_of_33(first, second)) == ((first, second) == ("B", "B"))
    assert 25 not in field_of_33(first, second)


# -- the autoregressive property: triangular Jacobians -------------------------------------------------------


def strictly_lower_in_order(jacobian: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``jacobian[d, e] = ∂ logit_d / ∂ x_e`` permuted into the model's order (row t: the t-th dimension)."""
    return jacobian[order][:, order]


def test_made_jacobian_is_strictly_triangular_in_each_ordering() -> None:
    """For every mask set, ∂ logit_d / ∂ x_e is EXACTLY 0 (masked weights are multiplied by 0.0) unless e
    comes before d in that set's ordering. The same holds for the product of the masks (the count of paths
    e -> d, which does not depend on x, so ReLU's zeros at one input cannot hide a leak), and the Jacobian is
    nonzero only where a path exists. (Random hidden degrees need not connect every earlier pair.)"""
    torch.manual_seed(0)
    made = MADE(shape=(10,), hidden=(64, 64), n_orderings=3).double()
    x = torch.rand(10, dtype=torch.float64)
    lower = torch.ones(10, 10, dtype=torch.bool).tril(-1)
    for s in range(3):
        jacobian = torch.func.jacrev(lambda v, s=s: made.logits(v[None], s)[0])(x)
        order = made.orderings[s]
        in_order = strictly_lower_in_order(jacobian, order)
        assert (in_order[~lower] == 0).all()
        assert (in_order[lower] != 0).any()
        paths = torch.linalg.multi_dot([layer.masks[s].double() for layer in reversed(made.layers)])
        connected = strictly_lower_in_order(paths, order) > 0
        assert not connected[~lower].any()
        assert not (in_order[~connected] != 0).any()
    assert not torch.equal(made.orderings[1], made.orderings[0])


def test_pixelcnn_jacobian_is_strictly_triangular_in_raster_order() -> None:
    """∂ logit_ij / ∂ x_kl is exactly 0 unless (k, l) precedes (i, j) in raster order; the left and upper
    neighbours do reach it."""
    torch.manual_seed(0)
    model = PixelCNN(shape=(1, 5, 5), channels=6, n_layers=3, kernel_size=3).double()
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    jacobian = torch.func.jacrev(lambda v: model.logits(v).flatten())(x).reshape(25, 25)
    assert (jacobian[~torch.ones(25, 25, dtype=torch.bool).tril(-1)] == 0).all()
    for d in range(25):
        i, j = divmod(d, 5)
        if j > 0:
            assert jacobian[d, d - 1] != 0
        if i > 0:
            assert jacobian[d, d - 5] != 0


def test_pixelcnn_windowed_conditional_equals_the_full_pass() -> None:
    """Sampling computes each logit on a window of ``reach`` rows up and columns either side; it must equal
    the full-image logit (float64; only the summation order differs, so 1e-12)."""
    torch.manual_seed(0)
    model = PixelCNN(shape=(1, 12, 12), channels=4, n_layers=3, kernel_size=3).double()
    assert model.reach == 3
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64).round()
    full = model.logits(x)[:, 0]
    for i, j in itertools.product(range(12), range(12)):
        torch.testing.assert_close(model.conditional_logit(x, i, j), full[:, i, j], atol=1e-12, rtol=0)


# -- exact normalisation -------------------------------------------------------------------------------------


def every_binary(dim: int) -> torch.Tensor:
    """All 2^dim binary vectors ``[2^dim, dim]``, float64; row r is r's bits, most significant first."""
    r = torch.arange(2**dim)[:, None]
    return ((r >> torch.arange(dim - 1, -1, -1)) & 1).double()


def sharpen(model: torch.nn.Module, factor: float = 3.0) -> torch.nn.Module:
    """Scale every weight so the conditionals are far from 1/2: a leak of x_d into its own conditional
    would then put mass far from 1, where a near-uniform model would sum to about 1 anyway."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def test_made_sums_to_one_over_all_1024_configurations() -> None:
    """Σ_x exp(log p(x)) over {0,1}^10 = 1 for each mask set and for the K = 3 ensemble; float64, 1e-10."""
    torch.manual_seed(0)
    made = sharpen(MADE(shape=(10,), hidden=(32, 32), n_orderings=3).double())
    x = every_binary(10)
    for mask_set in (0, 1, 2, None):
        total = torch.logsumexp(made.log_prob(x, mask_set=mask_set), 0).exp().item()
        assert total == pytest.approx(1.0, abs=1e-10), mask_set


def test_pixelcnn_sums_to_one_over_all_65536_images_and_a_leaky_mask_does_not() -> None:
    """Σ_x exp(log p(x)) over {0,1}^(4x4) = 1; the same network with a type-B first layer (pixel ij sees
    itself) is not a distribution: its total is far from 1 (here > 2). Float32 (float64 convolutions are
    3x slower on the CPU): each log p(x) is good to ~1e-6 relative, so the total to 1e-5."""
    torch.manual_seed(0)
    model = sharpen(PixelCNN(shape=(1, 4, 4), channels=8, n_layers=3, kernel_size=3))
    x = every_binary(16).float().reshape(-1, 1, 4, 4)
    with torch.no_grad():
        assert torch.logsumexp(model.log_prob(x), 0).exp().item() == pytest.approx(1.0, abs=1e-5)
        model.input_layer.mask.copy_(pixelcnn_mask(3, "B"))
        assert torch.logsumexp(model.log_prob(x), 0).exp().item() > 2.0


# -- sampling: the sampler draws from exp(log_prob) ----------------------------------------------------------


def chi_square(samples: torch.Tensor, log_p: torch.Tensor) -> float:
    """Pearson's statistic of the counts of each configuration (row index = bits, MSB first) vs n p(x)."""
    dim = samples.shape[1]
    index = (samples.long() * (2 ** torch.arange(dim - 1, -1, -1))).sum(1)
    counts = torch.bincount(index, minlength=2**dim).double()
    expected = len(samples) * log_p.exp()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize(
    "name,build,dim",
    [
        ("made-ensemble", lambda: MADE(shape=(3,), hidden=(8,), n_orderings=2), 3),
        ("pixelcnn", lambda: PixelCNN(shape=(1, 2, 2), channels=4, n_layers=2, kernel_size=3), 4),
    ],
)
def test_sample_frequencies_match_exp_log_prob(name: str, build, dim: int) -> None:
    """20,000 draws (fixed generator) against exp(log_prob) of every configuration: Pearson's chi-square
    below its 99.9% quantile with 2^D - 1 degrees of freedom (24.3 for D = 3, 37.7 for D = 4). A correct
    sampler fails this with probability 0.001 over seeds; the seed is fixed, so the test is deterministic.
    The MADE case samples the K = 2 ensemble, so the mixture component is drawn too."""
    torch.manual_seed(0)
    model = sharpen(build().double())
    x = every_binary(dim)
    log_p = model.log_prob(x.reshape(-1, *model.shape))
    samples = model.sample(20_000, generator=torch.Generator().manual_seed(0)).reshape(-1, dim)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    statistic = chi_square(samples, log_p)
    assert statistic < chi2.ppf(0.999, 2**dim - 1), (name, statistic)
    p = log_p.exp()
    assert p.max() / p.min() > 5  # far from uniform, so the check has teeth
    assert len(samples) * p.min() > 100  # every expected count large enough for the chi-square law


def test_made_masked_linear_and_validation() -> None:
    masks = made_masks([torch.tensor([1, 2, 3]), torch.tensor([1, 2]), torch.tensor([1, 1])])
    assert torch.equal(masks[0], torch.tensor([[1.0, 0, 0], [1, 1, 0]]))
    assert torch.equal(masks[-1], torch.tensor([[0.0, 0], [1, 1], [1, 1]]))
    layer = MaskedLinear(3, 2, masks[0])
    layer(torch.ones(4, 3)).sum().backward()
    assert torch.equal(layer.weight.grad != 0, masks[0].bool())  # masked weights get no gradient
    for bad in (dict(shape=(1,)), dict(shape=(4,), hidden=()), dict(shape=(4,), n_orderings=0)):
        with pytest.raises(ValueError):
            MADE(**bad)
    with pytest.raises(ValueError, match="single-channel"):
        PixelCNN(shape=(3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        PixelCNN(shape=(1, 8, 8), hidden_kernel_size=2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_bits_per_dimension_is_nll_over_d_ln2() -> None:
    """The logged val/bpd is val/nll / (D ln 2): checked on a fixed batch through validation_step."""
    torch.manual_seed(0)
    model = MADE(shape=(1, 8, 8), hidden=(16,))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)).round()
    model.validation_step(x, 0)
    nll, bpd = model.val_nll.compute(), model.val_bpd.compute()
    torch.testing.assert_close(nll, -model.log_prob(x).mean())
    torch.testing.assert_close(bpd, nll / (64 * math.log(2)))


# -- processes and resume, through the CLI -------------------------------------------------------------------

RECIPES = {
    "MADE": ("--model=MADE", "--model.hidden=[64]", "--model.n_orderings=2"),
    "PixelCNN": ("--model=PixelCNN", "--model.channels=8", "--model.n_layers=3", "--model.kernel_size=3"),
}
DATA = ("--data=Digits", "--data.binarize=dynamic", "--data.batch_size=64")


@pytest.mark.ddp
@pytest.mark.parametrize("family", ["MADE"])  # PixelCNN: see below
def test_two_processes_match_one_and_a_resumed_run_continues_exactly(tmp_path: Path, family: str) -> None:
    """Four ``cli.py fit`` runs (one process unless said), the first shared by both checks:

    * parity: 2 epochs (48 Adam steps) on 1 and on 2 gloo processes, same global batch: the per-epoch val/nll
      and val/bpd agree to 1e-4 nats and the final weights to float32 tolerance (atol 1e-6, rtol 1e-5); only
      the order of the gradient all-reduce sums differs. MADE cycles its 2 mask sets by global_step, so both
      runs use the same set at every step. Rank 0 draws the sample pictures without hanging the other rank.
    * resume: 3 epochs in one go == the 2-epoch run, ``--ckpt_path`` to its checkpoint, 1 more: every weight
      and the epoch-3 val/nll equal bit for bit (dynamic binarisation and MADE's mask set are functions of
      the epoch and global_step, both restored).

    MADE only (50 s each on 2 cores): its mask set is the family's one piece of step-keyed randomness.
    PixelCNN draws none, so its 2-process run is plain DDP over the same sampler and binarisation; it trains
    under ddp in tests/test_fsdp2.py's 2-process job and goes through the spawn round trip.
    """
    check_parity_and_resume(tmp_path, (*RECIPES[family], *DATA), ("val/bpd", "val/nll"))


# -- the user sizes the masked networks and chooses the optimiser and schedule -----------------------------

FAMILIES = {
    "MADE": lambda **kw: MADE(shape=(1, 8, 8), hidden=(32,), **kw),
    "PixelCNN": lambda **kw: PixelCNN(shape=(1, 8, 8), channels=8, n_layers=2, kernel_size=3, **kw),
}


def binary_digits_loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)).round()
    return DataLoader(x, batch_size=batch_size)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_the_optimizer_and_schedule_are_the_users_and_a_checkpoint_reloads(
    tmp_path: Path, family: str
) -> None:
    """``optimizer=partial(SGD, lr=0.05)`` is what the Trainer steps with (every weight moves in 3 steps);
    ``StepLR(step_size=1, gamma=0.5)`` gives 0.05 / 2³ after 3 steps; the checkpoint reloads with no arguments
    (the callables are not saved) to the same log p(x), bit for bit."""
    torch.manual_seed(0)
    model = FAMILIES[family](
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    assert "optimizer" not in model.hparams and "lr_scheduler" not in model.hparams
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=binary_digits_loader())
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 8, rel=1e-12)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = type(model).load_from_checkpoint(tmp_path / "m.ckpt")
    x = next(iter(binary_digits_loader()))
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), restored.log_prob(x))
    default = FAMILIES[family](lr=2e-3).configure_optimizers()
    assert type(default) is torch.optim.Adam and default.param_groups[0]["lr"] == 2e-3


def test_pixelcnn_head_channels_size_the_head_and_keep_it_normalised() -> None:
    """``head_channels=3``: the 1x1 head is channels -> 3 -> 1 (default: channels -> channels -> 1, as
    before); the model still sums to one over all 2^9 binary 3x3 images (to 1e-5)."""
    default = PixelCNN(shape=(1, 3, 3), channels=8, n_layers=2, kernel_size=3)
    assert default.head[1].weight.shape == (8, 8, 1, 1)
    model = PixelCNN(shape=(1, 3, 3), channels=8, n_layers=2, kernel_size=3, head_channels=3)
    assert model.head[1].weight.shape == (3, 8, 1, 1) and model.head[3].weight.shape == (1, 3, 1, 1)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9))).reshape(-1, 1, 3, 3)
    with torch.no_grad():
        total = model.log_prob(images).exp().sum()
    assert abs(total.item() - 1) < 1e-5
    with pytest.raises(ValueError, match="head_channels"):
        PixelCNN(shape=(1, 8, 8), head_channels=0)
