"""Turn case results into the report: machine info, ratios, output checks, JSON and Markdown.

Ratios are only ever computed between cases of the same invocation: absolute times on a shared
machine move by 10% from one minute to the next, ratios measured side by side move much less.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from .cases import RATIOS, SAME_OUTPUT
from .markdown import render

TIME_METRICS = {"infer": ("forward", "generate"), "train": ("step",)}


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "threads": threads,
        "load_average_before": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("lorakit", "torch", "transformers", "peft")},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def suite_report(suite: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = {name: r for name, r in results.items() if "error" not in r}
    return {"cases": results, "ratios": _ratios(suite, ok), "checks": _checks(suite, ok)}


def _ratios(suite: str, ok: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """numerator/denominator of each time median and of peak RSS, where both cases ran."""
    ratios = {}
    for num, den in RATIOS[suite]:
        if num in ok and den in ok:
            entry = {m: ok[num][m]["median_s"] / ok[den][m]["median_s"] for m in TIME_METRICS[suite]}
            entry["peak_rss"] = ok[num]["peak_rss_mb"] / ok[den]["peak_rss_mb"]
            ratios[f"{num}/{den}"] = entry
    return ratios


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
    fa, fb = a["fingerprint"], b["fingerprint"]
    diff = max(abs(x - y) for x, y in zip(fa["logits_head"], fb["logits_head"], strict=True))
    return {
        "logits_max_abs_diff": diff,
        "same_argmax": fa["argmax"] == fb["argmax"],
        "same_generated_tokens": fa["generated_ids"] == fb["generated_ids"],
    }


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
