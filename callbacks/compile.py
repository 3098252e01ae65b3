"""Opt-in ``torch.compile`` of a family's networks, with no change in any family (issue 11 item 3).

``genzoo fit -c configs/vae_mnist.yaml --trainer.callbacks+=Compile`` (see docs/cli.md). At ``setup`` the
:class:`Compile` callback replaces the ``forward`` of each chosen submodule (VAE ``encoder`` / ``decoder``,
GAN ``generator`` / ``discriminator``, ...) by ``torch.compile(forward, ...)``, IN PLACE, as an instance
attribute:

* the module tree is unchanged, so ``state_dict`` keys are those of an eager run and checkpoints are
  interchangeable both ways (``torch.compile(module)`` would wrap it in an ``OptimizedModule`` whose keys get
  an ``_orig_mod.`` prefix);
* ``nn.Module.compile()`` is NOT used: in torch 2.13 it compiles ``Module._call_impl``, which dynamo skips,
  so it silently runs eager (checked: the output's ``grad_fn`` stays ``AddmmBackward0`` and dynamo's frame
  counter stays 0). Compiling the bound ``forward`` gives ``CompiledFunctionBackward`` graphs.
* the instance attribute is ``functools.partial(torch.compile(type(module).forward), module)``, not a
  compiled BOUND method: ``copy.deepcopy`` (``EMAWeightAveraging``, ``AveragedModel``) rebinds a partial's
  arguments to the copy, whereas a compiled bound method would keep calling the ORIGINAL module's forward;
* ``teardown`` restores the eager ``forward`` (the instance attribute is removed), so a module that outlives
  the fit can be pickled / deep-copied as usual.

Double backward. AOTAutograd (every backend but ``"eager"``: ``"aot_eager"``, ``"inductor"``) raises
``torch.compile with aot_autograd does not currently support double backward`` (or, with donated buffers,
``... requires create_graph=False and retain_graph=False``) when a compiled graph is differentiated twice.
A network is differentiated twice when (a) it is the opponent of an adversarial family with an R1/R2
penalty (``r1_gamma > 0`` or ``r2_gamma > 0``: ``autograd.grad(D(x).sum(), x, create_graph=True)`` then
``backward``), or (b) an ``EigenvalueTracker`` (Jacobian-vector products of the game) is in the trainer.
Such networks are left eager, with a warning naming them; the rest are compiled. Other families that
differentiate twice inside their own step (``NaturalGradient``, ``Set2Model``, ``DiracGAN``) are not
detected: list the modules to compile, or use ``backend="eager"``.
"""

from __future__ import annotations

import functools
from typing import Literal

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

Mode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_EAGER_BACKENDS = ("eager",)  # no AOTAutograd: double backward works


def auto_modules(module: nn.Module) -> list[str]:
    """The names of ``module``'s top-level children that hold parameters (torchmetrics metrics excluded)."""
    names = []
    for name, child in module.named_children():
        if type(child).__module__.startswith("torchmetrics"):
            continue
        if any(True for _ in child.parameters()):
            names.append(name)
    return names


def double_backward_modules(module: nn.Module, trainer: L.Trainer | None) -> dict[str, str]:
    """``{name: why}`` for the top-level networks that the training differentiates twice (see module doc)."""
    reasons: dict[str, str] = {}
    if trainer is not None:
        from callbacks.eigen import EigenvalueTracker

        if any(isinstance(c, EigenvalueTracker) for c in trainer.callbacks):
            for name in auto_modules(module):
                reasons[name] = "EigenvalueTracker differentiates the game twice"
    penalties = [f"{n}={getattr(module, n)}" for n in ("r1_gamma", "r2_gamma") if getattr(module, n, 0) > 0]
    opponent = getattr(module, "_opponent_name", None)
    if penalties and opponent is not None:
        reasons[opponent] = f"the R1/R2 penalty ({', '.join(penalties)}) differentiates it twice"
    return reasons


_CACHE: dict = {}


def _compiled_forward(cls: type, options: dict):
    """``torch.compile(cls.forward, **options)``, one per (class, options): dynamo's guards then tell
    instances and shapes apart (parameters are graph inputs), so a second model of the class reuses it."""
    key = (cls, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = torch.compile(cls.forward, **options)
    return _CACHE[key]


class Compile(Callback):
    """``torch.compile`` the ``forward`` of the named submodules of the LightningModule, in place.

    Args:
        modules: ``"auto"`` (every top-level child holding parameters: ``encoder``, ``decoder``,
            ``posterior_head`` for the VAE; ``generator``, ``discriminator`` for the GAN) or a list of
            attribute names (a dotted path reaches deeper: ``"generator.0"``).
        mode: ``torch.compile``'s mode (None: its default). ``"reduce-overhead"`` uses CUDA graphs.
        backend: ``"inductor"`` (the default, generates kernels), ``"aot_eager"`` (traces, no codegen; what
            the CPU tests use), ``"eager"`` (dynamo only) or any registered backend.
        dynamic: ``torch.compile``'s ``dynamic`` (False: specialise to each shape; the last batch of an
            epoch, if smaller, compiles once more).
        fullgraph: refuse graph breaks.

    Networks differentiated twice are left eager unless ``backend="eager"`` (module docstring). Compiling
    changes float rounding (fused kernels), not the maths: losses agree with eager to ~1e-6 relative in
    float32 (tests/test_compile.py).
    """

    def __init__(
        self,
        modules: Literal["auto"] | list[str] = "auto",
        mode: Mode | None = None,
        backend: str = "inductor",
        dynamic: bool = False,
        fullgraph: bool = False,
    ) -> None:
        if modules != "auto" and (isinstance(modules, str) or not all(isinstance(m, str) for m in modules)):
            raise ValueError(f"modules must be 'auto' or a list of attribute names; got {modules!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be None or one of {', '.join(map(repr, MODES))}; got {mode!r}")
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a backend name such as 'inductor'; got {backend!r}")
        self.modules = modules if modules == "auto" else list(modules)
        self.mode, self.backend, self.dynamic, self.fullgraph = mode, backend, bool(dynamic), bool(fullgraph)
        self.compiled: list[str] = []  # names compiled by the last setup (kept after teardown)
        self.skipped: dict[str, str] = {}  # name -> why it stayed eager
        self._originals: list[tuple[nn.Module, object]] = []

    def compile_modules(self, pl_module: nn.Module, trainer: L.Trainer | None = None) -> list[str]:
        """Compile the chosen submodules of ``pl_module`` (also usable without a Trainer); returns the names
        compiled. Calling it again on a module already compiled by this callback does nothing."""
        names = auto_modules(pl_module) if self.modules == "auto" else self.modules
        twice = {} if self.backend in _EAGER_BACKENDS else double_backward_modules(pl_module, trainer)
        for name in names:
            try:
                sub = pl_module.get_submodule(name)
            except AttributeError as error:
                children = ", ".join(n for n, _ in pl_module.named_children())
                raise ValueError(
                    f"Compile: {type(pl_module).__name__} has no submodule {name!r} (top-level: {children})"
                ) from error
            top = name.split(".")[0]
            if top in twice:
                self.skipped[name] = twice[top]
                continue
            if any(sub is m for m, _ in self._originals):
                continue
            own = sub.__dict__.get("forward")
            self._originals.append((sub, own))
            options = dict(
                mode=self.mode, backend=self.backend, dynamic=self.dynamic, fullgraph=self.fullgraph
            )
            if own is not None:  # an instance-level forward already: compile it as it is
                sub.forward = torch.compile(own, **options)
            else:  # the class's forward, unbound, with the module as first argument (see module docstring)
                sub.forward = functools.partial(_compiled_forward(type(sub), options), sub)
            self.compiled.append(name)
        if self.skipped:
            rank_zero_warn(
                "Compile: left eager (AOTAutograd, used by backend "
                f"{self.backend!r}, cannot differentiate a compiled graph twice): "
                + "; ".join(f"{n} ({why})" for n, why in self.skipped.items())
                + ". backend='eager' compiles them too, without generated kernels."
            )
        return list(self.compiled)

    def restore(self) -> None:
        """Put back the eager ``forward`` of every module this callback compiled."""
        for sub, original in self._originals:
            if original is None:
                sub.__dict__.pop("forward", None)
            else:
                sub.forward = original
        self._originals = []  # `compiled` and `skipped` stay readable after the fit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.compiled, self.skipped = [], {}
        self.compile_modules(pl_module, trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()
