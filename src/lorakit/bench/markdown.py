"""The Markdown view of a report: what a person reads; the JSON next to it has every sample."""

from __future__ import annotations

from typing import Any

from .cases import FORWARD_TOKENS, NEW_TOKENS, TRAIN_BATCH, TRAIN_SEQ


def render(report: dict[str, Any]) -> str:
    parts = [_header(report)]
    for suite, data in report["suites"].items():
        parts.append(_infer_table(data["cases"]) if suite == "infer" else _train_table(data["cases"]))
        parts.append(_ratio_table(suite, data["ratios"]))
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
        f"Model: {s['model']}. {s['warmup']} warm-up + {s['steps']} timed iterations per case, "
        f"each case in its own process, {m['threads']} torch threads, OMP_WAIT_POLICY={s.get('omp_wait_policy')}"
        f"{_jobs_note(s.get('jobs', 1))}.\n"
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gb']} GB; "
        f"1-min load average {load}. {versions}."
    )


def _infer_table(cases: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"| case | forward 1x{FORWARD_TOKENS} (ms) | range (ms) | generate {NEW_TOKENS} tokens (s) "
        "| range (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | |")
            continue
        f, g = r["forward"], r["generate"]
        rows.append(
            f"| {name} | {f['median_s'] * 1e3:.1f} | {_range(f, 1e3, 1)} | {g['median_s']:.2f} "
            f"| {_range(g, 1, 2)} | {g['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(rows)


def _train_table(cases: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"| case | dtype | loss | s/step ({TRAIN_BATCH}x{TRAIN_SEQ}) | range (s) | tokens/s "
        "| peak RSS (MB) | trainable params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | | |")
            continue
        st = r["step"]
        rows.append(
            f"| {name} | {r['dtype']} | {r['loss']} | {st['median_s']:.2f} | {_range(st, 1, 2)} "
            f"| {st['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['trainable_params']:,} |"
        )
    return "\n".join(rows)


def _ratio_table(suite: str, ratios: dict[str, dict[str, float]]) -> str:
    metrics = ("forward", "generate") if suite == "infer" else ("step",)
    rows = [
        "| ratio (same run) | " + " | ".join(metrics) + " | peak RSS |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for name, entry in ratios.items():
        rows.append(f"| {name} | " + " | ".join(f"{entry[m]:.3f}" for m in (*metrics, "peak_rss")) + " |")
    return "\n".join(rows)


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


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _jobs_note(jobs: int) -> str:
    return f", {jobs} cases at once (a smoke test: these timings disturb each other)" if jobs > 1 else ""
