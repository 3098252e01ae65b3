"""Autoregressive models of binary data with exact likelihoods: MADE and PixelCNN.

Both factorise p(x) = Π_d p(x_{o(d)} | x_{o(<d)}) over an ordering o of the D binary dimensions, with
Bernoulli conditionals whose logits come from ONE network pass over x, made autoregressive by masking its
weights. So

.. math::  \\log p(x) = \\sum_d x_d \\log \\sigma(l_d) + (1 - x_d) \\log(1 - \\sigma(l_d))
           = -\\sum_d \\mathrm{BCE}(l_d, x_d),

exact, in nats, and normalised by construction: the sum over all 2^D binary x is 1 (tests check it).
Sampling is sequential: D passes, each fixing one more dimension.

* :class:`MaskedConv2d` (seed 003, Q4; van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent
  Neural Networks"): a convolution whose k x k kernel is multiplied by a mask. With 1-based kernel indices
  and centre c = (k + 1) / 2, type A keeps rows i < c and, in row c, columns j < c; type B also keeps the
  centre (j <= c). For k = 3 these are the seed's M^A and M^B. A first layer of type A and later layers of
  type B keep output pixel (i, j) a function of the pixels before it in raster order only.
* :class:`MaskedLinear` and :class:`MADE` (Germain, Gregor, Murray & Larochelle 2015, "MADE: Masked
  Autoencoder for Distribution Estimation"): every unit gets a degree m; input d has degree o^{-1}(d) in
  1..D, hidden units degrees in {min m_{l-1}, ..., D - 1}; a hidden weight is kept iff
  m_l(k) >= m_{l-1}(k'), an output weight iff m_out(d) > m_L(k) (eqs. 12-13 of the paper).
* Order- and connectivity-agnostic training (Germain et al. 2015, sections 4.2-4.3), ``n_orderings = K > 1``:
  K mask sets (set 0 in the natural order, sets 1..K-1 with a random ordering and random hidden degrees,
  all drawn once from ``seed``); training step t uses set t mod K, so every process and a resumed run use
  the set an uninterrupted one-process run uses. ``log_prob`` is the ensemble in PROBABILITY space,
  log p(x) = logsumexp_k log p_k(x) - log K: a uniform mixture of K normalised autoregressive models, so
  still exact and normalised; ``sample`` draws the mixture component first, then samples in its ordering.
  (The paper's variant that also feeds the mask to the network is not implemented.)

Evaluation logs ``val/nll`` and ``test/nll`` in nats per example and ``val/bpd``, ``test/bpd`` in bits per
dimension, nll / (D ln 2), through torchmetrics ``MeanMetric`` (sum and count), so W processes log the
one-process numbers.

Their networks are not plug-ins: the masks ARE the factorisation, so a user sizes them (MADE's ``hidden``,
PixelCNN's ``channels``, ``n_layers``, kernels and ``head_channels``) and chooses the optimiser and schedule
(``optimizer``, ``lr_scheduler``: Lightning's ``OptimizerCallable`` / ``LRSchedulerCallable``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from zoo.gaussian import upcast
from zoo.guards import check_data, check_finite
from zoo.noise import mix_key, step_choice
from zoo.pixels import bits_per_dim
from zoo.plugins import LRSchedulerCallable, OptimizerCallable, adam, configure_single, live_arguments

MaskType = Literal["A", "B"]
_ORDERING_STREAM = 20

# -- masked layers -------------------------------------------------------------------------------------------


def pixelcnn_mask(kernel_size: int, mask_type: MaskType) -> Tensor:
    """The ``[k, k]`` 0/1 mask of seed 003 Q4 for odd ``k``: rows above the centre, and in the centre row the
    columns left of it (type ``"A"``) or up to and including it (type ``"B"``).

    >>> pixelcnn_mask(3, "A")
    tensor([[1., 1., 1.],
            [1., 0., 0.],
            [0., 0., 0.]])
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B'; got {mask_type!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd integer (the mask needs a centre); got {kernel_size}"
        )
    c = kernel_size // 2
    mask = torch.zeros(kernel_size, kernel_size)
    mask[:c] = 1.0
    mask[c, : c + (mask_type == "B")] = 1.0
    return mask


# What to do with non-binary data: binarise where the datamodule can; 8-bit images need an 8-bit likelihood.
BINARY_FIX = (
    "binarised data (Digits / MNIST with --data.binarize dynamic or static); for 8-bit images (CIFAR10, "
    "ImageFolder, uint8 Arrays) use a family with an 8-bit likelihood: Flow, VAE with "
    "--model.likelihood gaussian, or Diffusion (bits/dim of the 8-bit images, zoo.pixels)"
)


class MaskedConv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose kernel is multiplied by :func:`pixelcnn_mask` (a buffer) at every call, so
    the masked weights get zero gradient and never leak. ``padding`` defaults to ``kernel_size // 2`` (the
    output has the input's height and width). Kernels act on one channel group: all input channels at the
    allowed positions feed every output channel (single-channel images, as the zoo's binary data).

    Example (the seed's two-layer network on a 5x5 map)::

        >>> net = nn.Sequential(MaskedConv2d(1, 1, 3, "A"), MaskedConv2d(1, 1, 3, "B"))
        >>> net(torch.zeros(1, 1, 5, 5)).shape
        torch.Size([1, 1, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: MaskType = "A",
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        mask = pixelcnn_mask(kernel_size, mask_type)
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.mask_type = mask_type
        self.register_buffer("mask", mask[None, None])  # [1, 1, k, k], broadcast over channels

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}"


class MaskedLinear(nn.Linear):
    """``y = x (W ⊙ M_s)ᵀ + b`` with one of S binary connectivity masks ``M_s [out, in]`` (a buffer
    ``masks [S, out, in]``), chosen per call by ``mask_set``: MADE's layer (Germain et al. 2015, eq. 10)."""

    def __init__(self, in_features: int, out_features: int, masks: Tensor) -> None:
        super().__init__(in_features, out_features)
        masks = masks if masks.dim() == 3 else masks[None]
        if masks.shape[1:] != (out_features, in_features):
            raise ValueError(f"masks must be [S, {out_features}, {in_features}]; got {tuple(masks.shape)}")
        self.register_buffer("masks", masks.to(torch.float32))

    def forward(self, x: Tensor, mask_set: int = 0) -> Tensor:
        return F.linear(x, self.weight * self.masks[mask_set], self.bias)


def made_degrees(
    dim: int, hidden: Sequence[int], ordering: Tensor | None, generator: torch.Generator
) -> list[Tensor]:
    """Degrees of MADE's units, input first: input d gets its 1-based position in ``ordering`` (natural
    order when ``None``), each hidden unit a uniform draw from {min of the previous layer, ..., D - 1}."""
    if ordering is None:
        ordering = torch.arange(dim)
    inputs = torch.empty(dim, dtype=torch.long)
    inputs[ordering] = torch.arange(1, dim + 1)
    degrees = [inputs]
    for width in hidden:
        low = int(degrees[-1].min())
        degrees.append(torch.randint(low, dim, (width,), generator=generator))
    return degrees


def made_masks(degrees: list[Tensor]) -> list[Tensor]:
    """MADE's masks from the degrees: hidden ``M[k, k'] = m_l(k) >= m_{l-1}(k')``, output
    ``M[d, k] = m_0(d) > m_L(k)`` (the output for dimension d sits where input d does)."""
    masks = [(b[:, None] >= a[None, :]).float() for a, b in pairwise(degrees)]
    masks.append((degrees[0][:, None] > degrees[-1][None, :]).float())
    return masks


# -- what both families share --------------------------------------------------------------------------------


class _BinaryAutoregressive(L.LightningModule):
    """Training, evaluation and metrics of an autoregressive model of binary data with an exact
    ``log_prob``; subclasses define ``log_prob``, ``sample`` and :meth:`training_loss`. ``optimizer=None``
    is Adam at ``lr``; a given ``optimizer`` (``params -> Optimizer``) ignores ``lr``."""

    shape: tuple[int, ...]

    def __init__(
        self,
        lr: float,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive; got {lr}")
        self.lr = float(lr)
        self._optimizer_callable, self._lr_scheduler_callable = optimizer, lr_scheduler
        self.val_nll, self.val_bpd = MeanMetric(), MeanMetric()
        self.test_nll, self.test_bpd = MeanMetric(), MeanMetric()

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def training_loss(self, batch: Tensor) -> Tensor:
        """-log p(x) averaged over the batch, nats per example (the single-objective capability)."""
        return -self.log_prob(batch).mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        check_data(self, batch, "binary", fix=BINARY_FIX)
        loss = self.training_loss(batch)
        check_finite(self, "train/loss", loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, x: Tensor, prefix: str, nll: MeanMetric, bpd: MeanMetric) -> None:
        log_p = self.log_prob(x)  # [B], nats
        nll.update(-log_p)
        bpd.update(bits_per_dim(log_p, self.dim))
        self.log(f"{prefix}/nll", nll, prog_bar=prefix == "val")
        self.log(f"{prefix}/bpd", bpd)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_nll, self.val_bpd)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_nll, self.test_bpd)

    def configure_optimizers(self):
        return configure_single(self, adam(self.lr))

    def _uniforms(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        """Uniforms for sampling, drawn up front (in float32, on the module's device) from ``generator``."""
        return torch.rand(shape, generator=generator, device=self.device, dtype=torch.float32)


def _bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """Σ_d log Bernoulli(x_d; σ(l_d)) over all but the first dimension, ``[B]``; in float32 at least (under
    autocast the network's logits are bf16/fp16: the cross-entropy and its sum over D terms are not)."""
    logits = upcast(logits)
    return -F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").flatten(1).sum(1)


# -- MADE ----------------------------------------------------------------------------------------------------


class MADE(_BinaryAutoregressive):
    """Masked autoencoder for distribution estimation (Germain et al. 2015) for binary data of any shape.

    Args:
        shape: shape of one example (linked from the datamodule by the CLI), e.g. ``(1, 8, 8)``; D >= 2.
        hidden: widths of the masked hidden layers (ReLU between them).
        n_orderings: K mask sets (orderings and hidden connectivity); K > 1 trains order- and
            connectivity-agnostically and evaluates the K-component ensemble (module docstring).
        lr: learning rate of the default optimiser (Adam); ignored when ``optimizer`` is given.
        seed: seed of the orderings and hidden degrees (drawn once, kept as buffers).
        optimizer: a callable ``params -> Optimizer`` (``OptimizerCallable``); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler`` (``LRSchedulerCallable``), stepped every
            optimizer step; None: a constant learning rate.

    Example:
        >>> made = MADE(shape=(10,), hidden=(32,), n_orderings=2)
        >>> x = made.sample(4, generator=torch.Generator().manual_seed(0))
        >>> made.log_prob(x).shape, made.log_prob(x, mask_set=1).shape
        (torch.Size([4]), torch.Size([4]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: Sequence[int] = (500,),
        n_orderings: int = 1,
        lr: float = 1e-3,
        seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(lr, optimizer, lr_scheduler)
        shape, hidden = tuple(int(s) for s in shape), tuple(int(h) for h in hidden)
        if not shape or any(s <= 0 for s in shape) or math.prod(shape) < 2:
            raise ValueError(f"shape must be positive sizes with at least 2 dimensions in all; got {shape}")
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be one or more positive widths; got {hidden}")
        if n_orderings < 1:
            raise ValueError(f"n_orderings must be a positive integer; got {n_orderings}")
        self.save_hyperparameters(ignore=live_arguments(optimizer=optimizer, lr_scheduler=lr_scheduler))
        self.shape, self.hidden, self.n_orderings, self.seed = shape, hidden, int(n_orderings), int(seed)
        dim = math.prod(shape)
        orderings, per_set = [], []
        for s in range(self.n_orderings):
            generator = torch.Generator().manual_seed(mix_key(self.seed, _ORDERING_STREAM, s))
            ordering = torch.arange(dim) if s == 0 else torch.randperm(dim, generator=generator)
            orderings.append(ordering)
            per_set.append(made_masks(made_degrees(dim, hidden, ordering, generator)))
        # orderings[s][t] is the dimension sampled t-th under mask set s
        self.register_buffer("orderings", torch.stack(orderings))
        sizes = [dim, *hidden, dim]
        self.layers = nn.ModuleList(
            MaskedLinear(a, b, torch.stack([masks[i] for masks in per_set]))
            for i, (a, b) in enumerate(pairwise(sizes))
        )

    def logits(self, x: Tensor, mask_set: int = 0) -> Tensor:
        """Logits ``[B, *shape]`` of p(x_d = 1 | x_{<d}) for every d at once, under mask set ``mask_set``."""
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h, mask_set)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h.reshape(x.shape)

    def log_prob(self, x: Tensor, mask_set: int | None = None) -> Tensor:
        """Exact log p(x), ``[B]`` nats. ``mask_set=None``: the ensemble logsumexp_k log p_k(x) - log K;
        an integer: that one autoregressive model."""
        if mask_set is not None or self.n_orderings == 1:
            return _bernoulli_log_prob(self.logits(x, mask_set or 0), x)
        each = torch.stack([_bernoulli_log_prob(self.logits(x, s), x) for s in range(self.n_orderings)])
        return torch.logsumexp(each, dim=0) - math.log(self.n_orderings)

    def training_loss(self, batch: Tensor) -> Tensor:
        """-log p_s(x) averaged over the batch for this step's mask set: s = global_step mod K under a
        Trainer, uniform on every call outside one (:func:`zoo.noise.step_choice`)."""
        return -self.log_prob(batch, mask_set=step_choice(self, self.n_orderings)).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``[n, *shape]``: a mask set s ~ U{0..K-1} (the ensemble's component), then D
        passes, pass t fixing dimension ``orderings[s][t]`` from its Bernoulli conditional."""
        component = torch.randint(self.n_orderings, (n,), generator=generator, device=self.device)
        u = self._uniforms((n, self.dim), generator)
        x = torch.zeros(n, self.dim, device=self.device, dtype=self.dtype)
        for s in range(self.n_orderings):
            rows = (component == s).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            xs, us = x[rows], u[rows]
            for d in self.orderings[s].tolist():
                p = torch.sigmoid(self.logits(xs, s)[:, d].float())
                xs[:, d] = (us[:, d] < p).to(xs.dtype)
            x[rows] = xs
        return x.reshape(n, *self.shape)


# -- PixelCNN ------------------------------------------------------------------------------------------------


class PixelCNN(_BinaryAutoregressive):
    """PixelCNN (van den Oord et al. 2016) for binary single-channel images, raster order.

    Network: a type-A ``kernel_size`` masked convolution to ``channels`` maps, ``n_layers - 1`` residual
    blocks h <- h + MaskedConv2d_B(ReLU(h)) with ``hidden_kernel_size`` kernels, then ReLU, 1x1 to
    ``head_channels`` maps, ReLU, 1x1 to one logit per pixel. The input is fed as 2x - 1, so the zero padding
    differs from a black pixel. Like the original masked PixelCNN it has a blind spot: the seed's BB figure
    (pixel (2, 5) missing from the field of (3, 3)) grows with depth, so some earlier pixels never reach a
    conditional; the model is still exact, it just ignores them.

    Args:
        shape: ``(1, H, W)``, linked from the datamodule by the CLI.
        channels: feature maps in every hidden layer.
        n_layers: masked convolutions in all (the type-A one included).
        kernel_size: odd kernel of the type-A input layer (7 in the paper).
        hidden_kernel_size: odd kernel of the type-B layers (3 in the paper).
        lr: learning rate of the default optimiser (Adam); ignored when ``optimizer`` is given.
        head_channels: maps of the 1x1 output head's hidden layer; None: ``channels``.
        optimizer: a callable ``params -> Optimizer`` (``OptimizerCallable``); None: Adam at ``lr``.
        lr_scheduler: a callable ``optimizer -> scheduler`` (``LRSchedulerCallable``), stepped every
            optimizer step; None: a constant learning rate.

    Example:
        >>> model = PixelCNN(shape=(1, 4, 4), channels=8, n_layers=2, kernel_size=3)
        >>> x = model.sample(2, generator=torch.Generator().manual_seed(0))
        >>> x.shape, model.log_prob(x).shape
        (torch.Size([2, 1, 4, 4]), torch.Size([2]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 64,
        n_layers: int = 5,
        kernel_size: int = 7,
        hidden_kernel_size: int = 3,
        lr: float = 1e-3,
        head_channels: int | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(lr, optimizer, lr_scheduler)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] != 1 or min(shape) < 1:
            raise ValueError(
                f"PixelCNN models single-channel images, shape (1, H, W); got shape={shape}. "
                "Use MADE for other shapes."
            )
        head = channels if head_channels is None else head_channels
        if channels < 1 or n_layers < 1 or head < 1:
            raise ValueError(
                f"channels, n_layers and head_channels must be positive; got {channels}, {n_layers}, {head}"
            )
        for name, k in (("kernel_size", kernel_size), ("hidden_kernel_size", hidden_kernel_size)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer; got {k}")
        self.save_hyperparameters(ignore=live_arguments(optimizer=optimizer, lr_scheduler=lr_scheduler))
        self.shape, self.channels, self.n_layers = shape, int(channels), int(n_layers)
        self.input_layer = MaskedConv2d(1, channels, kernel_size, "A")
        self.blocks = nn.ModuleList(
            MaskedConv2d(channels, channels, hidden_kernel_size, "B") for _ in range(n_layers - 1)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, head, 1), nn.ReLU(), nn.Conv2d(head, 1, 1))
        # how far (in rows up, and columns either way) the conditional of one pixel can look
        self.reach = kernel_size // 2 + (n_layers - 1) * (hidden_kernel_size // 2)

    def logits(self, x: Tensor) -> Tensor:
        """Logits ``[B, 1, H', W']`` of p(x_ij = 1 | pixels before (i, j)) for every pixel of ``x``."""
        h = self.input_layer(2.0 * x - 1.0)
        for block in self.blocks:
            h = h + block(F.relu(h))
        return self.head(h)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = Σ_ij log Bernoulli(x_ij; σ(l_ij)), ``[B]`` nats."""
        return _bernoulli_log_prob(self.logits(x), x)

    def conditional_logit(self, x: Tensor, i: int, j: int) -> Tensor:
        """The logit ``[B]`` of pixel (i, j), computed on the window of rows i - reach..i and columns
        j - reach..j + reach only: no masked layer looks down, and the rest lies outside the pixel's cone, so
        the value is that of :meth:`logits` (the window is what makes sampling affordable)."""
        r0, c0, c1 = max(0, i - self.reach), max(0, j - self.reach), min(x.shape[-1], j + self.reach + 1)
        return self.logits(x[:, :, r0 : i + 1, c0:c1])[:, 0, i - r0, j - c0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws ``[n, 1, H, W]``, pixel by pixel in raster order (H·W network passes)."""
        _, height, width = self.shape
        u = self._uniforms((n, height, width), generator)
        x = torch.zeros(n, *self.shape, device=self.device, dtype=self.dtype)
        for i in range(height):
            for j in range(width):
                p = torch.sigmoid(self.conditional_logit(x, i, j).float())
                x[:, 0, i, j] = (u[:, i, j] < p).to(x.dtype)
        return x
