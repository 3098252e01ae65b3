"""Synthetic low-dimensional data: 2-D toy densities (Toy2D) and a point mass (Dirac)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import sklearn.datasets
import torch
import torch.distributions as D
from torch import Tensor

from datamodules.base import InMemoryDataset, TensorDataModule, check_int, generator, make_splits

ToyName = Literal["8gaussians", "25gaussians", "swissroll", "moons", "checkerboard"]
TOY_NAMES: tuple[str, ...] = get_args(ToyName)
WITH_LOG_PROB = ("8gaussians", "25gaussians", "checkerboard")


def _random_state(g: torch.Generator | None) -> int:
    """A numpy ``random_state`` for scikit-learn drawn from a torch generator."""
    return int(torch.randint(0, 2**31 - 1, (), generator=g))


class Toy2D(TensorDataModule):
    """Classic 2-D densities of the GAN / flow literature; shape ``(2,)``.

    * ``8gaussians``: equal mixture of 8 isotropic Gaussians, means ``2 (cos 2πi/8, sin 2πi/8)``,
      std 0.02.
    * ``25gaussians``: equal mixture of 25 isotropic Gaussians, means on the grid ``{-4,-2,0,2,4}^2``,
      std 0.05.
    * ``checkerboard``: uniform on the 8 black squares of a 4x4 board on ``[-4, 4)^2`` with side 2; the
      square holding ``(x, y)`` is black iff ``floor(x/2) + floor(y/2)`` is even (so ``(-3, -3)`` is
      black); density ``1/32`` there, 0 elsewhere (as in FFJORD, Grathwohl et al. 2019).
    * ``moons``: ``sklearn.datasets.make_moons(noise=0.1)`` mapped by ``2 x + (-1, -0.2)`` (FFJORD).
    * ``swissroll``: the ``(x, z)`` coordinates of ``sklearn.datasets.make_swiss_roll(noise=0.5)``
      divided by 3.5, so roughly in ``[-4, 4]^2``.

    Exact ``log_prob`` exists for the two mixtures (``MixtureSameFamily``) and the checkerboard; the
    mixtures also expose ``centers [M, 2]`` and ``std``. The ``n_train + n_val + n_test`` examples are
    drawn with a generator seeded by ``seed`` and split at random by ``seed``.

    Example:
        >>> dm = Toy2D("8gaussians", n_train=100, n_val=10, n_test=10, batch_size=20)
        >>> dm.setup(); next(iter(dm.train_dataloader())).shape
        torch.Size([20, 2])
    """

    def __init__(
        self,
        name: ToyName = "8gaussians",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 2000,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if name not in TOY_NAMES:
            raise ValueError(f"unknown Toy2D name {name!r}; choose one of {', '.join(TOY_NAMES)}")
        check_int("n_train", n_train, 1)
        check_int("n_val", n_val, 0)
        check_int("n_test", n_test, 0)
        self.name, self.sizes = name, (n_train, n_val, n_test)
        self.shape = (2,)
        self.levels = None  # continuous data

    @property
    def has_log_prob(self) -> bool:
        return self.name in WITH_LOG_PROB

    @property
    def centers(self) -> Tensor:
        """Means of the mixture components ``[M, 2]`` (mixtures only)."""
        if self.name == "8gaussians":
            angle = 2 * math.pi * torch.arange(8) / 8
            return 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
        if self.name == "25gaussians":
            grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
            return torch.cartesian_prod(grid, grid)
        raise AttributeError(f"Toy2D {self.name!r} is not a Gaussian mixture and has no centers")

    @property
    def std(self) -> float:
        """Standard deviation of every mixture component (mixtures only)."""
        stds = {"8gaussians": 0.02, "25gaussians": 0.05}
        if self.name not in stds:
            raise AttributeError(f"Toy2D {self.name!r} is not a Gaussian mixture and has no std")
        return stds[self.name]

    @staticmethod
    def black_squares() -> Tensor:
        """Lower-left corners ``[8, 2]`` of the checkerboard's black squares."""
        corners = torch.cartesian_prod(torch.arange(4), torch.arange(4))
        return (2.0 * corners[corners.sum(1) % 2 == 0] - 4.0).float()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` fresh examples ``[n, 2]`` (float32); ``generator=None`` uses torch's default one."""
        g = generator
        if self.name in ("8gaussians", "25gaussians"):
            centers = self.centers
            k = torch.randint(len(centers), (n,), generator=g)
            return centers[k] + self.std * torch.randn(n, 2, generator=g)
        if self.name == "checkerboard":
            k = torch.randint(8, (n,), generator=g)
            return self.black_squares()[k] + 2.0 * torch.rand(n, 2, generator=g)
        if self.name == "moons":
            x, _ = sklearn.datasets.make_moons(n, noise=0.1, random_state=_random_state(g))
            return torch.from_numpy(2.0 * x + [-1.0, -0.2]).float()
        x, _ = sklearn.datasets.make_swiss_roll(n, noise=0.5, random_state=_random_state(g))
        return torch.from_numpy(x[:, [0, 2]] / 3.5).float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` in nats, ``[B, 2] -> [B]``, in the dtype of ``x``."""
        if self.name in ("8gaussians", "25gaussians"):
            centers = self.centers.to(x)
            mixture = D.MixtureSameFamily(
                D.Categorical(logits=torch.zeros(len(centers), dtype=x.dtype, device=x.device)),
                D.Independent(D.Normal(centers, self.std), 1),
                validate_args=False,
            )
            return mixture.log_prob(x)
        if self.name == "checkerboard":
            inside = ((x >= -4) & (x < 4)).all(-1) & (torch.floor(x / 2).sum(-1) % 2 == 0)
            return torch.where(inside, -math.log(32.0), -math.inf).to(x)
        raise NotImplementedError(
            f"Toy2D {self.name!r} has no closed-form density; log_prob exists for {', '.join(WITH_LOG_PROB)}"
        )

    def build(self) -> list[InMemoryDataset]:
        data = self.sample(sum(self.sizes), generator(self.seed))
        return make_splits(data, self.sizes, self.seed)


class Dirac(TensorDataModule):
    """Point mass at ``loc``: every example is ``[loc]``, shape ``(1,)`` (the Dirac-GAN of Mescheder et al.
    2018, "Which training methods for GANs do actually converge?")."""

    def __init__(
        self,
        loc: float = 0.0,
        n_train: int = 1024,
        n_val: int = 256,
        n_test: int = 256,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_int("n_train", n_train, 1)
        check_int("n_val", n_val, 0)
        check_int("n_test", n_test, 0)
        self.loc, self.sizes = float(loc), (n_train, n_val, n_test)
        self.shape = (1,)
        self.levels = None  # a point mass on the real line, not a grid of levels

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` copies of ``[loc]`` (``generator`` is accepted for the common signature)."""
        return torch.full((n, 1), self.loc)

    def build(self) -> list[InMemoryDataset]:
        return make_splits(self.sample(sum(self.sizes)), self.sizes, self.seed)
