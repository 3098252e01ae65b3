"""The opt-in compile path (callbacks/compile.py) and the GPU speed benchmark's CPU smoke mode.

On the CPU the tests use ``backend="aot_eager"`` (dynamo + AOTAutograd, no code generation, no C++ toolchain)
and ``"eager"`` (dynamo only); inductor is left to the GPU script (benchmarks/gpu_speed.py). Tolerance: a
compiled graph runs the same float32 operations, possibly decomposed and in another order, so losses and
weights agree with eager to rounding: we allow 1e-5 relative + 1e-6 absolute (float32 eps is 1.2e-7; a
conv VAE's loss sums ~800 per-pixel terms, ~sqrt(800) * eps ≈ 3e-6 relative at most for a reordered sum).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import Compile
from zoo import GAN, VAE
from zoo.noise import pinned_noise

RTOL, ATOL = 1e-5, 1e-6
ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _vae() -> VAE:
    torch.manual_seed(0)
    return VAE(shape=(1, 28, 28), latent_dim=4, decoder="conv", hidden=(32, 32), k=2)


def _gan(r1: float = 1.0) -> GAN:
    torch.manual_seed(0)
    return GAN(shape=(1, 28, 28), latent_dim=4, hidden=(16, 16), network="conv", r1_gamma=r1)


def _fit(model: L.LightningModule, callbacks: list, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, DataLoader(_images(), batch_size=8))
    return trainer


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=RTOL, atol=ATOL, msg=key)


def test_compiled_vae_gives_the_eager_loss_and_gradients_and_keeps_state_dict_keys():
    eager, compiled = _vae(), _vae()
    keys = list(eager.state_dict())
    callback = Compile(backend="aot_eager")
    assert callback.compile_modules(compiled) == ["encoder", "decoder", "posterior_head"]
    assert list(compiled.state_dict()) == keys  # no `_orig_mod.` prefix
    x = _images(8)
    with pinned_noise(eager, compiled):
        loss_e, loss_c = eager.training_loss(x), compiled.training_loss(x)
    # the compiled graph really runs (nn.Module.compile() would silently stay eager in torch 2.13)
    assert type(compiled.decoder(torch.zeros(1, 4)).grad_fn).__name__ == "CompiledFunctionBackward"
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    loss_e.backward(), loss_c.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)
    # a deep copy (EMAWeightAveraging's AveragedModel) runs its OWN weights through the compiled forward
    copied, reference = deepcopy(compiled), deepcopy(eager)
    with torch.no_grad():
        for p in [*copied.decoder.parameters(), *reference.decoder.parameters()]:
            p.add_(0.5)
        z = torch.zeros(2, 4)
        torch.testing.assert_close(copied.decoder(z), reference.decoder(z), rtol=RTOL, atol=ATOL)
        assert not torch.allclose(copied.decoder(z), compiled.decoder(z))
    callback.restore()
    assert "forward" not in compiled.decoder.__dict__


def test_a_compiled_fit_checkpoint_loads_into_an_eager_vae_and_matches_an_eager_fit(tmp_path):
    eager, compiled = _vae(), _vae()
    _fit(eager, [])
    callback = Compile(backend="aot_eager")
    trainer = _fit(compiled, [callback])
    assert callback.compiled == ["encoder", "decoder", "posterior_head"]
    _assert_same_weights(compiled, eager)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    fresh = _vae()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=True)
    _assert_same_weights(fresh, compiled)


def test_gan_with_r1_keeps_the_discriminator_eager_under_aot_autograd_and_matches_eager():
    eager, compiled = _gan(), _gan()
    _fit(eager, [], steps=4)
    callback = Compile(backend="aot_eager")
    with pytest.warns(UserWarning, match="discriminator .*R1/R2 penalty"):
        _fit(compiled, [callback], steps=4)
    assert callback.compiled == ["generator"] and list(callback.skipped) == ["discriminator"]
    _assert_same_weights(compiled, eager)
    # what happens without the fallback: AOTAutograd refuses the double backward of R1
    gan = _gan()
    gan.discriminator.forward = torch.compile(gan.discriminator.forward, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"double backward|create_graph=False"):
        gan.opponent_loss(_images(4), torch.randn(4, 4))[0].backward()


def test_gan_with_r1_compiles_both_players_with_the_eager_backend():
    eager, compiled = _gan(), _gan()
    _fit(eager, [], steps=2)
    callback = Compile(backend="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Compile:")
        _fit(compiled, [callback], steps=2)
    _assert_same_weights(compiled, eager)
    assert callback.compiled == ["generator", "discriminator"]
    assert "forward" not in compiled.discriminator.__dict__  # restored at teardown


def test_compile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="modules"):
        Compile(modules="encoder")
    with pytest.raises(ValueError, match="mode"):
        Compile(mode="fast")
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        Compile(modules=["nope"], backend="aot_eager").compile_modules(_vae())


def test_gpu_speed_benchmark_runs_in_smoke_mode_on_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_speed.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = list(tmp_path.glob("gpu_speed*.json"))
    assert len(files) == 1
    import json

    rows = json.loads(files[0].read_text())["rows"]
    assert {r["variant"] for r in rows} == {"bare", "zoo_eager", "zoo_compiled"}
    assert all(r["steps_per_s"] > 0 for r in rows)


def test_the_cli_takes_compile_as_a_callback(tmp_path, monkeypatch):
    from cli import run as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = cli_main([
        "fit", "--model=VAE", "--data=Digits", "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=Compile", "--trainer.callbacks.backend=aot_eager",
    ])  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, Compile)]
    assert callback.backend == "aot_eager"
    assert callback.compiled == ["encoder", "decoder", "posterior_head"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs C++")
def test_inductor_on_the_cpu_gives_the_eager_loss():
    """~25 s on a 2-core CPU (inductor generates and builds C++ kernels)."""
    eager, compiled = _vae(), _vae()
    Compile(backend="inductor").compile_modules(compiled)
    x = _images(8)
    with pinned_noise(eager, compiled):
        loss_e, loss_c = eager.training_loss(x), compiled.training_loss(x)
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
    loss_e.backward(), loss_c.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.ddp
def test_compiled_two_processes_match_compiled_one(tmp_path):
    """DDP wraps the LightningModule after ``Compile.setup`` compiled its networks: 2 gloo processes give the
    1-process validation ELBO and weights (tolerances of tests/test_distributed.py: only the order of the
    gradient all-reduce sums differs), and the checkpoint keys are the eager ones."""
    from cli_runs import cli_fit, metric_rows

    results = {}
    for devices in (1, 2):
        log_dir = cli_fit(
            tmp_path / f"devices{devices}", devices,
            "--model=VAE", "--model.hidden=[64]", "--model.eval_k=5", "--data=Digits", "--data.batch_size=64",
            "--trainer.max_epochs=1", "--trainer.callbacks+=Compile", "--trainer.callbacks.backend=aot_eager",
        )  # fmt: skip
        (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        results[devices] = metric_rows(log_dir, "val/elbo"), state
    (rows1, state1), (rows2, state2) = results[1], results[2]
    assert len(rows1) == len(rows2) == 1
    assert float(rows1[0]["val/elbo"]) == pytest.approx(float(rows2[0]["val/elbo"]), abs=1e-4)
    assert list(state1) == list(state2) == list(VAE(shape=(1, 8, 8), hidden=(64,)).state_dict())
    for name in state1:
        torch.testing.assert_close(state1[name], state2[name], atol=1e-6, rtol=1e-5, msg=name)
