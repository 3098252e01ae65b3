"""datamodules.streaming: convert -> Streaming gives back every split exactly; the training order is a
function of (seed, epoch) only, dealt out so that 1, 2 and 4 ranks see the same global batches (simulated in
this process, and once for real: a VAE fitted through the CLI on 1 and on 2 gloo processes)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cli_runs import cli_fit
from image_data import write_arrays

from datamodules import Digits, Toy2D
from datamodules.arrays import Arrays
from datamodules.streaming import Streaming, convert, main, window_order

SHARD = 256  # Digits' 1,500 training images -> 6 shards (5 of 256, one of 220)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Digits (17 grey levels, labels), Toy2D (continuous: 5 training shards of 64, 64, 64, 64, 44) and 8-bit
    colour Arrays (labels), converted once."""
    root = tmp_path_factory.mktemp("streaming")
    codes = np.random.default_rng(0).integers(0, 256, (90, 3, 4, 4), dtype=np.uint8)
    labels = np.arange(90) % 7
    sources = {
        "digits": Digits(),
        "toy2d": Toy2D("moons", n_train=300, n_val=40, n_test=30),
        "bytes": Arrays(str(write_arrays(root / "bytes.npz", codes, labels)), val_size=10, test_size=20),
    }
    return {name: (dm, convert(dm, root / name, shard_size=SHARD if name == "digits" else 64))
            for name, dm in sources.items()}  # fmt: skip


@pytest.mark.parametrize("name", ["digits", "toy2d", "bytes"])
def test_round_trip_gives_every_split_back_exactly(converted: dict, name: str) -> None:
    """Same examples in the same order, bit for bit, with the source's shape, levels and labels; integer
    levels are stored as uint8 codes in plain POSIX tar files."""
    source, path = converted[name]
    stream = Streaming(str(path))
    assert stream.shape == source.shape and stream.levels == source.levels
    source.setup(), stream.setup()
    for split in ("train", "val", "test"):
        want = source.splits[split].__getitems__(list(range(len(source.splits[split]))))
        got = stream.splits[split].__getitems__(list(range(len(stream.splits[split]))))
        assert got.dtype == torch.float32 and torch.equal(got, want), split
        labels = source.labels(split)
        assert (stream.labels(split) is None) if labels is None else torch.equal(stream.labels(split), labels)
    with tarfile.open(path / "train" / "000000.tar") as tar:
        first = tar.getmembers()[0]
        assert first.name == "000000000.npy"
        array = np.load(io.BytesIO(tar.extractfile(first).read()))
    assert array.dtype == (np.float32 if source.levels is None else np.uint8)
    assert array.shape == source.shape


def global_batches(path: Path, world: int, epoch: int, **kwargs) -> tuple[list[torch.Tensor], list[int]]:
    """The training batches of ``epoch`` as ``world`` simulated ranks load them, put back together in the
    global order (rank ``r`` holds positions ``r, r + W, ...``); and each rank's count of shard reads."""
    per_rank, reads = [], []
    for rank in range(world):
        stream = Streaming(str(path), window=2, batch_size=20, **kwargs)
        stream.world = lambda rank=rank: (world, rank)
        loader = stream.train_dataloader()
        loader.sampler.set_epoch(epoch)
        per_rank.append(list(loader))
        reads.append(stream.splits["train"].shard_reads)
    batches = [torch.stack([b[t] for b in per_rank], 1).flatten(0, 1) for t in range(len(per_rank[0]))]
    return batches, reads


def test_ranks_see_the_one_process_global_batches_and_read_each_shard_once(converted: dict) -> None:
    """2 and 4 ranks (and 2 DataLoader workers) load the global batches 1 process loads, in epochs 0 and 1;
    every rank reads each of the 5 shards exactly once an epoch."""
    path = converted["toy2d"][1]
    for epoch in (0, 1):
        one, reads = global_batches(path, 1, epoch)
        assert len(one) == 15 and reads == [5]
        for world in (2, 4):
            many, reads = global_batches(path, world, epoch)
            assert reads == [5] * world
            assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True)), world
    workers, _ = global_batches(path, 1, 1, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(one, workers, strict=True))


def test_evaluation_shards_partition_the_split_in_order(converted: dict) -> None:
    """val / test: rank r takes range(r, N, W), no padding, so the ranks' examples are the split once."""
    stream = Streaming(str(converted["digits"][1]), batch_size=64)
    stream.setup()
    whole = stream.splits["test"].__getitems__(list(range(147)))
    parts = []
    for rank in range(2):
        stream.world = lambda rank=rank: (2, rank)
        parts.append(torch.cat(list(stream.test_dataloader())))
    assert len(parts[0]) == 74 and len(parts[1]) == 73
    assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


def test_order_is_a_function_of_seed_and_epoch_shuffled_within_windows() -> None:
    """A permutation every epoch, equal for equal (seed, epoch), different otherwise; window w holds exactly
    the examples of 2 whole shards (its I/O), and one window spanning every shard is a full shuffle."""
    counts = [256] * 5 + [220]
    order = window_order(counts, 2, seed=0, epoch=3)
    assert torch.equal(order.sort().values, torch.arange(1500))
    assert torch.equal(order, window_order(counts, 2, seed=0, epoch=3))
    assert not torch.equal(order, window_order(counts, 2, seed=0, epoch=4))
    assert not torch.equal(order, window_order(counts, 2, seed=1, epoch=3))
    shard_of = torch.tensor(np.repeat(np.arange(6), counts))
    start = 0
    for w in range(3):
        shards = shard_of[order[start:]].unique_consecutive()[:2]
        size = sum(counts[s] for s in shards.tolist())
        assert set(shard_of[order[start : start + size]].tolist()) == set(shards.tolist()), w
        start += size
    assert start == 1500
    full = window_order(counts, 6, seed=0, epoch=0)
    assert torch.equal(full.sort().values, torch.arange(1500))
    assert len(shard_of[full[:256]].unique()) == 6  # the first 256 come from every shard


def test_a_fresh_datamodule_resumes_an_epoch_with_the_same_batches(converted: dict) -> None:
    """End-of-epoch resume: a new Streaming told epoch 1 (as Lightning does after loading a checkpoint) loads
    exactly the epoch-1 batches of one that went through epoch 0 first."""
    path = converted["toy2d"][1]
    straight = Streaming(str(path), window=2, batch_size=20)
    loader = straight.train_dataloader()
    loader.sampler.set_epoch(0)
    list(loader)
    loader.sampler.set_epoch(1)
    resumed, _ = global_batches(path, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(loader, resumed, strict=True))


def test_command_line_and_pipe_addresses(tmp_path: Path) -> None:
    """``python -m datamodules.streaming convert --data Toy2D ...`` (data by class name, as the CLI takes
    it), then a ``pipe:`` address with ``{}`` for the file name reads the same data."""
    out = tmp_path / "toy"
    main(["convert", "--data", "Toy2D", "--data.n_train", "50", "--data.n_val", "5", "--data.n_test", "5",
          "--out", str(out), "--shard_size", "16"])  # fmt: skip
    source = Toy2D(n_train=50, n_val=5, n_test=5)
    source.setup()
    piped = Streaming(f"pipe:cat {out}/{{}}")
    piped.setup()
    assert torch.equal(piped.splits["train"].__getitems__(list(range(50))), source.splits["train"].data)


def test_clear_errors(converted: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a converted data set.*datamodules.streaming convert"):
        Streaming(str(tmp_path))
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        Streaming(str(converted["toy2d"][1]), window=0)
    with pytest.raises(FileExistsError, match="exists; choose another --out"):
        convert(Toy2D(n_train=10), converted["toy2d"][1])
    with pytest.raises(ValueError, match=r"binarize='dynamic'.*redraws"):
        convert(Digits(binarize="dynamic"), tmp_path / "dynamic")
    wrong = Toy2D(n_train=10, n_val=2, n_test=2)
    wrong.levels = 256
    with pytest.raises(ValueError, match="levels=256, but their values are not exactly k / 255"):
        convert(wrong, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()  # nothing half-written


class RecordBatches(L.Callback):
    """Rank 0 saves the global training batches (gathered from all ranks, in global order) to ``path``, one
    after the other as one tensor ``[steps x batch, *shape]``."""

    def __init__(self, path: str) -> None:
        self.path, self.batches = path, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, *args) -> None:
        gathered = pl_module.all_gather(batch)  # [W, b, ...] on several ranks, [b, ...] on one
        self.batches.append(gathered.transpose(0, 1).flatten(0, 1) if trainer.world_size > 1 else gathered)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            torch.save(torch.cat(self.batches), self.path)


@pytest.mark.ddp
def test_two_processes_fit_on_the_one_process_batches(converted: dict, tmp_path: Path) -> None:
    """``genzoo fit --data Streaming --data.path DIR``, 2 epochs on 1 and on 2 gloo
    processes: the same 48 global batches (2 x 1,500 images) bit for bit, and the same final weights to
    float32 tolerance."""
    results = {}
    for devices in (1, 2):
        folder = tmp_path / f"devices{devices}"
        log_dir = cli_fit(
            folder, devices,
            "--model=VAE", "--model.hidden=[32]", "--model.eval_k=5",
            "--data=Streaming", f"--data.path={converted['digits'][1]}",
            "--data.window=2", "--data.batch_size=64",
            "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
            "--trainer.callbacks=test_streaming.RecordBatches",
            f"--trainer.callbacks.path={folder / 'batches.pt'}",
        )  # fmt: skip
        (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        results[devices] = torch.load(folder / "batches.pt"), state
    (batches1, state1), (batches2, state2) = results[1], results[2]
    assert batches1.shape == (3000, 1, 8, 8) and torch.equal(batches1, batches2)
    assert not torch.equal(batches1[:1500], batches1[1500:])  # epoch 1 is in another order
    for name in state1:
        torch.testing.assert_close(state1[name], state2[name], atol=1e-6, rtol=1e-5, msg=name)
