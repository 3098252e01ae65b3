"""Sample quality on Gaussian mixtures: modes covered and the share of high-quality samples.

The measure of the 2-D mixture benchmarks (8 Gaussians on a ring, 25 on a grid) used since Metz et al.
(2017, "Unrolled GANs") and Srivastava et al. (2017, "VEEGAN"): a generated sample is **high quality** when it
lies within ``n_std`` (3) standard deviations of the nearest mode's centre,

.. math::  \\mathrm{hq}(x) = [\\min_m \\lVert x - \\mu_m \\rVert \\le n_{std}\\, \\sigma],

and a mode is **covered** when at least ``min_count`` (1, VEEGAN's convention) high-quality samples have it as
their nearest mode. The reported numbers are

* ``modes_covered`` = #{m : count_m >= min_count}, out of M modes;
* ``high_quality`` = Σ_m count_m / N, the fraction of all N samples that are high quality.

Reference point: for exact samples of an isotropic 2-D component, ||x - μ|| / σ has the chi distribution with
2 degrees of freedom, so P(hq) = 1 - exp(-n_std² / 2) = 0.9889 at n_std = 3 (when the modes are far apart
compared with σ): no generator should be expected to exceed ~99%.

The metric's states are per-mode counts and a sample count, reduced by sum (RELIABILITY.md #22), so the value
over several processes equals the value over the union of their samples, whatever the shard sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def high_quality_counts(samples: Tensor, centers: Tensor, std: float, n_std: float = 3.0) -> Tensor:
    """High-quality samples nearest to each mode: ``samples [N, D]``, ``centers [M, D]`` -> counts ``[M]``."""
    distance = torch.cdist(samples.to(centers.dtype), centers)  # [N, M]
    nearest_distance, nearest = distance.min(dim=1)
    good = nearest_distance <= n_std * std
    return torch.bincount(nearest[good], minlength=centers.shape[0])


def mode_coverage(
    samples: Tensor, centers: Tensor, std: float, n_std: float = 3.0, min_count: int = 1
) -> dict[str, Tensor]:
    """Functional twin of :class:`ModeCoverage` on one set of samples.

    Returns ``{"modes_covered": int tensor, "high_quality": float tensor, "counts": [M]}``.

    Example:
        >>> centers = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> out = mode_coverage(torch.tensor([[0.01, 0.0], [1.0, 1.0]]), centers, std=0.02)
        >>> int(out["modes_covered"]), float(out["high_quality"])
        (1, 0.5)
    """
    _check(centers, std, n_std, min_count)
    counts = high_quality_counts(samples, centers, std, n_std)
    return {
        "modes_covered": (counts >= min_count).sum(),
        "high_quality": counts.sum().double() / max(samples.shape[0], 1),
        "counts": counts,
    }


class ModeCoverage(Metric):
    """Modes covered and the fraction of high-quality samples of a generator on a Gaussian mixture.

    Args:
        centers: the mixture's means ``[M, D]`` (``Toy2D.centers``).
        std: the components' common standard deviation (``Toy2D.std``).
        n_std: a sample is high quality within ``n_std * std`` (Euclidean) of its nearest centre.
        min_count: high-quality samples a mode needs to count as covered.

    ``update(samples [N, D])`` accumulates; ``compute()`` returns
    ``{"modes_covered": tensor (int64), "high_quality": tensor (float64, in [0, 1])}``. States: ``counts [M]``
    and ``total``, both reduced by sum across processes.

    Example:
        >>> metric = ModeCoverage(centers=[[0.0, 0.0], [2.0, 0.0]], std=0.1)
        >>> metric.update(torch.tensor([[0.05, 0.0], [2.0, 0.1], [1.0, 0.0]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'modes_covered': 2.0, 'high_quality': 0.667}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        centers: Tensor | Sequence[Sequence[float]],
        std: float,
        n_std: float = 3.0,
        min_count: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        centers = torch.as_tensor(centers, dtype=torch.float64).clone()
        _check(centers, std, n_std, min_count)
        self.std, self.n_std, self.min_count = float(std), float(n_std), int(min_count)
        # A plain attribute, not a buffer: the module's buffers stay what the model defines (weight averaging
        # pairs buffers by position), and ``update`` moves the centres to the samples' device.
        self.centers = centers
        self.add_state("counts", torch.zeros(centers.shape[0], dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def num_modes(self) -> int:
        return self.centers.shape[0]

    def update(self, samples: Tensor) -> None:
        samples = samples.detach().flatten(1)
        if samples.shape[1] != self.centers.shape[1]:
            raise ValueError(
                f"ModeCoverage: samples have dimension {samples.shape[1]}, "
                f"the centers {self.centers.shape[1]}"
            )
        centers = self.centers.to(samples.device)
        self.counts += high_quality_counts(samples, centers, self.std, self.n_std)
        self.total += samples.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {
            "modes_covered": (self.counts >= self.min_count).sum(),
            "high_quality": self.counts.sum().double() / self.total.clamp(min=1).double(),
        }


def _check(centers: Tensor, std: float, n_std: float, min_count: int) -> None:
    if centers.dim() != 2 or centers.shape[0] < 1:
        raise ValueError(f"centers must be a [M, D] tensor with M >= 1; got shape {tuple(centers.shape)}")
    if not std > 0:
        raise ValueError(f"std must be positive; got {std}")
    if not n_std > 0:
        raise ValueError(f"n_std must be positive; got {n_std}")
    if min_count < 1:
        raise ValueError(f"min_count must be a positive integer; got {min_count}")
