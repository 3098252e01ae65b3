"""``genzoo predict`` / ``genzoo test`` from a checkpoint of every family, ``Family.load_from_checkpoint``
in a fresh process, and ``--ckpt_path`` errors that name the file and the cause.

One short CLI fit per family (2 optimizer steps, a checkpoint at the end) is shared by every test here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import ROOT, cli_env
from PIL import Image

from callbacks.checkpoint import CheckpointError
from callbacks.predict import STREAM, RequestChunks, SampleWriter
from cli import run as main
from zoo.noise import mix_key

QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]

TOY = ["--data=Toy2D", "--data.n_train=64", "--data.n_val=16", "--data.n_test=16", "--data.batch_size=32"]

# family -> (CLI arguments of a tiny run, the shape of one sample); add a row for a new family
FAMILIES = {
    "VAE": (["--model=VAE", "--model.hidden=[16]", "--model.eval_k=5", "--data=Digits"], (1, 8, 8)),
    "GAN": (["--model=GAN", "--model.hidden=[16]", "--model.r1_gamma=1.0", *TOY], (2,)),
    "FGAN": (["--model=FGAN", "--model.divergence=kl_dv", "--model.hidden=[16]", *TOY], (2,)),
    "DiracGAN": (["--model=DiracGAN", "--model.gamma=0.3", "--data=Dirac", "--data.n_train=64",
                  "--data.n_val=0", "--data.n_test=16", "--data.batch_size=16",
                  "--trainer.limit_val_batches=0"], (1,)),
    "Flow": (["--model=Flow", "--model.transform=maf", "--model.n_layers=2", "--model.hidden=[16]", *TOY],
             (2,)),
    "DiscreteVAE": (["--model=DiscreteVAE", "--model.n_latents=3", "--model.n_categories=4",
                     "--model.hidden=[16]", "--model.eval_k=5", "--data=Digits"], (1, 8, 8)),
    "NCE": (["--model=NCE", "--model.hidden=[16]", "--model.k=3", "--model.sample_proposals=10", *TOY],
            (2,)),
    "ExplicitGaussian": (["--model=ExplicitGaussian", "--model.fisher_samples=32", *TOY], (2,)),
    "MADE": (["--model=MADE", "--model.hidden=[16]", "--model.n_orderings=2", "--data=Digits",
              "--data.binarize=dynamic"], (1, 8, 8)),
    "PixelCNN": (["--model=PixelCNN", "--model.channels=4", "--model.n_layers=2", "--model.kernel_size=3",
                  "--data=Digits", "--data.binarize=dynamic"], (1, 8, 8)),
}  # fmt: skip


class Trained:
    """A family's tiny run: its CLI arguments, checkpoint and final model (weights == the checkpoint's)."""

    def __init__(self, args: list[str], checkpoint: Path, model, shape: tuple[int, ...]) -> None:
        self.args, self.checkpoint, self.model, self.shape = args, checkpoint, model, shape


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        for name, (args, shape) in FAMILIES.items():
            folder = tmp_path_factory.mktemp(name)
            mp.chdir(folder)
            fit = ["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", *QUIET]
            cli = main([*fit, f"--trainer.default_root_dir={folder}"])
            (checkpoint,) = (folder / "checkpoints").glob("*.ckpt")
            runs[name] = Trained(args, checkpoint, cli.model, shape)
    return runs


def predict(trained: Trained, tmp_path: Path, monkeypatch, *extra: str):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["predict", *trained.args, f"--ckpt_path={trained.checkpoint}", *QUIET, *extra]
    return main(args)


def expected_samples(model, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """What the module docstring promises: chunk c of ``batch_size`` samples drawn by ``model.sample`` with a
    generator seeded by ``mix_key(seed, STREAM, c)``, in order."""
    chunks = []
    for c in range(len(RequestChunks(n, batch_size, seed))):
        size = min(batch_size, n - c * batch_size)
        g = torch.Generator().manual_seed(mix_key(seed, STREAM, c))
        chunks.append(model.sample(size, generator=g).detach())
    return torch.cat(chunks)


# ---------------------------------------------------------------- predict


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predict_draws_the_checkpoints_samples(family: str, trained, tmp_path: Path, monkeypatch) -> None:
    """Every family: n samples [n, *shape] from the checkpoint's weights, exactly the chunked draws."""
    run = trained[family]
    predict(run, tmp_path, monkeypatch, "--samples.n=7", "--samples.batch_size=3", "--samples.out=s.pt")
    samples = torch.load(tmp_path / "s.pt", weights_only=True)
    assert samples.shape == (7, *run.shape)
    torch.testing.assert_close(samples, expected_samples(run.model, 7, 3, 0), rtol=0, atol=0)


def test_predict_formats_seed_and_png(trained, tmp_path: Path, monkeypatch) -> None:
    run = trained["VAE"]
    predict(run, tmp_path, monkeypatch, "--samples.n=10", "--samples.out=a.npz", "--samples.seed=3")
    predict(run, tmp_path, monkeypatch, "--samples.n=10", "--samples.out=a.pt", "--samples.seed=3")
    predict(run, tmp_path, monkeypatch, "--samples.n=10", "--samples.out=b.pt", "--samples.seed=4")
    a_npz, a_pt = np.load(tmp_path / "a.npz")["samples"], torch.load(tmp_path / "a.pt", weights_only=True)
    assert np.array_equal(a_npz, a_pt.numpy())
    assert not torch.equal(a_pt, torch.load(tmp_path / "b.pt", weights_only=True))
    predict(run, tmp_path, monkeypatch, "--samples.n=9", "--samples.out=grid/s.png")
    with Image.open(tmp_path / "grid" / "s.png") as image:  # 3x3 grid of 8x8 with 1-px gaps: 28 px, x10
        assert image.size == (280, 280)
    predict(trained["GAN"], tmp_path, monkeypatch, "--samples.n=50", "--samples.out=points.png")
    assert (tmp_path / "points.png").stat().st_size > 0  # a scatter plot of 2-D samples


def test_predict_bad_options_fail_before_sampling(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"out='s\.jpg'.*\.pt, \.npz, \.png"):
        SampleWriter(out="s.jpg")
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        SampleWriter(n=0)


@pytest.mark.ddp
def test_two_processes_write_the_one_process_file(trained, tmp_path: Path) -> None:
    """``ddp`` on 2 gloo processes, 4 uneven chunks (3+3+3+1) split 2/2 over the ranks: the file rank 0
    writes is the one-process draw (:func:`expected_samples`, which one process writes: see
    ``test_predict_draws_the_checkpoints_samples``) bit for bit: each chunk is drawn whole, by one process."""
    run, out = trained["VAE"], tmp_path / "devices2.pt"
    command = [
        sys.executable, str(ROOT / "cli.py"), "predict", *run.args, f"--ckpt_path={run.checkpoint}",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", *QUIET,
        "--samples.n=10", "--samples.batch_size=3", f"--samples.out={out}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("genzoo: wrote 10 samples") == 1  # rank 0 alone wrote
    samples = torch.load(out, weights_only=True)
    torch.testing.assert_close(samples, expected_samples(run.model, 10, 3, 0), rtol=0, atol=0)


# ---------------------------------------------------------------- test


@pytest.mark.parametrize("family", list(FAMILIES))
def test_test_subcommand_logs_test_metrics(family: str, trained, tmp_path: Path, monkeypatch) -> None:
    run = trained[family]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(["test", *run.args, f"--ckpt_path={run.checkpoint}", *QUIET])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    assert logged and all(np.isfinite(list(logged.values()))), logged


# ---------------------------------------------------------------- load_from_checkpoint in a fresh process

FRESH = """
import sys, torch, zoo
out = {}
for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
    model = getattr(zoo, name).load_from_checkpoint(path, map_location="cpu")
    out[name] = model.sample(5, generator=torch.Generator().manual_seed(0)).detach()
assert "cli" not in sys.modules and "callbacks.predict" not in sys.modules, sorted(sys.modules)
torch.save(out, "fresh.pt")
"""


def test_load_from_checkpoint_and_sample_in_a_fresh_process(trained, tmp_path: Path) -> None:
    """``Family.load_from_checkpoint(path).sample(n)`` for every family in a process that never imported the
    CLI: the samples the trained model draws with the same generator, exactly."""
    args = [str(a) for name, run in trained.items() for a in (name, run.checkpoint)]
    result = subprocess.run(
        [sys.executable, "-c", FRESH, *args], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    assert set(fresh) == set(FAMILIES)
    for name, run in trained.items():
        expected = run.model.cpu().sample(5, generator=torch.Generator().manual_seed(0)).detach()
        torch.testing.assert_close(fresh[name], expected, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- --ckpt_path errors


def bad_files(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken checkpoints made from a good one, each with the words its error must contain."""
    data = good.read_bytes()
    cases = {
        "missing": (folder / "nope.ckpt", "does not exist"),
        "empty": (folder / "empty.ckpt", "is empty"),
        "text": (folder / "config.ckpt", "not a PyTorch checkpoint"),
        "truncated": (folder / "truncated.ckpt", "truncated or damaged"),
        "bare_state_dict": (folder / "bare.ckpt", "not a Lightning checkpoint"),
        "python_objects": (folder / "objects.ckpt", "safe loader refuses"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["text"][0].write_text("model:\n  class_path: VAE\n")
    cases["truncated"][0].write_bytes(data[: len(data) // 2])
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    torch.save(checkpoint["state_dict"], cases["bare_state_dict"][0])
    torch.save({"state_dict": {}, "extra": Path("x")}, cases["python_objects"][0])
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "empty", "text", "truncated", "bare_state_dict", "python_objects"]
)
def test_a_bad_ckpt_path_names_the_file_and_the_cause(
    case: str, trained, tmp_path: Path, monkeypatch
) -> None:
    path, words = bad_files(trained["VAE"].checkpoint, tmp_path)[case]
    for subcommand in ("test", "predict"):
        with pytest.raises(CheckpointError, match=words) as info:
            predict_or_test(subcommand, trained["VAE"].args, path, tmp_path, monkeypatch)
        assert str(path) in str(info.value) and "please file an issue" not in str(info.value)


def predict_or_test(subcommand: str, args: list[str], path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return main([subcommand, *args, f"--ckpt_path={path}", *QUIET])


def test_a_checkpoint_of_another_family_is_named(trained, tmp_path: Path, monkeypatch) -> None:
    gan = trained["GAN"]
    with pytest.raises(CheckpointError, match=r"saved from zoo\.GAN, but the model is zoo\.VAE.*--model GAN"):
        predict_or_test("test", trained["VAE"].args, gan.checkpoint, tmp_path, monkeypatch)


def test_a_checkpoint_without_the_clis_class_path(trained, tmp_path: Path, monkeypatch) -> None:
    """Saved from Python (no ``_class_path``): another family's hyperparameters, or weights that do not
    fit (no hyperparameters at all), fail naming the file and the cause."""
    checkpoint = torch.load(trained["GAN"].checkpoint, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["_class_path"]
    other_family = tmp_path / "gan_from_python.ckpt"
    torch.save(checkpoint, other_family)
    with pytest.raises(
        CheckpointError, match=r"gan_from_python\.ckpt holds hyperparameters .*another family"
    ):
        predict_or_test("test", trained["VAE"].args, other_family, tmp_path, monkeypatch)

    checkpoint = torch.load(trained["VAE"].checkpoint, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]
    checkpoint["state_dict"]["decoder.0.weight"] = checkpoint["state_dict"]["decoder.0.weight"][:, :3]
    wrong_shape = tmp_path / "wrong_shape.ckpt"
    torch.save(checkpoint, wrong_shape)
    with pytest.raises(CheckpointError, match=r"wrong_shape\.ckpt does not fit VAE: 1 of another shape"):
        predict_or_test("test", trained["VAE"].args, wrong_shape, tmp_path, monkeypatch)


def test_the_console_script_prints_one_line_and_exits_2(trained, tmp_path: Path) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    command = [sys.executable, str(ROOT / "cli.py"), "test", *trained["VAE"].args, "--ckpt_path=empty.ckpt"]
    result = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("genzoo: error: checkpoint empty.ckpt is empty")
    assert "Traceback" not in result.stderr
