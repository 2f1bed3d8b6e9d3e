"""Combine the rounds of a run: one summary per case, and every ratio computed round by round.

On a shared machine the background drifts by 10-20% over minutes, so two cases run a few minutes
apart differ by that much even when they are the same model. A ratio taken inside one round
compares cases that ran side by side; the median over rounds then discards a round that a burst
of load spoilt, and the min-max over rounds shows how far a single round can be trusted.
"""

from __future__ import annotations

import statistics
from typing import Any

from .cases import RATIOS

Results = dict[str, dict[str, Any]]  # case name -> that case's result (or {"error": ...})
# peaks a case may report besides its peak RSS: the steps' own RSS peak; on a GPU, the device's
MEMORY_PEAKS = ("step_peak_rss_mb", "peak_gpu_mb", "step_peak_gpu_mb")
# "matmul": the quant suite's 4-bit matmul cases only; a metric is combined where a case has it
TIME_METRICS = {
    "infer": ("forward", "generate"),
    "train": ("step",),
    "quant": ("quantize", "dequantize", "matmul"),
}


def combine_case(suite: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over its rounds: medians of the round medians; every round's result kept whole.

    The fingerprint and the case's description come from its first successful round (the same
    weights give the same outputs in every round). A case with no successful round is an error.
    """
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return {"error": runs[0]["error"], "rounds": runs}
    combined = dict(ok[0])
    for metric in TIME_METRICS[suite]:
        if metric in ok[0]:
            combined[metric] = _combine_timing([run[metric] for run in ok])
    combined["peak_rss_mb"] = statistics.median(run["peak_rss_mb"] for run in ok)
    for peak in MEMORY_PEAKS:  # train: the peaks over the steps alone; on a GPU its own peaks
        if all(peak in run for run in ok):
            combined[peak] = statistics.median(run[peak] for run in ok)
    combined["rounds"] = runs
    if len(ok) < len(runs):
        combined["failed_rounds"] = [i + 1 for i, run in enumerate(runs) if "error" in run]
    return combined


def _combine_timing(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of the round medians (robust to one spoilt round), with all samples kept."""
    medians = [t["median_s"] for t in timings]
    samples = [s for t in timings for s in t["samples_s"]]
    combined = {
        "median_s": statistics.median(medians),
        "round_medians_s": medians,
        "samples_s": samples,
        "min_s": min(samples),
    }
    if all("warmup_s" in t for t in timings):  # the one-off costs, round by round
        combined["warmup_s"] = [s for t in timings for s in t["warmup_s"]]
    if "tokens_per_s" in timings[0]:  # the work per sample is fixed: tokens = rate x time
        tokens = timings[0]["tokens_per_s"] * timings[0]["median_s"]
        combined["tokens_per_s"] = tokens / combined["median_s"]
    return combined


def round_ratios(suite: str, rounds: list[Results]) -> dict[str, dict[str, Any]]:
    """Each ratio of RATIOS from each round's own medians; the median over rounds and its spread.

    A ratio appears where both cases succeeded in at least one round; `per_round` lists only the
    rounds where both did.
    """
    ratios = {}
    for num, den in RATIOS[suite]:
        per_round = _per_round(suite, rounds, num, den)
        if per_round:
            ratios[f"{num}/{den}"] = _summarise(per_round)
    return ratios


def _per_round(suite: str, rounds: list[Results], num: str, den: str) -> dict[str, list[float]]:
    metrics = TIME_METRICS[suite]
    values: dict[str, list[float]] = {m: [] for m in (*metrics, "peak_rss")}
    for results in rounds:
        a, b = results.get(num), results.get(den)
        if a is None or b is None or "error" in a or "error" in b:
            continue
        for metric in metrics:
            if metric in a and metric in b:
                values[metric].append(a[metric]["median_s"] / b[metric]["median_s"])
        values["peak_rss"].append(a["peak_rss_mb"] / b["peak_rss_mb"])
        for peak in MEMORY_PEAKS:
            if a.get(peak) and b.get(peak):
                values.setdefault(peak.removesuffix("_mb"), []).append(a[peak] / b[peak])
    return {k: v for k, v in values.items() if v} if values["peak_rss"] else {}


def _summarise(per_round: dict[str, list[float]]) -> dict[str, Any]:
    """{metric: median, ..., "per_round": {...}, "spread": {metric: [min, max]}}."""
    entry: dict[str, Any] = {m: statistics.median(v) for m, v in per_round.items()}
    entry["per_round"] = per_round
    entry["spread"] = {m: [min(v), max(v)] for m, v in per_round.items()}
    return entry
