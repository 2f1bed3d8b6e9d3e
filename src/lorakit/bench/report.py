"""Turn case results into the report: machine info, ratios, output checks, JSON and Markdown.

Ratios are only ever computed between cases of the same round of one invocation: absolute times
on a shared machine move by 10-20% from one minute to the next, ratios measured side by side move
much less. The noise floor (the same model timed in two processes) says how much less.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from .cases import NOISE_FLOOR, SAME_OUTPUT
from .markdown import render
from .rounds import Results, combine_case, round_ratios


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """The machine; with a GPU device, the GPU as `nvidia-smi` names it (the parent process never
    initialises CUDA itself: its memory would sit on the device next to each case's)."""
    info = {
        "cpu": _cpu_model(),
        "cpu_flags": _speed_flags(),
        # set when an AVX512 CPU is run as an AVX2-only one (docs/benchmarks.md); children inherit them
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "threads": threads,
        "load_average_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("lorakit", "torch", "transformers", "peft", "bitsandbytes")
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device != "cpu":
        info["gpu"] = _gpu_name()
        info["versions"]["cuda (torch)"] = torch.version.cuda
    return info


def _gpu_name() -> str | None:
    """ "NVIDIA H200, 143771 MiB, driver 580.159.04" from nvidia-smi; None without it."""
    import subprocess

    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        line = (
            subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    name, memory, driver = (part.strip() for part in line.split(","))
    return f"{name}, {memory}, driver {driver}"


def suite_report(suite: str, rounds: list[Results]) -> dict[str, Any]:
    """Cases combined over rounds, per-round ratios, the noise floor and the output checks."""
    names = list(rounds[0])
    cases = {name: combine_case(suite, [results[name] for results in rounds]) for name in names}
    ok = {name: r for name, r in cases.items() if "error" not in r}
    ratios = round_ratios(suite, rounds)
    return {
        "rounds": len(rounds),
        "cases": cases,
        "ratios": ratios,
        "noise_floor": _noise_floor(suite, ratios),
        "checks": _checks(suite, ok),
    }


def _noise_floor(suite: str, ratios: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The ratio between two processes running the same model: how far from 1 noise alone goes."""
    pair = NOISE_FLOOR.get(suite)
    name = f"{pair[0]}/{pair[1]}" if pair else None
    if name is None or name not in ratios:
        return None
    return {"ratio": name, **ratios[name]}


def _checks(suite: str, ok: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Do cases that hold the same weights compute the same outputs?"""
    checks = {}
    for a, b in SAME_OUTPUT[suite]:
        if a in ok and b in ok:
            checks[f"{a} vs {b}"] = _compare(suite, ok[a], ok[b])
    return checks


def _compare(suite: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if suite == "train":  # the loss before any update: same weights, same batch
        return {"first_loss_abs_diff": abs(a["losses"][0] - b["losses"][0])}
    if suite == "quant":  # the same matrix decoded by both libraries
        fa, fb = a["fingerprint"], b["fingerprint"]
        out = {
            "dequantized_head_max_abs_diff": _max_abs_diff(fa["head"], fb["head"]),
            "dequantized_sum_abs_diff": abs(fa["sum"] - fb["sum"]),
        }
        if "matmul_fingerprint" in a and "matmul_fingerprint" in b:  # the same product of the same values
            head_a, head_b = a["matmul_fingerprint"]["head"], b["matmul_fingerprint"]["head"]
            out["matmul_head_max_abs_diff"] = _max_abs_diff(head_a, head_b)
        return out
    fa, fb = a["fingerprint"], b["fingerprint"]
    return {
        "logits_max_abs_diff": _max_abs_diff(fa["logits_head"], fb["logits_head"]),
        "same_argmax": fa["argmax"] == fb["argmax"],
        "same_generated_tokens": fa["generated_ids"] == fb["generated_ids"],
    }


def _max_abs_diff(xs: list[float], ys: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(xs, ys, strict=True))


def write_report(report: dict[str, Any], out_dir: Path, suite: str) -> dict[str, str]:
    """bench-<suite>-<timestamp>.json/.md plus latest.json/.md, all in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out_dir / f"bench-{suite}-{stamp}"
    files = {"json": str(stem.with_suffix(".json")), "markdown": str(stem.with_suffix(".md"))}
    report = {**report, "files": files}
    text, markdown = json.dumps(report, indent=1), render(report)
    for path, content in ((files["json"], text), (files["markdown"], markdown)):
        Path(path).write_text(content)
    (out_dir / "latest.json").write_text(text)
    (out_dir / "latest.md").write_text(markdown)
    return files


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _speed_flags() -> list[str]:
    """The CPU's /proc/cpuinfo flags that decide matmul speed and the precision lorakit picks."""
    from lorakit.train.optim import _cpuinfo

    present = set(_cpuinfo().split())
    return [f for f in SPEED_FLAGS if f in present]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
