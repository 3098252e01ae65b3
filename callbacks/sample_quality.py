"""Sample quality of a generator: the Fréchet and kernel distances between features of its samples and of
held-out data (FID, KID), on torchmetrics, with the feature network as an argument.

With f a feature network, X = f(data) and Y = f(samples) (``[n, F]`` each):

* **FID** (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
  equilibrium", eq. 6): the Fréchet distance between the Gaussians with the two sets' means and covariances,

  .. math::  d^2 = \\lVert μ_X - μ_Y \\rVert^2 + \\mathrm{Tr}\\left(Σ_X + Σ_Y - 2 (Σ_X Σ_Y)^{1/2}\\right),

  Σ the unbiased sample covariance (divisor n - 1). Biased upwards by finite samples: for two samples of n
  from one Gaussian in F dimensions, E d² ≈ F(F + 5) / (2n) (2F/n from the means, F(F+1)/(2n) from the
  covariances), so FIDs are only comparable at equal n.
* **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs", section 4): the unbiased estimate of the squared
  maximum mean discrepancy with the cubic polynomial kernel k(x, y) = (xᵀy / F + 1)³,

  .. math::  \\mathrm{MMD}^2_u = \\frac{1}{m(m-1)} \\sum_{i \\ne j} \\left(k(x_i, x_j) + k(y_i, y_j)\\right)
             - \\frac{2}{m^2} \\sum_{i, j} k(x_i, y_j),

  on ``kid_subsets`` random subsets of m = ``kid_subset_size`` rows of each set; ``kid_mean`` and ``kid_std``
  are the mean and the (population) standard deviation over the subsets. Unbiased: 0 in expectation for one
  distribution, so it can come out slightly negative.

Both are computed by torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``. The features
are computed once, by genzoo, in batches, and handed to both metrics through a pass-through ``feature`` module
(torchmetrics would otherwise run the network once per metric). The metrics' states reduce across processes
inside torchmetrics (FID: sums of features and of their outer products; KID: the features themselves,
gathered in rank order), and KID's random subsets are drawn from a generator keyed by the evaluation, the same
on every process.

Feature networks (:func:`feature_network`): ``"inception"`` or an int (64, 192, 768, 2048) for the standard
FID Inception-v3 features (:class:`InceptionFeatures`: torch-fidelity's port of the TensorFlow graph, needs
``torch-fidelity`` with a working ``torchvision`` and its weights file on disk; nothing is downloaded), a
small conv trunk (:class:`ConvFeatures`), or any ``nn.Module`` mapping a batch of samples (images
``[B, C, H, W]`` in [0, 1], genzoo's pixel convention) to features ``[B, F]``. Numbers from different feature
networks are different quantities: only Inception features at 2048 dimensions and 50,000 samples are
comparable with published FIDs.

torchmetrics 1.9 has no generative precision / recall metric (Kynkäänniemi et al. 2019): it is not offered.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from callbacks.periodic import PeriodicDiagnostic, Split
from callbacks.samples import evaluating
from zoo.capabilities import Samplable, require
from zoo.networks import check_conv_image, conv_encoder
from zoo.noise import mix_key

QualityMetric = Literal["fid", "kid"]
METRICS: tuple[str, ...] = ("fid", "kid")
INCEPTION_DIMS: tuple[int, ...] = (64, 192, 768, 2048)
# torch-fidelity 0.4.0's converted TensorFlow FID Inception weights (URL_INCEPTION_V3 in its
# feature_extractor_inceptionv3.py); the file torch.hub would cache it as.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
_STREAM = 23  # the noise stream of the samples (zoo.noise.mix_key), distinct from the other diagnostics'

# -- pixels and feature networks -----------------------------------------------------------------------------


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] -> 8-bit levels, ``round(255 x)`` after clamping: level k / 255 maps back to k.

    torchmetrics' own ``normalize=True`` conversion truncates (``(x * 255).byte()``): it maps a level
    stored in half precision to the level below for 131 of the 256 levels, and moves continuous samples half
    a level down on average, while genzoo's PNGs (``callbacks.samples.image_grid``) round.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def default_inception_weights() -> Path:
    """Where torch.hub caches the FID Inception weights: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _image_metrics() -> tuple[type, type]:
    """torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``, imported on first use."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as error:
        raise ImportError(
            f"torchmetrics' FID / KID do not import ({error}). When torch-fidelity is installed, "
            "torchmetrics imports it, and torch-fidelity 0.4.0 imports torchvision: install a torchvision "
            "built for this torch, or uninstall torch-fidelity (genzoo needs it only for "
            "feature='inception')."
        ) from error
    return FrechetInceptionDistance, KernelInceptionDistance


def _torch_fidelity_available() -> bool:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    return bool(_TORCH_FIDELITY_AVAILABLE)


class InceptionFeatures(nn.Module):
    """The standard FID features: Inception-v3 (the TensorFlow graph of Heusel et al.'s reference code, as
    ported by torch-fidelity and wrapped by torchmetrics' ``NoTrainInceptionV3``), pool features of ``dims``
    (64, 192, 768 or 2048, the standard).

    Input: ``[B, C, H, W]`` in [0, 1] with C = 1 (repeated to RGB) or 3; converted to 8-bit levels by
    :func:`to_uint8` and resized to 299x299 by TensorFlow-1 bilinear interpolation (``antialias=False``,
    the resize the published FIDs used; torchmetrics' default antialiasing gives other numbers).

    Needs, and never downloads:

    * ``torch-fidelity`` (``pip install torch-fidelity==0.4.0``), whose package imports ``torchvision``: a
      torchvision built for the installed torch (a CPU torch from one index and a CUDA torchvision from
      another fail with ``operator torchvision::nms does not exist``);
    * the weights file :data:`INCEPTION_WEIGHTS_FILE` from :data:`INCEPTION_WEIGHTS_URL`, at ``weights`` or
      where torch.hub caches it (:func:`default_inception_weights`).
    """

    def __init__(self, dims: int = 2048, weights: str | None = None) -> None:
        super().__init__()
        if dims not in INCEPTION_DIMS:
            raise ValueError(f"Inception feature dims must be one of {INCEPTION_DIMS}; got {dims!r}")
        _image_metrics()
        if not _torch_fidelity_available():
            raise ModuleNotFoundError(
                "feature='inception' needs torch-fidelity: pip install torch-fidelity==0.4.0 (it imports "
                "torchvision, so a torchvision built for this torch must import too), then place the weights "
                f"file {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}) at "
                f"{default_inception_weights()} "
                "or pass its path as inception_weights. Or use a feature network of your own: "
                "feature=ConvFeatures(shape) or any nn.Module mapping [B, C, H, W] in [0, 1] to [B, F]."
            )
        path = Path(weights) if weights is not None else default_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(
                f"the FID Inception weights are not at {path}: download {INCEPTION_WEIGHTS_URL} on a "
                "machine with a network and place the file there (torch.hub's cache: "
                f"{default_inception_weights()}), "
                "or pass its path as inception_weights=...; genzoo never downloads it."
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(dims)], feature_extractor_weights_path=str(path),
            antialias=False,
        )  # fmt: skip
        self.num_features = dims

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"InceptionFeatures needs images [B, C, H, W] with C = 1 or 3; got {tuple(images.shape)}"
            )
        levels = to_uint8(images)
        return self.net(levels.expand(-1, 3, -1, -1) if levels.shape[1] == 1 else levels)


class ConvFeatures(nn.Module):
    """A small feature network for recipes: genzoo's DCGAN-style conv encoder (``zoo.networks.conv_encoder``,
    images ``(C, H, W)`` with H = W in {16, 28, 32, 64}) to ``num_features`` features.

    Its weights are a fixed function of ``seed`` (random features: a consistent but weak yardstick), or are
    read from ``weights``, a ``state_dict`` saved with ``torch.save(features.state_dict(), path)``, e.g. after
    training ``nn.Sequential(features, nn.ReLU(), nn.Linear(num_features, 10))`` to classify MNIST. Its FID is
    not comparable with published Inception FIDs, nor between two feature networks.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_features: int = 128,
        width: int = 32,
        seed: int = 0,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        check_conv_image(shape, "ConvFeatures", "feature=<your own nn.Module>")
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.default_generator.manual_seed(seed)
            self.net = conv_encoder(shape, num_features, width)
        if weights is not None:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"ConvFeatures: no weights file at {weights}")
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def feature_network(
    feature: Literal["inception"] | int | nn.Module, inception_weights: str | None = None
) -> nn.Module:
    """The feature network a name stands for: ``"inception"`` (2048-d) or an int in (64, 192, 768, 2048) for
    :class:`InceptionFeatures`; an ``nn.Module`` as it is. Returned in eval mode without gradients."""
    if isinstance(feature, nn.Module):
        network = feature
    elif feature == "inception":
        network = InceptionFeatures(2048, inception_weights)
    elif isinstance(feature, int) and not isinstance(feature, bool):
        network = InceptionFeatures(feature, inception_weights)
    else:
        raise ValueError(
            f"feature must be 'inception', an Inception feature size in {INCEPTION_DIMS} or an nn.Module "
            f"mapping [B, ...] samples to [B, F] features; got {feature!r}"
        )
    return network.eval().requires_grad_(False)


def compute_features(feature: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """``feature`` on ``x`` in batches of ``batch_size``, on its device: ``[len(x), F]``, float64."""
    device = next(iter(feature.parameters()), torch.empty(0)).device
    parts = []
    for start in range(0, len(x), batch_size):
        out = feature(x[start : start + batch_size].to(device))
        if out.dim() != 2:
            raise ValueError(
                f"the feature network ({type(feature).__name__}) must map [B, ...] to [B, F]; it returned "
                f"{tuple(out.shape)} for input {tuple(x[start : start + batch_size].shape)}"
            )
        parts.append(out.double())
    return torch.cat(parts)


# -- the metrics ---------------------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """The ``feature`` module of torchmetrics' FID / KID here: the features come in already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FeatureDistances:
    """torchmetrics' FID and KID on precomputed features ``[n, F]`` (float64), real and fake.

    ``sync``: reduce the states across processes at ``compute`` (every process must call it, RELIABILITY.md
    #19, #22); ``keep_real``: ``reset`` keeps the real features (the held-out set does not change). KID's
    subsets are drawn from torch's CPU generator seeded with ``key`` inside ``fork_rng``: the same subsets on
    every process, the global RNG untouched.
    """

    def __init__(
        self,
        num_features: int,
        metrics: Sequence[str] = METRICS,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        sync: bool = False,
        keep_real: bool = False,
    ) -> None:
        fid_class, kid_class = _image_metrics()
        options = {"reset_real_features": not keep_real, "sync_on_compute": sync}
        self.fid = fid_class(feature=_Precomputed(num_features), **options) if "fid" in metrics else None
        self.kid = None
        if "kid" in metrics:
            with warnings.catch_warnings():  # "will save all extracted features in buffer": it is the point
                warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance`", UserWarning)
                self.kid = kid_class(
                    feature=_Precomputed(num_features), subsets=kid_subsets, subset_size=kid_subset_size,
                    **options,
                )  # fmt: skip
        self.has_real = False

    @property
    def metrics(self) -> list:
        return [m for m in (self.fid, self.kid) if m is not None]

    def to(self, device: torch.device) -> FeatureDistances:
        for metric in self.metrics:
            metric.to(device)
        return self

    def update(self, features: Tensor, real: bool) -> None:
        for metric in self.metrics:
            metric.update(features, real=real)
        self.has_real = self.has_real or real

    def compute(self, key: int = 0) -> dict[str, float]:
        values = {}
        if self.fid is not None:
            values["fid"] = float(self.fid.compute())
        if self.kid is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(key)
                mean, std = self.kid.compute()
            values.update(kid_mean=float(mean), kid_std=float(std))
        return values

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> Tensor:
    """FID between two feature sets ``[n, F]`` and ``[m, F]`` (torchmetrics' computation, float64).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(4000, 2, generator=g)
        >>> b = torch.randn(4000, 2, generator=g) + torch.tensor([3.0, 0.0])
        >>> round(float(frechet_distance(a, b)), 1)  # |μ_a - μ_b|² = 9, equal covariances
        9.0
    """
    distances = FeatureDistances(features_a.shape[1], ("fid",)).to(features_a.device)
    distances.update(features_a.double(), real=True)
    distances.update(features_b.double(), real=False)
    return distances.fid.compute()


def kernel_distance(
    features_a: Tensor, features_b: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """KID ``(mean, std)`` over ``subsets`` random subsets of ``subset_size`` rows of each feature set
    (torchmetrics' computation, float64; the subsets are drawn from ``seed``)."""
    distances = FeatureDistances(features_a.shape[1], ("kid",), subsets, subset_size).to(features_a.device)
    distances.update(features_a.double(), real=True)
    distances.update(features_b.double(), real=False)
    values = distances.compute(key=seed)
    mean, std = values["kid_mean"], values["kid_std"]
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)


# -- samples -------------------------------------------------------------------------------------------------


def share(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous rows of ``n`` split over ``world`` processes (the first ``n % world`` ranks
    take one more): concatenated in rank order they are ``0 .. n - 1``, the order torchmetrics gathers in."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


def sample_features(
    module: nn.Module,
    feature: nn.Module,
    rows: slice,
    n: int,
    batch_size: int,
    generator_of_block: Callable[[int], torch.Generator],
) -> Tensor:
    """Features ``[len(rows), F]`` of rows ``rows`` of a global set of ``n`` samples, whose block j (rows
    ``j * batch_size`` up to ``(j + 1) * batch_size``) is ``module.sample(len, generator_of_block(j))``.

    A process draws every block its rows touch in full and keeps its rows, so each sample is the same
    whatever the number of processes; a process draws at most one block more than its share.
    """
    parts = []
    for j in range(rows.start // batch_size, (rows.stop - 1) // batch_size + 1):
        low, high = j * batch_size, min((j + 1) * batch_size, n)
        block = module.sample(high - low, generator=generator_of_block(j))
        keep = block[max(rows.start, low) - low : min(rows.stop, high) - low]
        parts.append(compute_features(feature, keep.float(), batch_size))
    return torch.cat(parts)


def _module_device(module: nn.Module) -> torch.device:
    return getattr(module, "device", None) or next(iter(module.parameters()), torch.empty(0)).device


@torch.no_grad()
def sample_quality(
    module: nn.Module,
    data: Tensor,
    feature: Literal["inception"] | int | nn.Module,
    n: int | None = None,
    metrics: Sequence[QualityMetric] = METRICS,
    batch_size: int = 250,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    step: int = 0,
    inception_weights: str | None = None,
) -> dict[str, float]:
    """FID and / or KID between ``n`` samples of ``module`` (``sample(n, generator)``; default: as many as
    ``data`` has rows) and held-out ``data`` (e.g. images ``[N, C, H, W]`` in [0, 1]), on ``feature``'s
    features (:func:`feature_network`). One process, no Trainer; block j of the samples comes from a generator
    seeded ``mix_key(seed, 23, step, j)`` and KID's subsets from ``mix_key(seed, 23, step)``: the values
    :class:`SampleQuality` logs at ``global_step = step`` for the same module and held-out examples.

    Returns ``{"fid": ..., "kid_mean": ..., "kid_std": ...}`` (the metrics asked for).
    """
    require(module, Samplable, "sample_quality")
    n = len(data) if n is None else n
    _check_options(metrics, n, batch_size, kid_subsets, kid_subset_size)
    _check_subset(metrics, kid_subset_size, len(data), "data")
    device = _module_device(module)
    network = feature_network(feature, inception_weights).to(device)
    real = compute_features(network, data, batch_size)
    distances = FeatureDistances(real.shape[1], metrics, kid_subsets, kid_subset_size).to(device)
    distances.update(real, real=True)
    with evaluating(module):
        fake = sample_features(
            module, network, slice(0, n), n, batch_size,
            lambda j: torch.Generator(device=device).manual_seed(mix_key(seed, _STREAM, step, j)),
        )  # fmt: skip
    distances.update(fake, real=False)
    return distances.compute(key=mix_key(seed, _STREAM, step))


# -- the callback --------------------------------------------------------------------------------------------


class SampleQuality(PeriodicDiagnostic):
    """FID and KID of the module's samples against the datamodule's held-out split, during training.

    Every ``every_n_epochs`` epochs (or ``every_n_steps`` optimizer steps) and at the end, the module (any
    ``Samplable``) draws ``n_samples`` samples, and FID / KID between their features and those of the first
    ``n_samples`` examples of ``split`` are logged as ``sample_quality/fid``, ``sample_quality/kid_mean`` and
    ``sample_quality/kid_std`` (and kept in :attr:`history`).

    Processes: the global sample set is cut into blocks of ``batch_size``, block j drawn from a generator
    keyed by ``(seed, 23, global_step, j)``; each process takes a contiguous share of the samples and of the
    held-out examples and updates torchmetrics' states with their features, which torchmetrics reduces at
    ``compute``.
    So W processes log what one process logs. The feature network is broadcast from rank 0 at the first
    evaluation, so an unseeded network cannot differ between processes. The held-out features are computed at
    the first evaluation and kept; a checkpoint keeps the cadence and history, not the images (they are the
    split's first examples again after a resume).

    Args:
        feature: ``"inception"`` (the standard 2048-d FID features; needs torch-fidelity and the weights on
            disk, :class:`InceptionFeatures`), an int in (64, 192, 768, 2048) for another Inception layer,
            :class:`ConvFeatures`, or any ``nn.Module`` mapping a batch of samples to ``[B, F]``.
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (and the last).
        every_n_steps: if set, evaluate when ``global_step`` crosses a multiple of it instead.
        n_samples: samples drawn per evaluation, and held-out examples compared with (fewer if the split is
            smaller). FID depends on it (bias ~ F² / n): compare numbers at equal ``n_samples``.
        batch_size: samples per ``sample`` call and per feature-network call.
        metrics: any of ``"fid"``, ``"kid"``.
        kid_subsets: KID's number of random subsets.
        kid_subset_size: rows of each set in a KID subset (at most ``n_samples`` and the split's size).
        inception_weights: path of the Inception weights file (default: torch.hub's cache).
        split: the datamodule split of the held-out examples.
        seed: seed of the samples' noise and of KID's subsets.

    Example:
        >>> quality = SampleQuality(feature=ConvFeatures((1, 28, 28)), n_samples=2000, kid_subset_size=500)
        >>> # lightning.Trainer(callbacks=[quality]).fit(model, datamodule)
    """

    prefix = "sample_quality"
    _stream = _STREAM

    def __init__(
        self,
        feature: Literal["inception"] | int | nn.Module = "inception",
        every_n_epochs: int = 10,
        every_n_steps: int | None = None,
        n_samples: int = 10_000,
        batch_size: int = 250,
        metrics: Sequence[QualityMetric] = METRICS,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        inception_weights: str | None = None,
        split: Split = "val",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, every_n_steps, n_samples, batch_size, split, seed)
        _check_options(metrics, n_samples, batch_size, kid_subsets, kid_subset_size)
        self.metrics, self.kid_subsets, self.kid_subset_size = tuple(metrics), kid_subsets, kid_subset_size
        _image_metrics()  # fail here, not at the first evaluation, when torchmetrics' FID / KID cannot import
        self.feature = feature_network(feature, inception_weights)
        self.distances: FeatureDistances | None = None

    @property
    def n_samples(self) -> int:
        return self.n_examples

    @functools.cached_property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, every_n_steps=self.every_n_steps, n_samples=self.n_examples,
            split=self.split, seed=self.seed, metrics=self.metrics,
        )  # fmt: skip

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, Samplable, type(self).__name__)

    def prepare(self, trainer: Trainer, device: torch.device) -> FeatureDistances:
        """First evaluation (every process): checks the sizes, moves the feature network to ``device`` and
        makes it rank 0's, and builds the metrics for its feature size."""
        n_real, world = len(self.fixed), trainer.world_size
        if n_real < max(2, world) or self.n_samples < world:
            raise ValueError(
                f"SampleQuality needs at least max(2, world size = {world}) held-out examples and samples; "
                f"the {self.split!r} split gave {n_real}, n_samples={self.n_samples}"
            )
        _check_subset(self.metrics, self.kid_subset_size, n_real, f"the {self.split!r} split")
        self.feature.to(device)
        if world > 1:
            self.feature.load_state_dict(trainer.strategy.broadcast(self.feature.state_dict(), src=0))
        num_features = compute_features(self.feature, self.fixed[:2], 2).shape[1]
        distances = FeatureDistances(
            num_features, self.metrics, self.kid_subsets, self.kid_subset_size, sync=True, keep_real=True
        )
        return distances.to(device)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        device, world, rank = pl_module.device, trainer.world_size, trainer.global_rank
        if self.distances is None:
            self.distances = self.prepare(trainer, device)
        if not self.distances.has_real:
            real = self.fixed[share(len(self.fixed), world, rank)]
            self.distances.update(compute_features(self.feature, real, self.batch_size), real=True)
        fake = sample_features(
            pl_module, self.feature, share(self.n_samples, world, rank), self.n_samples, self.batch_size,
            lambda j: self.generator(trainer, device, j),
        )  # fmt: skip
        self.distances.update(fake, real=False)
        values = self.distances.compute(key=mix_key(self.seed, self._stream, trainer.global_step))
        self.distances.reset()  # the real features stay
        return values

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fixed": None, "version": 1}  # the images are re-read after a resume


def _check_options(
    metrics: Sequence[str], n: int, batch_size: int, kid_subsets: int, kid_subset_size: int
) -> None:
    if isinstance(metrics, str) or not metrics or any(m not in METRICS for m in metrics):
        raise ValueError(
            f"metrics must be a non-empty list of {METRICS} (torchmetrics 1.9 has no generative "
            f"precision / recall); got {metrics!r}"
        )
    for name, value in (("n_samples", n), ("batch_size", batch_size), ("kid_subsets", kid_subsets),
                        ("kid_subset_size", kid_subset_size)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if n < 2:
        raise ValueError(f"n_samples must be at least 2 (a covariance needs two samples); got {n}")
    _check_subset(metrics, kid_subset_size, n, "n_samples")


def _check_subset(metrics: Sequence[str], subset_size: int, n: int, what: str) -> None:
    if "kid" in metrics and subset_size > n:
        raise ValueError(
            f"kid_subset_size={subset_size} is larger than {what} ({n}): KID draws subsets of that many rows "
            f"from each set; use kid_subset_size <= {n}"
        )
