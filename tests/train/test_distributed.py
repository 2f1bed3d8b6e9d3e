"""DDP and FSDP2 through torchrun (train/distributed.py, train/fsdp.py): 2 gloo processes on a tiny model end where 1 process
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
        record["loss"]
        for line in (out / "log.jsonl").read_text().splitlines()
        if "loss" in (record := json.loads(line))
    ]


@pytest.mark.parametrize("method", ["lora", "mopeft", "qlora", "longlora"])
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
    # the group is destroyed before the interpreter's teardown (else gloo may abort a rank at exit)
    assert [(two / f"left-{r}.txt").read_text() for r in (0, 1)] == ["left", "left"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fsdp2_ends_where_one_process_does(method, tmp_path) -> None:
    """FSDP2: the frozen base and the adapter sharded, rank 0 evaluating alone mid-run (the whole
    model gathered on every rank, then sharded again), the same adapter and curve as 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run(one, method, "--eval-every", "2"))
    _ok(_run(two, method, "--eval-every", "2", "--fsdp", procs=2))
    single = torch.load(one / "params-0.pt")
    rank0, rank1 = torch.load(two / "params-0.pt"), torch.load(two / "params-1.pt")
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert rank0[name].shape == single[name].shape, name  # whole again after train()
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(_losses(two), _losses(one), atol=1e-5, rtol=1e-5)
    evals = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines() if "eval_loss" in line]
    expected = [
        json.loads(line) for line in (one / "log.jsonl").read_text().splitlines() if "eval_loss" in line
    ]
    assert [e["step"] for e in evals] == [2, 4]
    for got, want in zip(evals, expected, strict=True):
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5)


def test_fsdp2_resume_reaches_the_uninterrupted_run_and_checkpoints_are_whole(tmp_path) -> None:
    from lorakit.train import checkpoint as ckpt

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _ok(_run(whole, "lora", "--steps", "6", "--fsdp", procs=2))
    _ok(_run(cut, "lora", "--steps", "6", "--stop-after", "3", "--fsdp", procs=2))
    weights, state = ckpt.load_checkpoint(cut / "checkpoints" / "step-000002")
    single = torch.load(whole / "params-0.pt")
    assert weights.keys() == single.keys()
    assert all(weights[n].shape == single[n].shape for n in single)  # full tensors, not shards
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert [tuple(m.shape) for m in moments] == [tuple(single[n].shape) for n in state["groups"][0]]
    _ok(_run(cut, "lora", "--steps", "6", "--resume", "--fsdp", procs=2))
    resumed = torch.load(cut / "params-0.pt")
    for name in single:
        torch.testing.assert_close(resumed[name], single[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(_losses(cut), _losses(whole), atol=1e-6, rtol=0)


def test_fsdp2_checkpoint_resumes_in_one_process(tmp_path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _ok(_run(whole, "lora", "--steps", "6"))
    _ok(_run(cut, "lora", "--steps", "6", "--stop-after", "3", "--fsdp", procs=2))
    _ok(_run(cut, "lora", "--steps", "6", "--resume"))  # the same format as a one-process checkpoint
    expected, resumed = torch.load(whole / "params-0.pt"), torch.load(cut / "params-0.pt")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)


def test_fsdp2_refuses_a_method_that_cannot_shard_on_every_rank(tmp_path) -> None:
    result = _run(tmp_path / "bad", "qlora", "--fsdp", procs=2)
    assert result.returncode != 0
    assert result.stderr.count("--fsdp: adapter 'default' (QLoRAConfig): its 4-bit weights are buffers") >= 2
    assert not (tmp_path / "bad" / "log.jsonl").exists()


@pytest.mark.integration  # ~2 minutes on 2 cores: `make test-integration` (LoRA, MoPEFT, QLoRA and
# LongLoRA under DDP, and LoRA/DoRA under FSDP2, stay in the default suite above)
@pytest.mark.parametrize(
    "method", ["dora", "adapter", "adalora", "alora", "quantum", "prompt", "prefix", "norm", "full"]
)
def test_every_other_method_under_ddp_ends_where_one_process_does(method, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_run(one, method))
    _ok(_run(two, method, procs=2))
    single, rank0 = torch.load(one / "params-0.pt"), torch.load(two / "params-0.pt")
    assert single.keys() == rank0.keys()
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(_losses(two), _losses(one), atol=1e-5, rtol=1e-5)


def test_compiled_layers_under_ddp(tmp_path) -> None:
    _ok(_run(tmp_path / "one", "lora", "--compile"))
    _ok(_run(tmp_path / "two", "lora", "--compile", procs=2))
    single, rank0 = torch.load(tmp_path / "one" / "params-0.pt"), torch.load(tmp_path / "two" / "params-0.pt")
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_checkpointing_under_ddp_and_fsdp2(sharding, tmp_path) -> None:
    _ok(_run(tmp_path / "one", "lora", "--checkpointing"))
    _ok(
        _run(
            tmp_path / "two", "lora", "--checkpointing", *(["--fsdp"] if sharding == "fsdp" else []), procs=2
        )
    )
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


def _cli(root: Path, out: Path, launcher: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    args = ["train", "--model", str(root / "base"), "--data", str(root / "train.jsonl"), "--steps", "3",
            "--batch-size", "4", "--micro-batch-size", "2", "--skip-eval", "--replay", "none", "--rank", "4",
            "--no-progress-bar", "--output-dir", str(out), *extra]  # fmt: skip
    return subprocess.run(
        [*launcher, "-m", "lorakit", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_the_command_line_under_torchrun_and_accelerate(tiny_run_files) -> None:
    from safetensors.torch import load_file

    root = tiny_run_files
    runs = {
        "one": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
        "accelerate": [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                       "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    }  # fmt: skip
    runs["fsdp"] = runs["torchrun"]
    adapters = {}
    for name, launcher in runs.items():
        if name == "accelerate" and not Path(launcher[0]).exists():
            continue
        # the FSDP2 run also scores after training: rank 0 alone generates with the gathered model
        result = _cli(root, root / name, launcher, *(["--fsdp", "--no-skip-eval"] if name == "fsdp" else []))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("trainable params") == 1  # rank 0 alone prints
        adapters[name] = load_file(root / name / "adapter" / "adapter_model.safetensors")
        assert len(_losses(root / name)) == 3
    for name in adapters:
        assert adapters[name].keys() == adapters["one"].keys()
        for key, tensor in adapters["one"].items():
            torch.testing.assert_close(adapters[name][key], tensor, atol=2e-5, rtol=1e-4, msg=f"{name} {key}")
    assert "exact_match" in json.dumps(json.loads((root / "fsdp" / "metrics.json").read_text())["after"])
    peft = pytest.importorskip("peft")  # the FSDP2 run's adapter is whole: PEFT loads every tensor
    from transformers import AutoModelForCausalLM

    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "base"), root / "fsdp" / "adapter"
    )
    state = peft.get_peft_model_state_dict(loaded)
    assert state.keys() == adapters["fsdp"].keys()
    for key, tensor in adapters["fsdp"].items():
        assert torch.equal(state[key], tensor), key


def test_a_longlora_document_run_under_torchrun(tiny_run_files, tmp_path) -> None:
    from lorakit.long.documents import INSTALL, wiki_path_exists

    if not wiki_path_exists():
        pytest.skip(f"gensim's Wikipedia test dump is missing: {INSTALL}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "wiki"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lorakit",
               "train", "--model", str(tiny_run_files / "base"), "--method", "longlora", "--context", "1024", "--steps", "2",
               "--batch-size", "2", "--long-eval-tokens", "1024", "--passkey-per-depth", "0", "--no-progress-bar",
               "--output-dir", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("perplexity at 1,024") == 1  # rank 0 alone scores and prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["window"]["now"] == 1024
    assert (out / "adapter" / "context.json").is_file()
