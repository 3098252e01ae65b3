"""Episodes for learning concepts from sets (Set2Model, prototypical networks): a set of ``set_size``
images of one class, and queries from that class (members, label 1) and from the others (label 0).

Training episodes use only ``train_classes``; validation and test episodes only ``test_classes`` (held-out
concepts, the images of those classes split in two halves, one for val and one for test), so ``val/map``
measures how well the model learns NEW concepts from a few examples.

A batch is ``(sets [B, set_size, *shape], queries [B, n_queries, *shape], labels [B, n_queries])``,
``B`` episodes. Episode ``i`` of a split is a function of ``(seed, split, i)`` (and, for training, the
epoch: fresh episodes every epoch), so it is the same on every process, after a resume, and for any
number of processes; ``batch_size`` counts episodes and is global (:class:`datamodules.base.ShardSampler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import sklearn.datasets
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import TensorDataModule, check_choice, check_int, derive_seed, generator
from datamodules.images import read_idx

_STREAMS = {"train": 0, "val": 1, "test": 2}


class EpisodeDataset(Dataset):
    """``length`` episodes drawn from ``images`` of ``classes``; item ``i`` is one episode (see module doc).

    The class is uniform over ``classes``; the set and the member queries are distinct images of it; the
    non-member queries are distinct images of the other classes; the queries are shuffled.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, classes: Sequence[int], set_size: int, n_queries: int,
        n_positives: int, length: int, seed: int, stream: int, per_epoch: bool,
    ) -> None:  # fmt: skip
        self.images, self.classes = images, list(classes)
        self.pools = [torch.nonzero(labels == c).squeeze(-1) for c in self.classes]
        for c, pool in zip(self.classes, self.pools, strict=True):
            if len(pool) < set_size + n_positives:
                raise ValueError(
                    f"class {c} has {len(pool)} images, fewer than set_size + n_positives = "
                    f"{set_size + n_positives}"
                )
        self.set_size, self.n_queries, self.n_positives = set_size, n_queries, n_positives
        self.length, self.seed, self.stream = length, seed, stream
        self.epoch, self.per_epoch = 0, per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Called by :class:`ShardSampler`; only training episodes change with the epoch."""
        if self.per_epoch:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def episode(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Indices of the set ``[set_size]``, of the queries ``[n_queries]`` and the queries' labels."""
        g = generator(derive_seed(self.seed, self.stream, self.epoch, index))
        c = int(torch.randint(len(self.classes), (), generator=g))
        own = self.pools[c][torch.randperm(len(self.pools[c]), generator=g)]
        members = own[: self.set_size]
        positives = own[self.set_size : self.set_size + self.n_positives]
        others = torch.cat([p for k, p in enumerate(self.pools) if k != c])
        negatives = others[torch.randperm(len(others), generator=g)[: self.n_queries - self.n_positives]]
        queries = torch.cat([positives, negatives])
        labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
        order = torch.randperm(len(queries), generator=g)
        return members, queries[order], labels[order]

    def __getitem__(self, index: int):
        return tuple(t[0] for t in self.__getitems__([index]))

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        members, queries, labels = zip(*(self.episode(int(i)) for i in indices), strict=True)
        return self.images[torch.stack(members)], self.images[torch.stack(queries)], torch.stack(labels)


class Episodes(TensorDataModule):
    """Episodic batches over a labelled image set, disjoint training and held-out classes.

    Args:
        base: ``"Digits"`` (scikit-learn's 8x8 digits, 1,797 images, no download) or ``"MNIST"`` (the IDX
            files in ``root``, default ``$GENZOO_DATA/mnist`` or ``../shared/data/mnist``; the t10k files
            when the train files are absent).
        set_size: images per set.
        n_queries: queries per episode.
        n_positives: member queries per episode; default ``max(1, round(n_queries / #classes))``, i.e. the
            class frequency of the split (a retrieval pool drawn from all classes).
        train_classes, test_classes: disjoint label lists.
        train_episodes: episodes per training epoch (fresh ones every epoch).
        val_episodes, test_episodes: fixed evaluation episodes (from the two halves of the held-out
            classes' images).
        batch_size: GLOBAL number of episodes per batch.
    """

    def __init__(
        self,
        base: Literal["Digits", "MNIST"] = "Digits",
        set_size: int = 5,
        n_queries: int = 20,
        n_positives: int | None = None,
        train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
        test_classes: Sequence[int] = (6, 7, 8, 9),
        train_episodes: int = 1024,
        val_episodes: int = 256,
        test_episodes: int = 256,
        root: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_choice("base", base, ("Digits", "MNIST"))
        for name, value, low in (("set_size", set_size, 1), ("n_queries", n_queries, 2),
                                 ("train_episodes", train_episodes, 1), ("val_episodes", val_episodes, 1),
                                 ("test_episodes", test_episodes, 1)):  # fmt: skip
            check_int(name, value, low)
        train_classes, test_classes = [int(c) for c in train_classes], [int(c) for c in test_classes]
        if len(set(train_classes)) < 2 or len(set(test_classes)) < 2:
            raise ValueError("train_classes and test_classes need at least 2 classes each")
        if set(train_classes) & set(test_classes):
            raise ValueError(
                "train_classes and test_classes must be disjoint; both hold "
                f"{sorted(set(train_classes) & set(test_classes))}"
            )
        if n_positives is not None:
            check_int("n_positives", n_positives, 1)
            if n_positives >= n_queries:
                raise ValueError(
                    f"n_positives={n_positives} leaves no non-member among n_queries={n_queries}"
                )
        self.base, self.root = base, root
        self.set_size, self.n_queries, self.n_positives = set_size, n_queries, n_positives
        self.train_classes, self.test_classes = train_classes, test_classes
        self.lengths = {"train": train_episodes, "val": val_episodes, "test": test_episodes}
        self.shape = (1, 8, 8) if base == "Digits" else (1, 28, 28)
        self.levels = 17 if base == "Digits" else 256  # the base's pixels: k / 16 or k / 255

    def load(self) -> tuple[Tensor, Tensor]:
        """All images ``[M, 1, H, W]`` in [0, 1] and their labels ``[M]``."""
        if self.base == "Digits":
            digits = sklearn.datasets.load_digits()
            images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
            return images, torch.from_numpy(digits.target).long()
        from datamodules import shared_data_dir

        root = Path(self.root) if self.root else shared_data_dir() / "mnist"
        for prefix in ("train", "t10k"):
            names = [f"{prefix}-{kind}-idx{dims}-ubyte" for kind, dims in (("images", 3), ("labels", 1))]
            found = [next((p for p in (root / f"{n}.gz", root / n) if p.is_file()), None) for n in names]
            if all(found):
                images = torch.from_numpy(read_idx(found[0]).copy()).float().div(255.0).unsqueeze(1)
                return images, torch.from_numpy(read_idx(found[1]).astype(np.int64))
        raise FileNotFoundError(
            f"Episodes(base='MNIST'): no train-* or t10k-* images+labels IDX files in {root}; "
            "set root or GENZOO_DATA"
        )

    def build(self) -> list[EpisodeDataset]:
        images, labels = self.load()
        held = torch.isin(labels, torch.tensor(self.test_classes))
        perm = torch.randperm(len(labels), generator=generator(derive_seed(self.seed, 7)))
        held_idx = perm[held[perm]]  # held-out images in a seeded order, split in halves
        halves = {"val": held_idx[: len(held_idx) // 2], "test": held_idx[len(held_idx) // 2 :]}
        subsets = {
            "train": torch.nonzero(torch.isin(labels, torch.tensor(self.train_classes))).squeeze(-1),
            **halves,
        }
        out = []
        for split, idx in subsets.items():
            classes = self.train_classes if split == "train" else self.test_classes
            n_pos = self.n_positives or max(1, round(self.n_queries / len(classes)))
            out.append(EpisodeDataset(
                images[idx], labels[idx], classes, self.set_size, self.n_queries, n_pos, self.lengths[split],
                self.seed, _STREAMS[split], per_epoch=split == "train",
            ))  # fmt: skip
        return out
