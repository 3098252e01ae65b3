"""A 2-node launch on one machine, as a cluster launches it: one ``cli.py fit`` process per "node", wired
only by Lightning's environment variables (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``) and
``--trainer.num_nodes 2 --trainer.devices 1``, gives the one-process validation numbers and final weights.

This is the path SLURM or Kubernetes takes (there the scheduler sets the variables; docs/cli.md shows both).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import ROOT, cli_env, cli_fit, metric_rows

VAE_RUN = [
    "--model=VAE", "--model.hidden=[32]", "--model.eval_k=10", "--data=Digits", "--data.batch_size=64",
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(folder: Path, *args: str, timeout: int = 900) -> Path:
    """Start node 0 and node 1 (one process each) on the loopback address; return node 0's log folder."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable, str(ROOT / "cli.py"), "fit", *args,
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp",
        "--trainer.enable_progress_bar=false", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={folder}",
    ]  # fmt: skip
    nodes = []
    for node_rank in (0, 1):
        env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node_rank)}
        log = open(folder / f"node{node_rank}.log", "w")  # closed below
        nodes.append(
            (subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    try:
        codes = [process.wait(timeout=timeout) for process, _ in nodes]
    finally:
        for process, log in nodes:
            if process.poll() is None:
                process.kill()  # a node whose peer died would wait for it until the timeout
                process.wait()
            log.close()
    for rank, code in enumerate(codes):
        assert code == 0, (folder / f"node{rank}.log").read_text()[-3000:]
    return folder / "version_0"


def results(log_dir: Path) -> tuple[list[dict], dict]:
    (checkpoint,) = (log_dir / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return metric_rows(log_dir, "val/elbo"), state


@pytest.mark.ddp
def test_two_nodes_on_one_machine_give_the_one_process_numbers(tmp_path: Path) -> None:
    """Same data, seed and global batch: 2 nodes x 1 process = 1 process, to the tolerances of
    tests/test_distributed.py (the only difference is the order of the gradient all-reduce sums)."""
    one = results(cli_fit(tmp_path / "one", 1, *VAE_RUN))
    two = results(launch_two_nodes(tmp_path / "two_nodes", *VAE_RUN))
    (rows1, state1), (rows2, state2) = one, two
    assert len(rows1) == len(rows2) == 2
    for a, b in zip(rows1, rows2, strict=True):
        assert a["step"] == b["step"]
        for key in ("val/elbo", "val/iwae"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), key
    assert state1.keys() == state2.keys()
    for name in state1:
        torch.testing.assert_close(state1[name], state2[name], atol=1e-6, rtol=1e-5, msg=name)
    log = (tmp_path / "two_nodes" / "node0.log").read_text()
    assert "GLOBAL_RANK: 0" in log and "MEMBER: 1/2" in log  # Lightning saw 2 processes, one per node
