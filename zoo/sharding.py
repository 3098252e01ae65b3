"""Sharded data-parallel training for every family: ``--trainer.strategy fsdp2`` (PyTorch's FSDP2).

Each process keeps 1/W of every sharded parameter, of its gradient and of its optimiser state (ZeRO-3); a
unit's full parameters exist only while it runs: ``fully_shard`` all-gathers them before the unit's forward
(and again for its backward) and frees them after (Zhao et al. 2023, "PyTorch FSDP"; the FSDP2 API is
``torch.distributed.fsdp.fully_shard``). Gradients are reduce-scattered (averaged over the W processes, as
DDP averages them), so W processes give the one-process numbers (tests/test_fsdp2.py).

What is sharded: :func:`sharded_units` of the LightningModule, each its own FSDP2 unit (the two players of a
game separately, so one player's step never gathers the other). A family may list them itself
(``sharded_units()``); the default is every direct child module that holds parameters (the elements of a
``ModuleList``), user networks included. Parameters outside every unit (a learned log-normaliser, a
family whose parameters are a handful of scalars) stay replicated, and their gradients are averaged over
the processes in the backward, as DDP would (:func:`average_replicated_gradients`).

Four rules make it exact where FSDP2 alone would not be:

1. Double backward (R1 / R2 penalties: ``autograd.grad(D(x).sum(), x, create_graph=True)``, then the loss's
   backward). The first backward would free the unit's gathered parameters that the second still needs
   (``setStorage: ... out of bounds for storage of size 0``; pytorch #172543). A family lists such units in
   ``double_backward_units()``; they stay gathered from their backward to the optimiser step.
2. A unit still gathered at an optimiser step would go on computing with its pre-step weights (FSDP2 only
   all-gathers a unit that is sharded), so the generator's step would run through the discriminator's stale
   copy (3e-3 from the DDP run after 16 steps). After every optimiser step the strategy reshards every unit
   (:meth:`FSDP2Strategy.optimizer_step`); the next forward gathers the new weights.
3. Every forward of a sharded unit is a collective, so a forward that runs on one process only (rank 0
   drawing a ``SampleGrid``) or a different number of times per process (uneven evaluation shards, a
   diagnostic's round-robin blocks) would hang. :func:`gathered` gathers every unit once, on every
   process, and keeps the full weights for rank-local work with no further collective; the strategy holds
   them gathered through validation / test / predict and the callbacks at a training epoch's end, and
   reshards at the next training batch. Evaluation therefore holds the full parameters (as DDP does) but no
   gradients or optimiser state.
4. Checkpoints are consolidated: rank 0 writes one ordinary ``.ckpt`` (full weights, full optimiser
   states), which ``Family.load_from_checkpoint(path)``, ``genzoo predict`` and ``genzoo test`` read in one
   process and which a sharded run resumes from (``save_distributed_checkpoint=True`` writes a folder of
   shards instead, for models whose full state does not fit in one process's memory).

Mixed precision: Lightning's ``--trainer.precision bf16-mixed`` (autocast), as under every other strategy:
parameters, gathers and gradient reductions stay float32, and the families' float32 islands (posterior
densities, log-sum-exps, penalties) stay float32. FSDP2's ``MixedPrecisionPolicy`` is not used: it casts the
parameters themselves, under those islands too. ``16-mixed`` is refused by Lightning for this strategy.

Diagnostics: the periodic ones (ELBO gap with refinement, divergence estimator, sample quality) and the
eigenvalue tracker's Hessian- / Jacobian-vector products run inside :func:`gathered`, so they differentiate
with respect to the full parameters exactly as under DDP (tests/test_fsdp2.py: the DDP numbers). A unit's
memory saving applies to training: evaluation and diagnostics hold the full weights (no gradients or
optimiser states) while they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

FSDP2 = "fsdp2"


# -- what is sharded -----------------------------------------------------------------------------------------


def sharded_units(module: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards, each separately: ``module.sharded_units()`` when the family lists them, else
    every direct child holding parameters (each element of a ``ModuleList`` / ``ModuleDict`` child), with
    zuko's lazy modules replaced by their networks (:func:`_units_within`); torchmetrics states are never
    sharded."""
    from torchmetrics import Metric

    listed = getattr(module, "sharded_units", None)
    if callable(listed):
        return list(listed())
    units: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, Metric):
            continue
        members = child.values() if isinstance(child, nn.ModuleDict) else child
        for member in members if isinstance(child, nn.ModuleList | nn.ModuleDict) else [child]:
            units.extend(_units_within(member))
    return units


def _units_within(module: nn.Module) -> list[nn.Module]:
    """``[module]`` if it holds parameters, except for a zuko lazy module (a flow, a lazy transform, or a
    module holding one): its ``forward`` returns a distribution or a transform that uses the parameters
    AFTER it returns, outside any forward FSDP2 could hook, so its units are the networks it calls on
    tensors (its outermost ``nn.Sequential``: zuko's hyper-networks); the rest of it stays replicated."""
    from zuko.lazy import LazyDistribution, LazyTransform

    if not any(True for _ in module.parameters()):
        return []
    if not any(isinstance(m, LazyDistribution | LazyTransform) for m in module.modules()):
        return [module]
    outermost: dict[str, nn.Module] = {}
    for name, inner in module.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in outermost)
        if isinstance(inner, nn.Sequential) and not inside and any(True for _ in inner.parameters()):
            outermost[name] = inner
    return list(outermost.values())


def double_backward_units(module: nn.Module) -> list[nn.Module]:
    """The units a double backward passes through (``module.double_backward_units()``; none by default)."""
    listed = getattr(module, "double_backward_units", None)
    return list(listed()) if callable(listed) else []


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """Every module of ``module`` that ``fully_shard`` manages."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def replicated_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that no unit shards (kept whole on every process): those outside every
    unit, and scalars (``fully_shard`` cannot split a 0-d tensor)."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if not isinstance(p, DTensor)]


def shard(module: LightningModule, mesh, reshard_after_forward: bool = True) -> list[nn.Module]:
    """``fully_shard`` each of :func:`sharded_units` over the 1-D data-parallel ``mesh``; units of
    :func:`double_backward_units` keep their gathered weights through backward (rule 1). Parameters left
    outside every unit are replicated with averaged gradients. Returns the units."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units = sharded_units(module)
    keep = {id(u) for u in double_backward_units(module)}
    for unit in units:
        if isinstance(unit, FSDPModule):
            continue
        scalars = {p for p in unit.parameters() if p.dim() == 0}
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
        if id(unit) in keep:
            unit.set_reshard_after_backward(False)
    module._genzoo_reshard_after_forward = reshard_after_forward  # what release() restores
    average_replicated_gradients(module, mesh.get_group())
    return units


def average_replicated_gradients(module: nn.Module, group) -> None:
    """Average the gradients of :func:`replicated_parameters` over ``group`` as each is accumulated in a
    backward (every process runs the same backward, so the hooks fire in the same order), as DDP does;
    skipped while :func:`gathered` (rank-local work)."""
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return

    def average(parameter: torch.Tensor) -> None:
        if getattr(module, "_genzoo_gathered", 0) == 0 and parameter.grad is not None:
            torch.distributed.all_reduce(parameter.grad, group=group)
            parameter.grad.div_(world)

    for parameter in replicated_parameters(module):
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(average)


# -- full weights for rank-local work ------------------------------------------------------------------------


def gather(module: nn.Module) -> None:
    """Gather every unit's full weights (a collective: every process calls it) and keep them: no reshard
    after forward or backward, no gradient reduction, so what follows may run on some processes only. Nested
    calls are counted; :func:`release` undoes the outermost."""
    depth = getattr(module, "_genzoo_gathered", 0)
    module._genzoo_gathered = depth + 1
    if depth:
        return
    for unit in fsdp_units(module):
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
        unit.set_requires_gradient_sync(False, recurse=False)
        unit.unshard()


def release(module: nn.Module, force: bool = False) -> None:
    """Undo :func:`gather` (all of it when ``force``): restore the units' settings and free the gathered
    weights. Local: no collective."""
    depth = getattr(module, "_genzoo_gathered", 0)
    if depth == 0:
        return
    module._genzoo_gathered = 0 if force else depth - 1
    if module._genzoo_gathered:
        return
    keep = {id(u) for u in double_backward_units(module)}
    after_forward = getattr(module, "_genzoo_reshard_after_forward", True)
    for unit in fsdp_units(module):
        unit.set_reshard_after_forward(after_forward, recurse=False)
        unit.set_reshard_after_backward(id(unit) not in keep, recurse=False)
        unit.set_requires_gradient_sync(True, recurse=False)
        unit.reshard()


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Full weights on every process for the block (entered by every process; a no-op for a module with no
    sharded unit): rank-local forwards and input gradients inside run with no collective."""
    if not fsdp_units(module):
        yield module
        return
    gather(module)
    try:
        yield module
    finally:
        release(module)


def is_sharded(module: nn.Module) -> bool:
    """Whether any part of ``module`` is an FSDP2 unit."""
    return bool(fsdp_units(module))


# -- the strategy --------------------------------------------------------------------------------------------


class _ShardedFirst(Callback):
    """The first of the callbacks (rule 3): gathers the weights at a training epoch's end on every process, so
    rank-0-only pictures (``SampleGrid``, ``DensityMap``) and uneven diagnostic blocks need no collective;
    reshards at the end of a validation epoch, of training and at a training batch's start, before any
    other callback touches the parameters (``EMAWeightAveraging`` swaps and copies sharded weights)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gather(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        release(pl_module, force=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        release(pl_module, force=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        release(pl_module, force=True)


class _GatheredLast(Callback):
    """The last of the callbacks: gathers the weights for a validation epoch (uneven shards, rank-local
    calls) after every other callback has set them up (``EMAWeightAveraging`` swaps its average in)."""

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gather(pl_module)


def _shard_weight_averages(trainer: Trainer, mesh) -> None:
    """Shard the averaged copy of every ``WeightAveraging`` callback (``EMAWeightAveraging``) like the model:
    it was deep-copied from the unsharded module at ``setup`` (FSDP2 modules cannot be deep-copied), so its
    shards are the model's, and averaging, swapping and copying run shard by shard (1/W of the memory)."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.distributed.fsdp import fully_shard

    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if isinstance(callback, WeightAveraging) else None
        if average is not None and not is_sharded(average.module):
            for unit in sharded_units(average.module):
                fully_shard(unit, mesh=mesh, ignored_params={p for p in unit.parameters() if p.dim() == 0})


def _sharded_like(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``state`` (full tensors) with each entry that is a DTensor in ``reference`` distributed like it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def like(name: str, value: Any) -> Any:
        target = reference.get(name)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            return distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
        return value

    return {name: like(name, value) for name, value in state.items()}


def _full_tensors(value: Any) -> Any:
    """``value`` with every DTensor replaced by its full tensor on the CPU (a collective per DTensor: every
    process walks the same structure in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return type(value)((k, _full_tensors(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(_full_tensors(v) for v in value)
    return value


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as data-parallel FSDP2 for any LightningModule, registered as
    ``"fsdp2"`` (``Trainer(strategy="fsdp2")`` after ``import zoo``; ``--trainer.strategy fsdp2``).

    It shards the module itself (:func:`shard`), so a family needs no ``configure_model``; a module whose
    own ``configure_model`` already applied ``fully_shard`` is left as it is. ``devices``, ``num_nodes`` and
    ``precision`` as for any strategy; the mesh is 1-D (data parallel over every process, no tensor
    parallelism).

    Args:
        reshard_after_forward: free a unit's gathered weights after its forward (ZeRO-3, the default) or keep
            them until its backward (less communication, more memory).
        save_distributed_checkpoint: False (default): one consolidated ``.ckpt`` written by rank 0; True: a
            folder of per-process shards (Lightning's distributed checkpoint).
    """

    strategy_name = FSDP2

    def __init__(
        self,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process data-parallel (Lightning's auto: one per node)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Trainer) -> None:
        """Shard (unless the module sharded itself), then ModelParallelStrategy's setup, whose check for a
        ``configure_model`` override this strategy does not need."""
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        module, mesh = self.lightning_module, self.device_mesh["data_parallel"]
        if not is_sharded(module):
            shard(module, mesh, self.reshard_after_forward)
        _shard_weight_averages(trainer, mesh)
        trainer.callbacks[:] = [
            _ShardedFirst(),
            *(c for c in trainer.callbacks if not isinstance(c, _ShardedFirst | _GatheredLast)),
            _GatheredLast(),
        ]
        self.accelerator.setup(trainer)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        """The step, then every unit resharded (rule 2: no unit keeps pre-step weights gathered)."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        for unit in fsdp_units(self.lightning_module):
            unit.reshard()
        return output

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        """Rule 4: a consolidated checkpoint holds full tensors only (the model's come gathered already; this
        gathers what callbacks added, e.g. ``EMAWeightAveraging``'s sharded average)."""
        if not self._save_distributed_checkpoint:
            checkpoint = _full_tensors(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load (model and optimisers), then what ``EMAWeightAveraging.on_load_checkpoint``
        reads from a consolidated file: the ``state_dict`` Lightning's loader has consumed (the average), and
        the current weights, both as the shards of this process (a collective per tensor)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path))
        if "current_model_state" in checkpoint and path.is_file():
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)["state_dict"]
            reference = self.lightning_module.state_dict()
            checkpoint["state_dict"] = _sharded_like(saved, reference)
            checkpoint["current_model_state"] = _sharded_like(checkpoint["current_model_state"], reference)
        return checkpoint

    # rule 3 for test and predict (validation and the epoch end: the callbacks above); training reshards
    def on_test_start(self) -> None:
        gather(self.lightning_module)

    def on_predict_start(self) -> None:
        gather(self.lightning_module)

    def on_test_end(self) -> None:
        release(self.lightning_module, force=True)

    def on_predict_end(self) -> None:
        release(self.lightning_module, force=True)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(
            FSDP2, cls, description="data-parallel FSDP2 (fully_shard per network) for every genzoo family"
        )


if FSDP2 not in StrategyRegistry:
    FSDP2Strategy.register_strategies(StrategyRegistry)
