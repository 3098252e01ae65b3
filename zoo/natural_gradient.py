"""Natural gradient for any module with an exact ``log_prob`` and a ``sample``: Fisher-vector products and
conjugate gradient, never forming the Fisher matrix.

Steepest descent in the KL geometry (seed 001, "Use Natural Gradients in Deep Learning"; Amari 1998): minimise
the linearised loss ∇L(θ)ᵀh subject to KL[p_θ ‖ p_{θ+h}] = const. Because KL[p_θ ‖ p_{θ+δ}] ≈ ½ δᵀ F δ, with

    F = ∇²_δ KL[p_θ ‖ p_{θ+δ}] |_{δ=0} = -E_{p_θ}[∇² log p_θ(x)] = E_{p_θ}[∇ log p_θ(x) ∇ log p_θ(x)ᵀ]

(seed 001 derives the first equality: the KL and its gradient vanish at δ = 0, so F is the KL's Hessian there;
the last one is the Fisher information), the Lagrangian gives h = -(1/λ) F⁻¹ ∇L, and the update is

    θ ← θ - lr (F + damping · I)⁻¹ ∇L(θ).

F is never formed: conjugate gradient solves (F + damping I) d = ∇L from Fisher-vector products estimated on
``n_samples`` draws x_i ~ p_θ (``model.sample``, detached), by double backward through ``model.log_prob``:

* ``fisher="outer"`` (default): F v ≈ (1/N) Jᵀ (J v), J = ∂ log p_θ(x_i) / ∂θ [N, P]; J v by the double-vjp
  trick (J v = ∂/∂u [(Jᵀ u) · v]), Jᵀ w by one backward. Positive semi-definite for any sample, so CG is safe.
* ``fisher="kl_hessian"``: F v ≈ ∇_θ[(∇_θ KL̂) · v] with KL̂(θ') = (1/N) Σ_i [log p_θ(x_i) - log p_θ'(x_i)], the
  Hessian-vector product of seed 001's KL. Exact (sample-free) wherever -∇² log p does not depend on x, e.g.
  for a Gaussian's mean (F_μμ = Σ⁻¹), so one step with lr = 1 lands on the maximum-likelihood mean.

The Fisher samples come from a generator keyed by ``(seed, step)`` (:mod:`zoo.noise`), so every DDP process
uses the same F (the gradient is all-reduced by DDP), and the step counter is in the optimizer's state_dict,
so a resumed run continues exactly. torch.func's jvp would do J v too; double backward is used because it
works for every operator (RELIABILITY.md #7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from zoo.capabilities import ExactLikelihood, Samplable, require
from zoo.noise import mix_key

Fisher = Literal["outer", "kl_hessian"]


def _flat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def _unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in like:
        out.append(vector[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


def fisher_vector_product(log_prob: Tensor, params: Sequence[Tensor], fisher: Fisher = "outer") -> Callable:
    """The map v ↦ F v (flat vectors of all ``params``) for per-example ``log_prob [N]`` of samples x_i ~ p_θ,
    built with a graph to ``params``; the graph is kept, so the map can be applied many times (CG)."""
    n = log_prob.shape[0]
    params = list(params)
    if fisher == "outer":
        u = torch.zeros_like(log_prob, requires_grad=True)
        jt_u = torch.autograd.grad(log_prob, params, grad_outputs=u, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(jt_u) if g is not None]  # Jᵀu, linear in u

        def product(v: Tensor) -> Tensor:
            vs = _unflat(v, params)
            (jv,) = torch.autograd.grad(
                [jt_u[i] for i in used], u, grad_outputs=[vs[i] for i in used], retain_graph=True
            )  # J v, [N]
            jt_jv = torch.autograd.grad(
                log_prob, params, grad_outputs=jv / n, retain_graph=True, allow_unused=True
            )
            return _flat(jt_jv, params)

        return product
    if fisher == "kl_hessian":
        kl_grad = torch.autograd.grad(-log_prob.mean(), params, create_graph=True, allow_unused=True)

        def product(v: Tensor) -> Tensor:
            vs = _unflat(v, params)
            pairs = [(g, w) for g, w in zip(kl_grad, vs, strict=True) if g is not None and g.requires_grad]
            if not pairs:
                return torch.zeros_like(v)
            hv = torch.autograd.grad(
                [g for g, _ in pairs], params, grad_outputs=[w for _, w in pairs], retain_graph=True,
                allow_unused=True,
            )  # fmt: skip
            return _flat(hv, params)

        return product
    raise ValueError(f"fisher must be 'outer' or 'kl_hessian'; got {fisher!r}")


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, max_iter: int = 50, tol: float = 1e-10
) -> tuple[Tensor, int]:
    """Solve A x = b for symmetric positive-definite A given only ``matvec``; stops when ||r||² <= tol ||b||².
    Returns x and the number of iterations (Hestenes & Stiefel 1952)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    threshold = tol * rr
    for i in range(max_iter):
        if rr <= threshold:
            return x, i
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, max_iter


class NaturalGradient(torch.optim.Optimizer):
    """θ ← θ - lr (F + damping I)⁻¹ ∇L, F the Fisher of ``model`` at θ (see the module docstring).

    Args:
        params: the parameters to update (of ``model``; others are treated as constants of p_θ).
        model: a module with ``sample(n, generator=None)`` and an exact ``log_prob(x) -> [B]``; ``None``
            until :meth:`bind_model` binds it (what a family's ``configure_optimizers`` does through
            :func:`zoo.plugins.build_optimizer`, so the optimiser can be a family's ``optimizer`` argument).
        lr: step size; 1 is the full natural-gradient (Fisher-scoring) step.
        damping: Tikhonov damping added to F (also bounds the step where F is near singular).
        fisher: ``"outer"`` or ``"kl_hessian"`` Fisher-vector products.
        n_samples: model samples per step for the Fisher estimate.
        cg_iters: conjugate-gradient iterations per step (at most).
        cg_tol: relative squared-residual tolerance of CG.
        seed: seed of the Fisher samples (keyed with the step count).

    Example:
        >>> from zoo.explicit_gaussian import ExplicitGaussian
        >>> model = ExplicitGaussian(shape=(2,))
        >>> optimizer = NaturalGradient(model.parameters(), model, lr=1.0)
        >>> def closure():
        ...     optimizer.zero_grad(); loss = model.training_loss(torch.randn(64, 2) + 3); loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)

    As a family's ``optimizer`` (the family binds itself as the model)::

        ExplicitGaussian(shape=(2,), optimizer=functools.partial(NaturalGradient, lr=1.0, damping=1e-4))

    or in a recipe::

        optimizer:
          class_path: zoo.natural_gradient.NaturalGradient
          init_args: {lr: 1.0, damping: 0.0001, n_samples: 512}
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        model: nn.Module | None = None,
        lr: float = 1.0,
        damping: float = 1e-4,
        fisher: Fisher = "outer",
        n_samples: int = 256,
        cg_iters: int = 50,
        cg_tol: float = 1e-10,
        seed: int = 0,
    ) -> None:
        if lr <= 0 or damping < 0:
            raise ValueError(f"need lr > 0 and damping >= 0; got lr={lr}, damping={damping}")
        if fisher not in ("outer", "kl_hessian"):
            raise ValueError(f"fisher must be 'outer' or 'kl_hessian'; got {fisher!r}")
        if n_samples < 1 or cg_iters < 1:
            raise ValueError(f"n_samples and cg_iters must be positive; got {n_samples}, {cg_iters}")
        super().__init__(params, dict(lr=lr, damping=damping))
        self.model: nn.Module | None = None
        self.fisher, self.n_samples = fisher, n_samples
        self.cg_iters, self.cg_tol, self.seed = cg_iters, cg_tol, seed
        self.last_cg_iters = 0
        if model is not None:
            self.bind_model(model)

    def bind_model(self, model: nn.Module) -> None:
        """Use ``model``'s ``sample`` and ``log_prob`` for the Fisher (checked: both must exist)."""
        require(model, ExactLikelihood, "NaturalGradient")
        require(model, Samplable, "NaturalGradient")
        self.model = model

    def _step_count(self) -> int:
        first = self.param_groups[0]["params"][0]
        return int(self.state[first].get("step", 0))

    def fisher_product(self, params: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
        """v ↦ F v at the current θ on this step's model samples."""
        if self.model is None:
            raise RuntimeError(
                "NaturalGradient has no model: pass model=... or call bind_model(module) before step() "
                "(a family's configure_optimizers does it through zoo.plugins.build_optimizer)"
            )
        device = params[0].device
        generator = torch.Generator(device=device).manual_seed(mix_key(self.seed, self._step_count()))
        with torch.no_grad():
            x = self.model.sample(self.n_samples, generator=generator).detach()
        with torch.enable_grad():
            log_prob = self.model.log_prob(x)
            return fisher_vector_product(log_prob, params, self.fisher)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        damping = self.param_groups[0]["damping"]
        with torch.enable_grad():
            product = self.fisher_product(params)
            gradient = _flat([p.grad for p in params], params).detach()
            direction, self.last_cg_iters = conjugate_gradient(
                lambda v: product(v).detach() + damping * v, gradient, self.cg_iters, self.cg_tol
            )
        lrs = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        step = self._step_count() + 1
        with torch.no_grad():
            for p, d in zip(params, _unflat(direction, params), strict=True):
                p.add_(d, alpha=-lrs[id(p)])
        first = self.param_groups[0]["params"][0]
        self.state[first]["step"] = torch.tensor(step)
        return loss
