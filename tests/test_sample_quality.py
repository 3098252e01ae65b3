"""SampleQuality and its functions against closed forms: FID's finite-sample bias for one distribution and
the Fréchet distance of the features' Gaussians (scipy's sqrtm), KID against a numpy unbiased MMD² on the same
subsets, the pixel convention, the Inception route's errors, the callback's values in W&B, and 1 vs 2
processes. Tolerances are stated in each test."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cli_runs import cli_fit, metric_rows
from scipy import linalg
from torch import Tensor, nn

from callbacks import SampleQuality
from callbacks import sample_quality as sq
from callbacks.sample_quality import (
    ConvFeatures,
    InceptionFeatures,
    frechet_distance,
    kernel_distance,
    sample_quality,
    share,
    to_uint8,
)
from datamodules.base import TensorDataModule, generator, make_splits
from zoo.noise import randn

# -- closed forms ----------------------------------------------------------------------------------------


def fid_closed_form(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^{1/2}) with scipy's matrix square root."""
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def moments(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = x.double().numpy()
    return a.mean(0), np.cov(a, rowvar=False)  # unbiased (n - 1), as FID's definition


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al. (2018): unbiased MMD² with k(a, b) = (aᵀb / d + 1)³, written out in numpy."""
    d, m = x.shape[1], x.shape[0]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.mean())


def gaussian(n: int, mean: Sequence[float], cov: np.ndarray, seed: int) -> Tensor:
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    z = torch.randn(n, len(mean), generator=generator(seed), dtype=torch.float64)
    return torch.as_tensor(mean, dtype=torch.float64) + z @ chol.T


def test_fid_of_two_samples_of_one_distribution_is_its_finite_sample_bias() -> None:
    """Two samples of n = 2000 from N(0, I_8): E FID ≈ F(F + 5) / (2n) = 0.026 (2F/n from the means,
    F(F+1)/(2n) from the covariances; seen over 50 seeds: mean 0.0264, sd 0.0056). Every one of 10 pairs is
    below 3x that, and their mean is within 25% of it (4 of its standard errors)."""
    d, n = 8, 2000
    bias = d * (d + 5) / (2 * n)
    values = [
        float(
            frechet_distance(
                gaussian(n, [0.0] * d, np.eye(d), 2 * s), gaussian(n, [0.0] * d, np.eye(d), 2 * s + 1)
            )
        )
        for s in range(10)
    ]
    assert all(0 < v < 3 * bias for v in values)
    assert abs(np.mean(values) - bias) < 0.25 * bias


def test_fid_of_two_gaussians_is_the_closed_form_on_the_features() -> None:
    """Non-commuting covariances in 4-D. On the samples' own moments FID is the closed form to 1e-9
    (float64 eigenvalues against scipy's sqrtm); against the population's closed form it is within 0.1:
    bias F(F+5)/(2n) = 0.0009 plus 5 sd of the mean term, 2 sqrt(δᵀ(Σ1+Σ2)δ / n) = 0.017, at n = 20000."""
    mu1, mu2 = np.zeros(4), np.array([1.0, -1.0, 0.5, 0.0])
    s1 = np.diag([1.0, 2.0, 0.5, 1.0])
    rotation = linalg.expm(np.array([[0, 1, 0, 0], [-1, 0, 0.5, 0], [0, -0.5, 0, 1], [0, 0, -1, 0.0]]))
    s2 = rotation @ np.diag([2.0, 0.5, 1.0, 3.0]) @ rotation.T
    a, b = gaussian(20_000, mu1, s1, 0), gaussian(20_000, mu2, s2, 1)
    value = float(frechet_distance(a, b))
    assert value == pytest.approx(fid_closed_form(*moments(a), *moments(b)), rel=1e-9)
    exact = fid_closed_form(mu1, s1, mu2, s2)
    assert abs(value - exact) < 0.1, (value, exact)


def test_kid_is_numpy_unbiased_mmd_on_the_same_subsets() -> None:
    """KID's subsets are torch.randperm draws from a CPU generator seeded with ``seed`` (real, then fake, per
    subset): on those subsets the numpy MMD² reproduces kid_mean and kid_std (population sd) to 1e-10. With
    subsets of all rows every subset gives the full-set MMD² (sd 0)."""
    a, b = gaussian(300, [0.0] * 3, np.eye(3), 0), gaussian(300, [0.3, 0.0, 0.0], 2 * np.eye(3), 1)
    mean, std = kernel_distance(a, b, subsets=4, subset_size=120, seed=7)
    g, scores = torch.Generator().manual_seed(7), []
    for _ in range(4):
        real, fake = torch.randperm(300, generator=g)[:120], torch.randperm(300, generator=g)[:120]
        scores.append(mmd2_unbiased(a[real].numpy(), b[fake].numpy()))
    assert float(mean) == pytest.approx(np.mean(scores), rel=1e-10)
    assert float(std) == pytest.approx(np.std(scores), rel=1e-8)
    full_mean, full_std = kernel_distance(a, b, subsets=2, subset_size=300)
    assert float(full_mean) == pytest.approx(mmd2_unbiased(a.numpy(), b.numpy()), rel=1e-10)
    assert float(full_std) < 1e-12


# -- pixels, feature networks, errors ----------------------------------------------------------------------


def test_pixels_round_to_8_bit_levels() -> None:
    """Every level k / 255, even stored in half precision, maps back to k (torchmetrics' truncating
    ``(x * 255).byte()`` maps 131 of them to k - 1); grey images reach Inception as 3 equal uint8 channels."""
    k = torch.arange(256)
    half = (k.float() / 255).half()
    assert torch.equal(to_uint8(half).long(), k)
    assert int(((half.float() * 255).byte().long() != k).sum()) == 131

    seen = []
    inception = InceptionFeatures.__new__(InceptionFeatures)
    nn.Module.__init__(inception)
    inception.net = lambda x: seen.append(x) or torch.zeros(len(x), 4)
    grey = torch.tensor([0.0, 0.5, 1.2, -0.1]).view(1, 1, 2, 2)
    inception(grey)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 2, 2)
    assert seen[0][0, :, 0].tolist() == [[0, 128]] * 3 and seen[0][0, :, 1].tolist() == [[255, 0]] * 3


def test_the_inception_route_says_what_to_install_and_where_the_weights_go(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sq, "_torch_fidelity_available", lambda: False)  # as on this machine
    with pytest.raises(ModuleNotFoundError, match=r"pip install torch-fidelity==0\.4\.0.*weights-inception"):
        SampleQuality()  # the default feature is 'inception'
    monkeypatch.setattr(sq, "_torch_fidelity_available", lambda: True)
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match=rf"not at {missing}.*releases/download.*never downloads"):
        SampleQuality(feature=2048, inception_weights=str(missing))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.kid", None)  # as when torchvision does not import
    with pytest.raises(ImportError, match="torchvision"):
        SampleQuality(feature=nn.Flatten())


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(ValueError, match="precision / recall"):
        SampleQuality(feature=nn.Flatten(), metrics=("fid", "precision"))
    with pytest.raises(ValueError, match="kid_subset_size=1000 is larger than n_samples"):
        SampleQuality(feature=nn.Flatten(), n_samples=500)
    with pytest.raises(ValueError, match="feature must be 'inception'"):
        SampleQuality(feature="vgg")
    with pytest.raises(ValueError, match=r"Inception feature dims .* got 100"):
        SampleQuality(feature=100)
    with pytest.raises(ValueError, match=r"must map \[B, \.\.\.\] to \[B, F\]"):
        sq.compute_features(nn.Identity(), torch.zeros(3, 1, 4, 4), 2)
    with pytest.raises(ValueError, match=r"ConvFeatures needs images of shape \(C, H, W\) with H = W"):
        ConvFeatures((1, 8, 8))


def test_conv_features_are_a_function_of_the_seed_or_the_weights_file(tmp_path: Path) -> None:
    """Same seed, same network, and the global RNG is left alone; a saved state_dict loads back."""
    state = torch.random.get_rng_state()
    a, b, c = ConvFeatures((1, 16, 16), 8), ConvFeatures((1, 16, 16), 8), ConvFeatures((1, 16, 16), 8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x)) and a(x).shape == (3, 8)
    torch.save(c.state_dict(), tmp_path / "features.pt")
    assert torch.equal(ConvFeatures((1, 16, 16), 8, weights=str(tmp_path / "features.pt"))(x), c(x))


def test_shares_are_contiguous_and_cover_every_row() -> None:
    for n, world in ((10, 3), (7, 7), (251, 2)):
        rows = [share(n, world, r) for r in range(world)]
        assert [i for s in rows for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


# -- a tiny sampler of Gaussian "images" and its data ------------------------------------------------------


class GaussianImages(TensorDataModule):
    """Pixels iid N(0.5, 0.1²), shape (1, 4, 4); no test split."""

    def __init__(self, n_train: int = 256, n_val: int = 300, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size, seed)
        self.sizes, self.shape = (n_train, n_val, 0), (1, 4, 4)

    def build(self):
        data = 0.5 + 0.1 * torch.randn(sum(self.sizes), *self.shape, generator=generator(self.seed))
        return make_splits(data, self.sizes, self.seed)


class ShiftScaleSampler(L.LightningModule):
    """x = shift + exp(log_scale) z, z ~ N(0, I); trained by SGD on the pixels' mean Gaussian negative
    log-likelihood (a mean over examples: DDP's averaged gradient is the one-process gradient)."""

    def __init__(self, shape: Sequence[int] = (1, 4, 4), lr: float = 0.1) -> None:
        super().__init__()
        self.shape, self.lr = tuple(shape), lr
        self.shift, self.log_scale = nn.Parameter(torch.tensor(0.0)), nn.Parameter(torch.tensor(0.0))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.shift + self.log_scale.exp() * randn((n, *self.shape), generator, device=self.device)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return (((batch - self.shift) / self.log_scale.exp()) ** 2 / 2 + self.log_scale).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RankSkewedProjection(nn.Module):
    """A fixed random 16 -> 6 linear feature map, plus 1 on every weight on any process but rank 0: without
    the callback's broadcast from rank 0, two processes would measure with different networks."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 6)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(6, 16, generator=generator(3)))
            self.linear.bias.zero_()
            self.linear.weight += float(os.environ.get("LOCAL_RANK", 0))

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(images.flatten(1))


def read_wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``run-*.wandb`` file: W&B's LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: crc, length, type) of
    protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos, payload, rows, kinds = path.read_bytes(), 32768, 7, b"", [], set()
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        payload, pos = payload + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            kinds.add(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                )
    assert "exit" in kinds, f"{path} ends before the run's exit record: the file is incomplete"
    return rows


def test_the_callback_logs_fid_and_kid_to_wandb(tmp_path: Path, monkeypatch) -> None:
    """Two epochs with an evaluation after each (8 steps), logged through an offline WandbLogger: the values
    read back from the run's file are the callback's, and the last one equals :func:`sample_quality` on the
    trained module with the same held-out examples, keys and features (to 1e-12: the same computation). The
    checkpointed state restores the history without the held-out images."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    callback = SampleQuality(
        feature=nn.Flatten(),
        every_n_epochs=1,
        n_samples=200,
        batch_size=64,
        kid_subsets=5,
        kid_subset_size=100,
    )
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="genzoo-test")
    model, data = ShiftScaleSampler(), GaussianImages()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, data)
    logger.experiment.finish()
    # W&B's service writes the offline file after finish() returns (seen: header only in 3 of 8 runs);
    # teardown() returns once the service has closed it.
    wandb.teardown()

    names = ("fid", "kid_mean", "kid_std")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = [row for row in read_wandb_history(run_dir) if "sample_quality/fid" in row]
    assert (
        [row["trainer/global_step"] for row in rows] == [4, 8] == [int(r["step"]) for r in callback.history]
    )
    for row, expected in zip(rows, callback.history, strict=True):
        assert {f"sample_quality/{name}": expected[name] for name in names}.items() <= row.items()
    assert callback.history[1]["fid"] < callback.history[0]["fid"]  # the sampler moved towards the data
    resumed = SampleQuality(feature=nn.Flatten(), every_n_epochs=1, n_samples=200, kid_subset_size=100)
    resumed.load_state_dict(callback.state_dict())  # a checkpoint keeps the history, not the images
    assert resumed.history == callback.history and resumed.last_step == 8 and resumed.fixed is None

    held_out = data.splits["val"].__getitems__(list(range(200)))
    again = sample_quality(
        model, held_out, nn.Flatten(), n=200, batch_size=64, kid_subsets=5, kid_subset_size=100, step=8
    )
    for name in names:
        assert again[name] == pytest.approx(callback.history[1][name], rel=1e-12, abs=1e-15)


def test_without_a_sampler_it_fails_at_setup() -> None:
    with pytest.raises(TypeError, match="SampleQuality needs a module with the Samplable capability"):
        SampleQuality(feature=nn.Flatten()).setup(None, L.LightningModule(), "fit")


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path: Path) -> None:
    """2 gloo processes (one launch, through the CLI) log the sample_quality/* rows of a 1-process fit: 251
    samples in blocks of 60 split 126 + 125 across a block, 251 held-out examples likewise, a feature network
    that differs on rank 1 until rank 0's is broadcast (without the broadcast: FID 90.0 against 40.3).
    Tolerance 1e-6 relative, room for the last bit of the float32 weights after DDP's gradient all-reduce
    (seen: FID equal to 1e-14, its float64 sums added in another order; KID bit for bit)."""
    options = {
        "every_n_epochs": 1,
        "n_samples": 251,
        "batch_size": 60,
        "kid_subsets": 5,
        "kid_subset_size": 100,
    }
    log_dir = cli_fit(
        tmp_path / "devices2", 2,
        "--model=test_sample_quality.ShiftScaleSampler", "--data=test_sample_quality.GaussianImages",
        "--trainer.max_epochs=2", "--trainer.callbacks=SampleQuality",
        "--trainer.callbacks.feature=test_sample_quality.RankSkewedProjection",
        *(f"--trainer.callbacks.{key}={value}" for key, value in options.items()),
    )  # fmt: skip
    two = metric_rows(log_dir, "sample_quality/fid")

    callback = SampleQuality(feature=RankSkewedProjection(), **options)
    L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    ).fit(ShiftScaleSampler(), GaussianImages())  # fmt: skip
    assert [int(row["step"]) for row in two] == [int(row["step"]) for row in callback.history] == [4, 8]
    for row, expected in zip(two, callback.history, strict=True):
        for name in ("fid", "kid_mean", "kid_std"):
            assert float(row[f"sample_quality/{name}"]) == pytest.approx(expected[name], rel=1e-6), name
