"""The precision cases of tests/test_precision.py on a CUDA GPU: ``32-true``, ``bf16-mixed`` and ``16-mixed``
(fp16 autocast with Lightning's GradScaler, which needs CUDA). Skipped without CUDA; on the GPU machine:

    .venv/bin/python -m pytest -q tests/gpu/test_precision_gpu.py

Per case: the loss at initialisation under autocast is float32 and within 2^-8 relative of the float32 loss
(fp16 keeps 11 significant bits, bf16 8; the float32 reference may use TF32 convolutions, 11 bits), and 4
training steps through a ``Trainer(precision=...)`` keep every loss and weight finite (the guards raise
otherwise; under ``16-mixed`` the GradScaler skips steps with overflowing gradients, as it should).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared cases
from test_precision import BF16_RTOL, CASES, Case, first_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_at_init_under_cuda_autocast_is_the_float32_loss(case: Case, precision: str) -> None:
    torch.manual_seed(0)
    model, x = case.model().cuda(), first_batch(case.data()).cuda()
    exact = case.loss(model, x).detach()
    with torch.autocast("cuda", dtype=AUTOCAST[precision]):
        mixed = case.loss(model, x).detach()
    assert mixed.dtype == torch.float32 and math.isfinite(mixed.item())
    assert abs(mixed.item() - exact.item()) <= BF16_RTOL * (abs(exact.item()) + 1.0)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_few_training_steps_on_the_gpu_stay_finite(case: Case, precision: str) -> None:
    torch.manual_seed(0)
    model = case.model()
    trainer = L.Trainer(
        precision=precision, accelerator="gpu", devices=1, max_steps=4, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, case.data())
    assert trainer.global_step >= 3
    losses = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
