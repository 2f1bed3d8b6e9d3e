"""Run the selected cases, one child process each, and assemble the report.

The parent imports neither torch nor transformers: it only spawns `python -m lorakit.bench.case`,
so its own memory and threads never disturb a measurement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .cases import SUITES, Case, select_cases
from .report import machine_info, suite_report, write_report

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
) -> dict[str, Any]:
    """Run a benchmark suite ("infer", "train" or "all") and write JSON + Markdown to `out_dir`.

    `model`: None for the default SmolLM2-135M-Instruct, "tiny" for a two-layer random Llama
    (tests), or a local Hugging Face folder. PEFT cases run only if `vs_peft` and peft imports.
    Returns the report (also in `out_dir/latest.json`); `report["failed"]` lists failed cases.
    `jobs > 1` runs that many cases at once: only for smoke tests, as they then slow each other.
    """
    with_peft = vs_peft and importlib.util.find_spec("peft") is not None
    selected = select_cases(suite, with_peft, cases)
    machine = machine_info(threads)
    spec = {"model": model, "threads": threads, "warmup": warmup, "steps": steps}
    results = _run_all(selected, spec, jobs, verbose)
    machine["load_average_after"] = list(os.getloadavg())
    settings = {**spec, "suite": suite, "model": model or "default", "jobs": jobs, "vs_peft": vs_peft}
    settings.update(peft_cases=with_peft, omp_wait_policy=OMP_WAIT_POLICY)
    suites = [s for s in SUITES if any(c.suite == s for c in selected)]
    report = {
        "settings": settings,
        "machine": machine,
        "suites": {
            s: suite_report(s, {c.name: results[c.name] for c in selected if c.suite == s}) for s in suites
        },
        "failed": [name for name, result in results.items() if "error" in result],
    }
    report["files"] = write_report(report, Path(out_dir), suite)
    return report


def _run_all(
    selected: list[Case], spec: dict[str, Any], jobs: int, verbose: bool
) -> dict[str, dict[str, Any]]:
    """Results by case name, in the order selected, whatever order they finish in."""
    done = iter(range(1, len(selected) + 1))

    def run(case: Case) -> dict[str, Any]:
        result = _run_case({**spec, "case": case.name}, spec["threads"])
        if verbose:
            print(f"[{next(done)}/{len(selected)}] {_progress(case, result)}", file=sys.stderr)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip([c.name for c in selected], pool.map(run, selected), strict=True))


def _run_case(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; a failure is recorded, not raised, so others still run."""
    threads_env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **threads_env, "OMP_WAIT_POLICY": OMP_WAIT_POLICY, "TOKENIZERS_PARALLELISM": "false"}
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
    else:
        timing = f"{result['step']['median_s']:.2f} s/step"
    return f"{case.name}: {timing}, peak RSS {result['peak_rss_mb']:.0f} MB ({result['wall_s']:.0f} s)"
