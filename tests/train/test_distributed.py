"""DDP through torchrun (train/distributed.py): 2 gloo processes on a tiny model end where 1 process
with the same global batch ends, resume on 2 ranks, rank-0-only outputs, a bad launch refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
TIMEOUT = 240  # a hang fails the test instead of the suite


def _run(out: Path, *args: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if procs == 1:
        command = [sys.executable, str(WORKER), str(out), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                   str(WORKER), str(out), *args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line
    ]


@pytest.mark.parametrize("method", ["lora", "mopeft"])
def test_two_processes_end_where_one_does(method, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run(one, method))
    _ok(_run(two, method, procs=2))
    single = torch.load(one / "params-0.pt")
    rank0, rank1 = torch.load(two / "params-0.pt"), torch.load(two / "params-1.pt")
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks stay in step
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
    assert any(not torch.equal(single[n], torch.zeros_like(single[n])) for n in single)
    torch.testing.assert_close(_losses(two), _losses(one), atol=1e-5, rtol=1e-5)
    assert len(_losses(two)) == 4  # rank 0 alone writes the log: one line per step


def test_checkpointing_under_ddp(tmp_path) -> None:
    _ok(_run(tmp_path / "one", "lora", "--checkpointing"))
    _ok(_run(tmp_path / "two", "lora", "--checkpointing", procs=2))
    single, rank0 = torch.load(tmp_path / "one" / "params-0.pt"), torch.load(tmp_path / "two" / "params-0.pt")
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)


def test_resume_on_two_ranks_reaches_the_uninterrupted_run(tmp_path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _ok(_run(whole, "lora", "--steps", "6", procs=2))
    _ok(_run(cut, "lora", "--steps", "6", "--stop-after", "3", procs=2))  # checkpoint at 2, stop after 3
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000002"]
    _ok(_run(cut, "lora", "--steps", "6", "--resume", procs=2))
    expected, resumed = torch.load(whole / "params-0.pt"), torch.load(cut / "params-0.pt")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(_losses(cut), _losses(whole), atol=1e-6, rtol=0)


def test_a_batch_the_world_does_not_divide_is_refused_on_every_rank(tmp_path) -> None:
    result = _run(tmp_path / "bad", "lora", "--batch", "6", "--micro", "2", procs=2)  # 3 micro-batches
    assert result.returncode != 0
    assert result.stderr.count("--batch-size 6 does not split over 2 processes in micro-batches of 2") >= 2
    assert not (tmp_path / "bad" / "log.jsonl").exists()
