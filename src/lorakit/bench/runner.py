"""Run the selected cases in rounds, one child process per case per round; assemble the report.

The parent imports neither torch nor transformers: it only spawns `python -m lorakit.bench.case`,
so its own memory and threads never disturb a measurement.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lorakit_launcher

from .cases import SUITES, Case, select_cases
from .report import machine_info, suite_report, write_report
from .rounds import Results

CASE_TIMEOUT_S = 3600  # a hung case must not hang the whole run
# OpenMP threads that spin while waiting (the default) lose their time slice to other processes
# on a shared machine, and every parallel op then waits for them: measured here, a forward that
# takes 3 ms took 400 ms at load 4 on 2 cores. Sleeping waiters cost little on an idle machine.
# A value the user set wins.
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def run_bench(
    suite: str = "infer",
    vs_peft: bool = True,
    model: str | None = None,
    out_dir: str | os.PathLike[str] = "bench-results",
    steps: int = 5,
    warmup: int = 2,
    threads: int = 2,
    cases: list[str] | None = None,
    verbose: bool = True,
    jobs: int = 1,
    rounds: int | None = None,
    forward_steps: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run a benchmark suite ("infer", "train" or "all") and write JSON + Markdown to `out_dir`.

    `suite` "quant" times NF4 quantize / dequantize of one matrix (lorakit vs bitsandbytes).
    `model`: None for the default SmolLM2-135M-Instruct, "tiny" for a two-layer random Llama
    (tests), or a local Hugging Face folder. PEFT cases run only if `vs_peft` and peft imports,
    bitsandbytes cases only if `vs_peft` and bitsandbytes imports.
    `rounds` (default 3, 1 for "tiny") runs the whole case list that many times, in alternating
    order, each case in a fresh process; ratios are taken per round, then their median. `steps`
    timed iterations per case, `forward_steps` (default 2 x steps) for the cheaper forward.
    Returns the report (also in `out_dir/latest.json`); `report["failed"]` lists failed cases.
    `jobs > 1` runs that many cases at once: only for smoke tests, as they then slow each other.
    `device`: where each case runs ("cpu", "cuda", "cuda:N", or "auto": the GPU when there is one);
    on a GPU the timings are taken between synchronisations and the GPU's memory peaks reported.
    """
    rounds = _default_rounds(model) if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    with_peft = vs_peft and importlib.util.find_spec("peft") is not None
    with_bnb = vs_peft and importlib.util.find_spec("bitsandbytes") is not None
    selected = select_cases(suite, with_peft, cases, with_bnb)
    device = _device_name(device)
    machine = machine_info(threads, device)
    spec = {"model": model, "device": device, "threads": threads, "warmup": warmup, "steps": steps}
    spec["forward_steps"] = 2 * steps if forward_steps is None else forward_steps
    per_round = _run_rounds(selected, spec, rounds, jobs, verbose)
    machine["load_average_after"] = list(os.getloadavg())
    settings = {**spec, "suite": suite, "model": model or "default", "jobs": jobs, "vs_peft": vs_peft}
    settings.update(rounds=rounds, peft_cases=with_peft, omp_wait_policy=OMP_WAIT_POLICY)
    settings["bitsandbytes_cases"] = with_bnb
    report = {
        "settings": settings,
        "machine": machine,
        "suites": {s: suite_report(s, _rounds_of(s, selected, per_round)) for s in _suites(selected)},
        "failed": [c.name for c in selected if any("error" in r[c.name] for r in per_round)],
    }
    report["files"] = write_report(report, Path(out_dir), suite)
    return report


def _device_name(choice: str) -> str:
    """The device the cases run on, as a string ("auto" resolved here; an unusable one refused)."""
    from lorakit.device import resolve_device

    return str(resolve_device(choice))


def _default_rounds(model: str | None) -> int:
    """3 rounds for a real model (a median needs 3); the tiny model is only a smoke test."""
    return 1 if model == "tiny" else 3


def _suites(selected: list[Case]) -> list[str]:
    return [s for s in SUITES if any(c.suite == s for c in selected)]


def _rounds_of(suite: str, selected: list[Case], per_round: list[Results]) -> list[Results]:
    """Each round's results for one suite, keyed in the order selected (not the order run)."""
    names = [c.name for c in selected if c.suite == suite]
    return [{name: results[name] for name in names} for results in per_round]


def round_order(selected: list[Case], index: int) -> list[Case]:
    """Round `index` (from 0) runs the cases forward if even, backward if odd.

    Reversing means a case that ran just before its partner in one round runs just after it in
    the next, so a steady drift in the background, or an advantage of going first, cancels out
    over rounds instead of favouring one side of every ratio.
    """
    return list(selected) if index % 2 == 0 else list(reversed(selected))


def _run_rounds(
    selected: list[Case], spec: dict[str, Any], rounds: int, jobs: int, verbose: bool
) -> list[Results]:
    """One dict of results per round, each case run once per round in its own process."""
    total = rounds * len(selected)
    done = itertools.count(1)

    def run(case: Case, index: int) -> dict[str, Any]:
        result = _run_case(case, {**spec, "case": case.name}, spec["threads"])
        result["round"] = index + 1
        if verbose:
            progress = f"[{next(done)}/{total}] round {index + 1}/{rounds} {_progress(case, result)}"
            print(progress, file=sys.stderr)
        return result

    per_round = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for index in range(rounds):
            order = round_order(selected, index)
            results = pool.map(run, order, [index] * len(order))
            per_round.append(dict(zip([c.name for c in order], results, strict=True)))
    return per_round


def case_environment(case: Case, env: dict[str, str]) -> dict[str, str]:
    """The environment a case's process starts with: lorakit's train cases get what the `lorakit`
    command gives training (`lorakit_launcher`: glibc's small-block caches off) unless the case asks
    for glibc as it is (`malloc="default"`); every other case gets the environment without it, as a
    Python program that imports PEFT, or lorakit as a library, would have it."""
    as_command = case.library == "lorakit" and case.suite == "train" and case.malloc != "default"
    return lorakit_launcher.child_environment(env, as_command)


def _run_case(case: Case, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; a failure is recorded, not raised, so others still run."""
    threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    case_env = case_environment(case, dict(os.environ))
    env = {**case_env, **threads_env, "OMP_WAIT_POLICY": OMP_WAIT_POLICY, "TOKENIZERS_PARALLELISM": "false"}
    load_before = list(os.getloadavg())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "lorakit.bench.case",
            json.dumps({**spec, "result_path": str(result_path)}),
        ]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CASE_TIMEOUT_S} s"}
        if proc.returncode != 0 or not result_path.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            return {"error": f"exit code {proc.returncode}:\n{tail}"}
        result = json.loads(result_path.read_text())
    result["wall_s"] = time.perf_counter() - start
    result["load_average_before"] = load_before
    result["load_average_after"] = list(os.getloadavg())
    return result


def _progress(case: Case, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{case.name}: FAILED ({result['error'].splitlines()[0]})"
    if case.suite == "infer":
        timing = f"forward {result['forward']['median_s'] * 1e3:.1f} ms, generate {result['generate']['median_s']:.2f} s"
    elif case.suite == "quant":
        q, d = result["quantize"]["median_s"], result["dequantize"]["median_s"]
        timing = f"quantize {q * 1e3:.1f} ms, dequantize {d * 1e3:.1f} ms"
    else:
        timing = f"{result['step']['median_s']:.2f} s/step"
    return f"{case.name}: {timing}, peak RSS {result['peak_rss_mb']:.0f} MB ({result['wall_s']:.0f} s)"
