"""The Markdown view of a report: what a person reads; the JSON next to it has every sample."""

from __future__ import annotations

from typing import Any

from .cases import FORWARD_TOKENS, NEW_TOKENS, TRAIN_BATCH, TRAIN_SEQ


def render(report: dict[str, Any]) -> str:
    parts = [_header(report)]
    for suite, data in report["suites"].items():
        parts.append(_infer_table(data["cases"]) if suite == "infer" else _train_table(data["cases"]))
        parts.append(_ratio_table(suite, data["ratios"], data.get("rounds", 1)))
        if data.get("noise_floor"):
            parts.append(_noise_floor_note(suite, data["noise_floor"]))
        if data["checks"]:
            parts.append(_check_table(data["checks"]))
    if report["failed"]:
        parts.append("Failed cases: " + ", ".join(report["failed"]) + " (errors in the JSON).")
    return "\n\n".join(parts) + "\n"


def _header(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = f"{m['load_average_before'][0]:.2f} before, {m.get('load_average_after', [0.0])[0]:.2f} after"
    return (
        f"# lorakit bench: {s['suite']} ({m['date']})\n\n"
        f"Model: {s['model']}. {_rounds_note(s.get('rounds', 1))} {s['warmup']} warm-up + {_steps_note(s)} "
        f"per case, each case in its own process, {m['threads']} torch threads, "
        f"OMP_WAIT_POLICY={s.get('omp_wait_policy')}"
        f"{_jobs_note(s.get('jobs', 1))}.\n"
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gb']} GB; "
        f"1-min load average {load}. {versions}."
    )


def _infer_table(cases: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"| case | forward 1x{FORWARD_TOKENS} (ms) | range (ms) | per round (ms) "
        f"| generate {NEW_TOKENS} tokens (s) | range (s) | per round (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | | | |")
            continue
        f, g = r["forward"], r["generate"]
        rows.append(
            f"| {name} | {f['median_s'] * 1e3:.1f} | {_range(f, 1e3, 1)} | {_per_round(f, 1e3, 1)} "
            f"| {g['median_s']:.2f} | {_range(g, 1, 2)} | {_per_round(g, 1, 2)} "
            f"| {g['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def _train_table(cases: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"| case | dtype | loss | s/step ({TRAIN_BATCH}x{TRAIN_SEQ}) | range (s) | per round (s) "
        "| tokens/s | peak RSS (MB) | trainable params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | | | |")
            continue
        st = r["step"]
        rows.append(
            f"| {name} | {r['dtype']} | {r['loss']} | {st['median_s']:.2f} | {_range(st, 1, 2)} "
            f"| {_per_round(st, 1, 2)} | {st['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} "
            f"| {r['trainable_params']:,} |"
        )
    return "\n".join(rows)


def _ratio_table(suite: str, ratios: dict[str, dict[str, Any]], rounds: int) -> str:
    """Median of the per-round ratios, with their min-max over rounds when there are several."""
    metrics = ("forward", "generate") if suite == "infer" else ("step",)
    title = f"ratio (median of {rounds} rounds, min–max)" if rounds > 1 else "ratio (same run)"
    rows = [
        f"| {title} | " + " | ".join(metrics) + " | peak RSS |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for name, entry in ratios.items():
        cells = " | ".join(_ratio_cell(entry, m) for m in (*metrics, "peak_rss"))
        rows.append(f"| {name} | {cells} |")
    return "\n".join(rows)


def _ratio_cell(entry: dict[str, Any], metric: str) -> str:
    lo, hi = entry.get("spread", {}).get(metric, (entry[metric], entry[metric]))
    if len(entry.get("per_round", {}).get(metric, ())) < 2:
        return f"{entry[metric]:.3f}"
    return f"{entry[metric]:.3f} ({lo:.3f}–{hi:.3f})"


def _noise_floor_note(suite: str, floor: dict[str, Any]) -> str:
    metrics = ("forward", "generate") if suite == "infer" else ("step",)
    values = ", ".join(f"{m} {_ratio_cell(floor, m)}" for m in metrics)
    return (
        f"Noise floor: {floor['ratio']} = {values}. Both sides are the same model in two processes, "
        "so its distance from 1 is noise alone; other ratios no further from 1 are within noise."
    )


def _check_table(checks: dict[str, dict[str, Any]]) -> str:
    keys = list(next(iter(checks.values())))
    rows = [
        "| same weights, same outputs? | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, entry in checks.items():
        rows.append(f"| {name} | " + " | ".join(_cell(entry[k]) for k in keys) + " |")
    return "\n".join(rows)


def _range(timing: dict[str, Any], scale: float, digits: int) -> str:
    samples = timing["samples_s"]
    return f"{min(samples) * scale:.{digits}f}–{max(samples) * scale:.{digits}f}"


def _per_round(timing: dict[str, Any], scale: float, digits: int) -> str:
    medians = timing.get("round_medians_s", [timing["median_s"]])
    return " / ".join(f"{m * scale:.{digits}f}" for m in medians)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _rounds_note(rounds: int) -> str:
    if rounds == 1:
        return "1 round."
    return f"{rounds} rounds (case order reversed every other round); medians are medians of round medians."


def _steps_note(settings: dict[str, Any]) -> str:
    steps, forward, suite = settings["steps"], settings.get("forward_steps"), settings["suite"]
    if suite == "train" or forward is None:
        return f"{steps} timed iterations"
    others = "generations" if suite == "infer" else "generations or train steps"
    return f"{forward} timed forwards and {steps} timed {others}"


def _jobs_note(jobs: int) -> str:
    return f", {jobs} cases at once (a smoke test: these timings disturb each other)" if jobs > 1 else ""
