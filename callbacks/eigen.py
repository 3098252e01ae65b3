"""Eigenvalues of the training dynamics: the game Jacobian (games) and the loss Hessian (single objectives).

Game (``Game`` capability, ``game(batch) -> [(L_i, params_i), ...]``, player i minimises L_i). The dynamics
field is the direction simultaneous gradient descent moves, without learning rates,

.. math::  v(θ) = (-∇_{θ_1} L_1, \\dots, -∇_{θ_m} L_m), \\qquad J = ∂v / ∂θ,

so a stationary point is locally asymptotically stable when every eigenvalue of J has a NEGATIVE real part,
and imaginary parts measure rotation (seed 002 Q5; Mescheder, Nowozin & Geiger 2017, "The numerics of GANs").
Known answers: the Dirac-GAN at (ψ0, ψ1, θ) = (0, 0, 0) has {-1/2, ±i/2} without a penalty and
{-1/2, (-γ ± sqrt(γ² - 1))/2} with R1 weight γ; the bilinear game min_x max_y x·y has ±i.

Single objective (``SingleObjective`` capability, ``training_loss(batch) -> scalar``): the eigenvalues of the
loss Hessian H = ∇²L, all >= 0 at a minimum (the sign is the opposite of the game convention: for one player
the field is v = -∇L and J = -H).

Products, never the matrix (for ``k`` given):

* J u by the double-vjp trick: with w a dummy vector, g(w) = ∂/∂θ (v · w) = Jᵀ w (``create_graph=True``) is
  linear in w, and ∂/∂w (g(w) · u) = J u. The graph of g is built once per probe and reused by every product.
* H u by double backward: ∂/∂θ (∇L · u).
* Eigenvalues: Arnoldi (``scipy.sparse.linalg.eigs``, J is not symmetric) and Lanczos (``eigsh``) on a
  float64 ``LinearOperator`` (RELIABILITY.md #9). Products are taken in the module's dtype.

Under DDP (RELIABILITY.md #6) the products are computed on the unwrapped module on each rank's shard and
all-reduced (mean) before ARPACK sees them; every rank starts from the same seeded vector, receives the same
reduced products and so runs the same iterations and takes the same stop decisions: the spectrum is that of
the global objective, and no rank waits for another.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs, eigsh
from torch import Tensor

from callbacks.run import log_image
from zoo.capabilities import Game, SingleObjective, require
from zoo.sharding import gathered

GameWhich = Literal["LM", "LR", "SR"]
HessianWhich = Literal["LA", "SA", "LM", "BE"]
GAME_WHICH: tuple[str, ...] = ("LM", "LR", "SR")
HESSIAN_WHICH: tuple[str, ...] = ("LA", "SA", "LM", "BE")
Reduce = Callable[[Tensor], Tensor]


# -- the probe: eval mode, gradients on, buffers untouched ----------------------------------------------


@contextmanager
def probing(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm, dropout) and gradients enabled for the probe; afterwards every submodule's mode
    and every buffer are restored, so a probe leaves no trace on training (e.g. a REINFORCE baseline that
    ``training_loss`` updates)."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    module.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _flat(grads, params: list[Tensor]) -> Tensor:
    """Concatenate gradients into one vector, zeros for ``None`` (a parameter the output does not reach)."""
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def game_vector_field(module, batch) -> tuple[Tensor, list[Tensor]]:
    """The dynamics field v = (-∇_{θ_i} L_i)_i of ``module.game(batch)``, flattened in the players' order,
    with its graph (differentiable again), and the parameters in the same order."""
    require(module, Game, "game_vector_field")
    pieces, params, seen = [], [], set()
    for loss, player in module.game(batch):
        player = [p for p in player if p.requires_grad]
        if any(id(p) in seen for p in player):
            raise ValueError(f"{type(module).__name__}.game returns players that share a parameter")
        seen.update(id(p) for p in player)
        if not player:
            continue
        grads = torch.autograd.grad(loss, player, create_graph=True, allow_unused=True)
        pieces.append(-_flat(grads, player))
        params += player
    if not params:
        raise ValueError(f"{type(module).__name__}.game returns no parameter that requires grad")
    return torch.cat(pieces), params


class _Products:
    """u -> M u for M = J (game) or H (Hessian) through autograd, all-reduced, float64 numpy in and out."""

    def __init__(self, vector: Tensor, params: list[Tensor], kind: Literal["jacobian", "hessian"], reduce):
        self.vector, self.params, self.reduce = vector, params, reduce
        self.n, self.count = vector.numel(), 0
        self.dtype, self.device = vector.dtype, vector.device
        self.kind, self.w, self.jt_w = kind, None, None

    def _local(self, u: Tensor) -> Tensor:
        if not self.vector.requires_grad:  # the field / gradient is constant: M = 0
            return torch.zeros_like(u)
        if self.kind == "hessian":
            out = torch.autograd.grad(self.vector, self.params, u, retain_graph=True, allow_unused=True)
            return _flat(out, self.params)
        if self.w is None:  # built once, reused by every product
            self.w = torch.zeros_like(self.vector, requires_grad=True)  # the dummy vector of the trick
            jt_w = torch.autograd.grad(self.vector, self.params, self.w, create_graph=True, allow_unused=True)
            self.jt_w = _flat(jt_w, self.params)  # Jᵀ w, linear in w
        if not self.jt_w.requires_grad:  # J = 0
            return torch.zeros_like(u)
        (out,) = torch.autograd.grad(self.jt_w, self.w, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if out is None else out

    def __call__(self, u: np.ndarray) -> np.ndarray:
        self.count += 1
        x = torch.as_tensor(np.asarray(u, dtype=np.float64).reshape(-1), device=self.device).to(self.dtype)
        out = self._local(x).detach()
        if self.reduce is not None:
            out = self.reduce(out.clone())
        return out.double().cpu().numpy()

    def rows(self) -> np.ndarray:
        """The dense matrix from its rows: row i = Mᵀ e_i by one vjp of the vector (n backward passes, one
        graph), all-reduced once. For small problems only."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        if not self.vector.requires_grad:
            matrix = torch.zeros_like(eye)
        else:
            matrix = torch.stack(
                [
                    _flat(
                        torch.autograd.grad(
                            self.vector, self.params, e, retain_graph=True, allow_unused=True
                        ),
                        self.params,
                    )
                    for e in eye
                ]
            )
        if self.reduce is not None:
            matrix = self.reduce(matrix.detach().clone())
        return matrix.detach().double().cpu().numpy()

    def columns(self) -> np.ndarray:
        """The dense matrix from n products M e_j (the matrix-free path, for n too small for ARPACK)."""
        return np.stack([self(e) for e in np.eye(self.n)], axis=1)


def _start_vector(n: int, seed: int) -> np.ndarray:
    """ARPACK's start vector: the same on every rank (seeded), so every rank runs the same iterations."""
    return np.random.default_rng(seed).standard_normal(n)


def _sort(values: np.ndarray, which: str) -> np.ndarray:
    """Order eigenvalues by ``which``: LM by decreasing |λ|, LR/LA by decreasing real part, SR/SA by
    increasing real part, BE increasing; ties broken by real then imaginary part (a reproducible order)."""
    values = np.asarray(values)
    re, im = values.real, values.imag
    if which == "LM":
        order = np.lexsort((-im, -re, -np.round(np.abs(values), 12)))
    elif which in ("LR", "LA"):
        order = np.lexsort((-im, -re))
    else:  # SR, SA, BE
        order = np.lexsort((im, re))
    return values[order]


def _select(values: np.ndarray, k: int | None, which: str) -> np.ndarray:
    """The ``k`` eigenvalues ``which`` asks for out of all of them (BE: k // 2 from the low end, the rest from
    the high end, as ARPACK does), in the order of :func:`_sort`."""
    if k is None or k >= len(values):
        return _sort(values, which)
    if which == "BE":
        ordered = np.sort(values.real)
        low, high = k // 2, k - k // 2
        return np.concatenate([ordered[:low], ordered[len(ordered) - high :]])
    return _sort(values, which)[:k]


def _check(k: int | None, which: str, allowed: tuple[str, ...], name: str) -> None:
    if which not in allowed:
        raise ValueError(
            f"{name}: which={which!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{name}: k must be a positive integer or None (all eigenvalues); got {k!r}")


def _default_tol(tol: float | None, dtype: torch.dtype) -> float:
    """ARPACK's relative tolerance: ``None`` -> 100 machine epsilons of the products' dtype (1.2e-5 for
    float32, 2.2e-14 for float64); products cannot be trusted to more than that."""
    return float(100 * torch.finfo(dtype).eps) if tol is None else float(tol)


def game_jacobian_eigenvalues(
    module,
    batch,
    k: int | None = None,
    which: GameWhich = "LM",
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    reduce: Reduce | None = None,
) -> Tensor:
    """Eigenvalues of the Jacobian J = ∂v/∂θ of the dynamics field v = (-∇_{θ_i} L_i)_i, ``complex128 [k]``.

    Stable ⇔ every real part < 0 (seed 002 Q5's convention). ``k=None``: all n eigenvalues from the dense J
    (n vjps; small games). ``k`` given: the k ``which`` asks for (``"LM"`` largest magnitude, ``"LR"``
    largest real part, ``"SR"`` smallest real part) by Arnoldi on J-vector products (the matrix is never
    formed); ARPACK needs k < n - 1, so for k >= n - 1 the n products J e_j are collected instead.
    ``tol``/``maxiter`` go to ``scipy.sparse.linalg.eigs`` (``tol=None``: 100 epsilons of the module's dtype);
    ``seed`` seeds the start vector; ``reduce`` (e.g. an all-reduce mean) is applied to every product. Ordered
    as ``which`` says (LM: decreasing |λ|). Raises ``ArpackNoConvergence`` (with the converged values) when
    Arnoldi does not converge.

    Example:
        >>> from zoo import DiracGAN
        >>> game_jacobian_eigenvalues(DiracGAN(theta=0.0).double(), torch.zeros(1, 1, dtype=torch.float64))
        tensor([ 0.0000+0.5000j,  0.0000-0.5000j, -0.5000+0.0000j],
               dtype=torch.complex128)
    """
    _check(k, which, GAME_WHICH, "game_jacobian_eigenvalues")
    require(module, Game, "game_jacobian_eigenvalues")
    with probing(module):
        field, params = game_vector_field(module, batch)
        products = _Products(field, params, "jacobian", reduce)
        n = products.n
        if k is None:
            values = np.linalg.eigvals(products.rows())
        elif k >= n - 1:
            values = np.linalg.eigvals(products.columns())
        else:
            operator = LinearOperator((n, n), matvec=products, dtype=np.float64)
            values = eigs(
                operator,
                k=k,
                which=which,
                v0=_start_vector(n, seed),
                tol=_default_tol(tol, field.dtype),
                maxiter=maxiter,
                return_eigenvectors=False,
            )
    return torch.from_numpy(_select(values.astype(np.complex128), k, which).copy())


def hessian_eigenvalues(
    module,
    batch,
    k: int | None,
    which: HessianWhich = "LA",
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    reduce: Reduce | None = None,
) -> Tensor:
    """Extreme eigenvalues of the Hessian of ``module.training_loss(batch)`` over every parameter that
    requires grad, ``float64 [k]``; >= 0 at a minimum.

    ``k`` eigenvalues ``which`` asks for (``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest magnitude,
    ``"BE"`` both ends) by Lanczos (``scipy.sparse.linalg.eigsh`` in float64) on Hessian-vector products
    from double backward; ``k=None`` (or k >= n) forms the matrix (small models only) and uses ``eigvalsh``.
    Ordered as ``which`` says (LA decreasing, SA and BE increasing, LM by decreasing |λ|). Other arguments
    as in :func:`game_jacobian_eigenvalues`.
    """
    _check(k, which, HESSIAN_WHICH, "hessian_eigenvalues")
    require(module, SingleObjective, "hessian_eigenvalues")
    with probing(module):
        params = [p for p in module.parameters() if p.requires_grad]
        loss = module.training_loss(batch)
        grads = _flat(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)
        products = _Products(grads, params, "hessian", reduce)
        n = products.n
        if k is None:
            matrix = products.rows()
            values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        elif k >= n:
            matrix = products.columns()
            values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
        else:
            operator = LinearOperator((n, n), matvec=products, dtype=np.float64)
            values = eigsh(
                operator,
                k=k,
                which=which,
                v0=_start_vector(n, seed),
                tol=_default_tol(tol, grads.dtype),
                maxiter=maxiter,
                return_eigenvectors=False,
            )
    return torch.from_numpy(_select(np.asarray(values, dtype=np.float64), k, which).copy())


# -- the callback ------------------------------------------------------------------------------------------


def spectrum_metrics(
    eigenvalues: Tensor, mode: Literal["game", "hessian"], which: str = "BE"
) -> dict[str, float]:
    """The logged summary of one spectrum, over the COMPUTED eigenvalues: with ``k`` and ``which="LM"`` these
    are the k largest in magnitude, so ``eig/max_real`` is the largest real part among them; ``which="LR"``
    gives the rightmost eigenvalue of the whole spectrum (the stability question).

    Game: ``eig/max_real`` (max Re λ: < 0 means locally stable), ``eig/max_abs`` (max |λ|; the largest stable
    step size of simultaneous gradient descent is bounded by it), ``eig/max_imag_over_real`` (max |Im λ| /
    |Re λ|: rotation against damping; |Re λ| is floored at 1e-6 · max |λ|, so a purely imaginary eigenvalue
    reads 1e6). Hessian: ``eig/max`` and ``eig/min`` of the computed eigenvalues (the extreme ones with
    ``which="BE"`` or all eigenvalues; only ``eig/max`` for ``"LA"``, only ``eig/min`` for ``"SA"``,
    ``eig/max_abs`` for ``"LM"``).
    """
    if eigenvalues.numel() == 0:
        return {}
    if mode == "game":
        values = eigenvalues.to(torch.complex128)
        magnitude = values.abs()
        floor = 1e-6 * float(magnitude.max())
        ratio = values.imag.abs() / values.real.abs().clamp(min=floor) if floor > 0 else torch.zeros(1)
        return {
            "eig/max_real": float(values.real.max()),
            "eig/max_abs": float(magnitude.max()),
            "eig/max_imag_over_real": float(ratio.max()),
        }
    values = eigenvalues.real.double()
    if which == "LA":
        return {"eig/max": float(values.max())}
    if which == "SA":
        return {"eig/min": float(values.min())}
    if which == "LM":
        return {"eig/max_abs": float(values.abs().max())}
    return {"eig/max": float(values.max()), "eig/min": float(values.min())}


def spectrum_plot(history: list[dict], mode: Literal["game", "hessian"], title: str = ""):
    """A PIL image of the recorded spectra: games in the complex plane (Re λ, Im λ; the stable half-plane is
    Re λ < 0), Hessians as eigenvalue against step. Colour by step, the latest probe in red. No legend and
    fixed margins: matplotlib's legend and tight_layout would double the ~65 ms a picture costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    steps = np.concatenate([np.full(len(h["eigenvalues"]), h["step"]) for h in history])
    values = np.concatenate([h["eigenvalues"].numpy().astype(np.complex128) for h in history])
    last = history[-1]["eigenvalues"].numpy().astype(np.complex128)
    if mode == "game":
        ax.scatter(values.real, values.imag, c=steps, cmap="viridis", s=8, alpha=0.6)
        ax.scatter(last.real, last.imag, c="tab:red", s=24)
        ax.axvline(0.0, c="0.5", lw=0.8, ls="--")
        ax.axhline(0.0, c="0.8", lw=0.5)
        ax.set_xlabel("Re λ  (stable: < 0)")
        ax.set_ylabel("Im λ  (rotation)")
    else:
        ax.scatter(steps, values.real, c=steps, cmap="viridis", s=8, alpha=0.6)
        ax.scatter(np.full(len(last), history[-1]["step"]), last.real, c="tab:red", s=24)
        ax.axhline(0.0, c="0.5", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("Hessian eigenvalue  (minimum: >= 0)")
    ax.set_title(f"{title}\nsteps {history[0]['step']}-{history[-1]['step']} (red: latest)", fontsize=9)
    fig.subplots_adjust(left=0.17, right=0.96, bottom=0.12, top=0.87)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class EigenvalueTracker(Callback):
    """Every ``every_n_steps`` optimizer steps (and after the last batch), the eigenvalues of the training
    dynamics on a fixed batch: the game Jacobian for modules with ``game`` (``mode="game"``), the loss Hessian
    for modules with ``training_loss`` (``mode="hessian"``); ``"auto"`` prefers the game.

    Logs ``eig/max_real``, ``eig/max_abs``, ``eig/max_imag_over_real`` (games) or ``eig/max``, ``eig/min``
    (Hessians; see :func:`spectrum_metrics`) to every logger at the probe's step, and, on rank 0, a picture
    ``eig/spectrum`` of all spectra so far (:func:`spectrum_plot`).

    The fixed batch is the first GLOBAL training batch: at the first batch every rank's shard is all-gathered
    (in global order) and kept; each rank then probes its own interleaved rows of it, so one process and W
    processes see the same examples, and the products are all-reduced (mean): the spectrum of the global
    objective. Every rank takes part in every product; only rank 0 draws. The batch, the step of the last
    probe and the history of spectra are in :meth:`state_dict`, so a resumed run continues.

    Args:
        every_n_steps: probe cadence in optimizer steps (``trainer.global_step``). The default 5000 keeps a
            Hessian probe of the demo VAE within 5% of training time (benchmarks/eigen_overhead.py); cheap
            probes (small games) afford far denser cadences.
        k: number of eigenvalues by Arnoldi / Lanczos; ``None`` forms the dense matrix and returns all of them
            (refused above :attr:`MAX_DENSE` parameters: set ``k`` then).
        mode: ``"auto"``, ``"game"`` or ``"hessian"``.
        which: which eigenvalues: ``"auto"`` (games: ``"LM"``; Hessians: ``"LA"``, the largest, with ``k``
            given, all of them when dense), or one of ``"LM"``, ``"LR"``, ``"SR"`` (games), ``"LA"``,
            ``"SA"``, ``"LM"``, ``"BE"`` (Hessians). The low end of a network's Hessian sits in a dense bulk
            near 0: ``"SA"``/``"BE"`` take hundreds to thousands of products where ``"LA"`` takes 20-50.
        tol: ARPACK's relative tolerance; 1e-3 is plenty for a curve (the extreme Ritz values converge much
            faster than the residual: seen 1e-6 relative on the VAE); ``None``: 100 epsilons of the dtype.
        maxiter: ARPACK's iteration limit (``None``: its default, 10 n); a probe that does not converge logs
            the eigenvalues that did and warns.
        at_end: also probe after the last training batch of the fit.
        plot_every_n_probes: draw the spectrum picture (rank 0) every this many probes and always at the
            fit's last probe; 0: only at the last. A picture costs ~65 ms of matplotlib, more than a probe of
            a small game (the Dirac-GAN's takes ~4 ms).
        seed: seed of ARPACK's start vector (the same on every rank).

    Example::

        trainer = Trainer(callbacks=[EigenvalueTracker(every_n_steps=100)])
        trainer.fit(DiracGAN(gamma=0.5), Dirac())
    """

    MAX_DENSE = 2048

    def __init__(
        self,
        every_n_steps: int = 5000,
        k: int | None = None,
        mode: Literal["auto", "game", "hessian"] = "auto",
        which: Literal["auto", "LM", "LR", "SR", "LA", "SA", "BE"] = "auto",
        tol: float | None = 1e-3,
        maxiter: int | None = None,
        at_end: bool = True,
        plot_every_n_probes: int = 1,
        seed: int = 0,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer; got {every_n_steps!r}")
        if mode not in ("auto", "game", "hessian"):
            raise ValueError(f"mode must be 'auto', 'game' or 'hessian'; got {mode!r}")
        allowed = {"auto", *GAME_WHICH, *HESSIAN_WHICH}
        if which not in allowed:
            raise ValueError(
                f"which={which!r} is not allowed; choose one of {', '.join(map(repr, sorted(allowed)))}"
            )
        if mode == "game" and which not in ("auto", *GAME_WHICH):
            raise ValueError(f"which={which!r} is for Hessians; a game takes 'auto', 'LM', 'LR' or 'SR'")
        if mode == "hessian" and which not in ("auto", *HESSIAN_WHICH):
            raise ValueError(
                f"which={which!r} is for games; a Hessian takes 'auto', 'LA', 'SA', 'LM' or 'BE'"
            )
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or None (all eigenvalues, dense); got {k!r}")
        if tol is not None and tol < 0:
            raise ValueError(f"tol must be >= 0 or None; got {tol}")
        if maxiter is not None and maxiter < 1:
            raise ValueError(f"maxiter must be a positive integer or None; got {maxiter}")
        self.every_n_steps, self.k, self.mode, self.which = every_n_steps, k, mode, which
        if plot_every_n_probes < 0:
            raise ValueError(
                f"plot_every_n_probes must be >= 0 (0: only the last probe); got {plot_every_n_probes}"
            )
        self.tol, self.maxiter, self.at_end, self.seed = tol, maxiter, at_end, seed
        self.plot_every_n_probes = plot_every_n_probes
        self.resolved_mode: Literal["game", "hessian"] | None = None if mode == "auto" else mode
        self.batch = None  # the fixed global batch (CPU), captured at the first training batch
        self.last_step = -1  # global_step of the last probe
        self.history: list[dict] = []  # [{"step": int, "eigenvalues": Tensor}]
        self.latest: dict[str, float] = {}
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:  # Lightning asks for it at every hook call: computed once
        if self._state_key is None:
            self._state_key = self._generate_state_key(
                mode=self.mode, every_n_steps=self.every_n_steps, k=self.k
            )
        return self._state_key

    # -- capability and policy ------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # it only acts while training
            return
        name = type(self).__name__
        if self.mode == "game":
            require(pl_module, Game, name)
        elif self.mode == "hessian":
            require(pl_module, SingleObjective, name)
        elif callable(getattr(pl_module, "game", None)):
            self.resolved_mode = "game"
        elif callable(getattr(pl_module, "training_loss", None)):
            self.resolved_mode = "hessian"
        else:
            raise TypeError(
                f"{name}(mode='auto') needs a module with the Game capability (`game`) or the "
                f"SingleObjective capability (`training_loss`); {type(pl_module).__name__} has neither "
                "`game` nor `training_loss`."
            )
        allowed = GAME_WHICH if self.resolved_mode == "game" else HESSIAN_WHICH
        if self.which not in ("auto", *allowed):
            raise ValueError(
                f"{name}(which={self.which!r}) does not apply to a {self.resolved_mode}; choose 'auto' or "
                f"one of {', '.join(map(repr, allowed))}"
            )
        n = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.k is None and n > self.MAX_DENSE:
            raise ValueError(
                f"{name}(k=None) forms the dense {n} x {n} matrix of {type(pl_module).__name__}; that is "
                f"above MAX_DENSE={self.MAX_DENSE}: set k (e.g. k=2): Arnoldi / Lanczos on products."
            )

    @property
    def resolved_which(self) -> str:
        if self.which != "auto":
            return self.which
        if self.resolved_mode == "game":
            return "LM"
        return "BE" if self.k is None else "LA"

    def should_probe(self, trainer: Trainer, batch_idx: int) -> bool:
        """The cadence (override for another policy): ``every_n_steps`` optimizer steps after the last
        probe, and after the last batch of the fit when ``at_end``; never twice at one step. Must give the
        same answer on every rank (it uses only the trainer's counters)."""
        step = trainer.global_step
        if step == self.last_step or step == 0:
            return False
        return step - max(self.last_step, 0) >= self.every_n_steps or (
            self.at_end and _last_batch(trainer, batch_idx)
        )

    # -- hooks --------------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.batch is None:  # every rank is here at the same batch: the all-gather is safe
            self.batch = _global_batch(trainer, batch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.should_probe(trainer, batch_idx):
            self.probe(trainer, pl_module, last=_last_batch(trainer, batch_idx))

    def probe(self, trainer: Trainer, pl_module: LightningModule, last: bool = False) -> Tensor:
        """One probe on every rank (all take part in the products); logs and draws on rank 0. ``last``: the
        fit's last probe (always drawn)."""
        mode, which, step = self.resolved_mode, self.resolved_which, trainer.global_step
        batch = _local_batch(self.batch, trainer, pl_module)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="mean")) if trainer.world_size > 1 else None
        options = dict(tol=self.tol, maxiter=self.maxiter, seed=self.seed, reduce=reduce)
        function = game_jacobian_eigenvalues if mode == "game" else hessian_eigenvalues
        try:  # FSDP2 (zoo.sharding): the products differentiate w.r.t. the full, gathered parameters
            with gathered(pl_module):
                eigenvalues = function(pl_module, batch, self.k, which, **options)
        except ArpackNoConvergence as error:  # the same on every rank: the products are the same
            eigenvalues = torch.as_tensor(np.asarray(error.eigenvalues))
            eigenvalues = eigenvalues.double() if mode == "hessian" else eigenvalues.to(torch.complex128)
            rank_zero_warn(
                f"EigenvalueTracker: ARPACK did not converge at step {step} ({len(eigenvalues)} of {self.k} "
                f"eigenvalues converged); raise maxiter or tol."
            )
        self.last_step = step
        self.history.append({"step": step, "eigenvalues": eigenvalues.detach().cpu()})
        self.latest = spectrum_metrics(eigenvalues, mode, which)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in self.latest.items()})
        if trainer.is_global_zero:  # no collective below
            for logger in trainer.loggers:
                logger.log_metrics(self.latest, step=step)
            every = self.plot_every_n_probes
            if len(eigenvalues) and (last or (every and len(self.history) % every == 0)):
                title = f"{type(pl_module).__name__}: {'game Jacobian' if mode == 'game' else 'Hessian'}"
                log_image(trainer, "eig/spectrum", spectrum_plot(self.history, mode, title), f"step {step}")
        return eigenvalues

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"batch": self.batch, "last_step": self.last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batch = state_dict["batch"]
        self.last_step = int(state_dict["last_step"])
        self.history = list(state_dict["history"])


def _last_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended is the last one of the fit (``max_steps`` or the last batch of the
    last epoch; an early stop is not foreseen)."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


def _global_batch(trainer: Trainer, batch):
    """The global batch on the CPU: every rank's shard all-gathered and interleaved back into global order
    (the example at global position p = i·W + r is row i of rank r, datamodules.base.ShardSampler)."""
    world = trainer.world_size

    def gather(t: Tensor) -> Tensor:
        if world == 1:
            return t.detach().cpu().clone()
        gathered = trainer.strategy.all_gather(t.detach().contiguous())  # [W, b, ...]
        return gathered.transpose(0, 1).reshape(-1, *t.shape[1:]).cpu()

    return apply_to_collection(batch, Tensor, gather)


def _local_batch(batch, trainer: Trainer, pl_module: LightningModule):
    """This rank's interleaved rows of the global batch, on the module's device."""
    rank, world = trainer.global_rank, trainer.world_size
    return apply_to_collection(batch, Tensor, lambda t: t[rank::world].to(pl_module.device))
