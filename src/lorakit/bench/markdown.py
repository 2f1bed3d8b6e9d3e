"""The Markdown view of a report: what a person reads; the JSON next to it has every sample."""

from __future__ import annotations

from typing import Any

from .cases import FORWARD_TOKENS, NEW_TOKENS, QUANT_SHAPE, TRAIN_BATCH, TRAIN_SEQ
from .rounds import TIME_METRICS


def render(report: dict[str, Any]) -> str:
    parts = [_header(report)]
    for suite, data in report["suites"].items():
        parts.append(TABLES[suite](data["cases"]))
        if suite == "train":
            parts += [
                _weights_note(name, r["weights"]) for name, r in data["cases"].items() if "weights" in r
            ]
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
        f"Machine: {m['cpu']}{_flags(m)}, {m['logical_cpus']} logical CPUs, {m['memory_gb']} GB; "
        f"1-min load average {load}. {versions}.{_gpu(m)}"
    )


def _gpu(machine: dict[str, Any]) -> str:
    gpu = machine.get("gpu")
    if not gpu:
        return ""
    return (
        f"\nDevice: **{gpu}** (timed between `torch.cuda.synchronize()` calls; GPU memory is "
        "`torch.cuda.max_memory_allocated`, the tensors' peak)."
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
        "| case | dtype | loss | batch | s/step | range (s) | per round (s) "
        "| tokens/s | peak RSS (MB) | peak RSS of the steps (MB) | GPU peak of the steps (MB) | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | | | | | | |")
            continue
        st = r["step"]
        steps_rss = f"{r['step_peak_rss_mb']:.0f}" if r.get("step_peak_rss_mb") else ""
        steps_gpu = f"{r['step_peak_gpu_mb']:.0f}" if r.get("step_peak_gpu_mb") else ""
        batch = "x".join(map(str, r.get("batch", (TRAIN_BATCH, TRAIN_SEQ))))
        rows.append(
            f"| {name} | {r['dtype']} | {r['loss']} | {batch} | {st['median_s']:.2f} | {_range(st, 1, 2)} "
            f"| {_per_round(st, 1, 2)} | {st['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {steps_rss} "
            f"| {steps_gpu} | {r['trainable_params']:,} |"
        )
    return "\n".join(rows)


def _quant_table(cases: dict[str, dict[str, Any]]) -> str:
    ok = [r for r in cases.values() if "error" not in r]
    shape = "x".join(map(str, ok[0]["shape"] if ok else QUANT_SHAPE))
    rows = [
        f"| case ({shape} fp32, NF4, blocks of 64, double quant) | quantize (ms) | range (ms) "
        "| per round (ms) | dequantize to bf16 (ms) | range (ms) | per round (ms) | stored (MB) "
        "| bits/param | relative error | 4-bit matmul fwd+bwd, 1024 rows bf16 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in cases.items():
        if "error" in r:
            rows.append(f"| {name} | failed | | | | | | | | | |")
            continue
        matmul = f"{r['matmul']['median_s'] * 1e3:.2f}" if "matmul" in r else ""
        numel = r["shape"][0] * r["shape"][1]
        q, d = r["quantize"], r["dequantize"]
        rows.append(
            f"| {name} | {q['median_s'] * 1e3:.1f} | {_range(q, 1e3, 1)} | {_per_round(q, 1e3, 1)} "
            f"| {d['median_s'] * 1e3:.1f} | {_range(d, 1e3, 1)} | {_per_round(d, 1e3, 1)} "
            f"| {r['stored_bytes'] / 1e6:.2f} | {8 * r['stored_bytes'] / numel:.3f} | {r['relative_error']:.4f} "
            f"| {matmul} |"
        )
    return "\n".join(rows)


def _weights_note(name: str, w: dict[str, float]) -> str:
    return (
        f"Weight memory of {name}'s frozen base: {_mb(w['model_bytes'])} MB in NF4 against "
        f"{_mb(w['model_reference_bytes'])} MB in bf16, ratio {w['model_ratio']:.3f} (the layers "
        f"left in full precision, embeddings and head included, count as bf16 in both); the NF4 linear "
        f"layers alone: {_mb(w['linear_bytes'])} MB against {_mb(w['linear_reference_bytes'])} "
        f"MB, ratio {w['linear_ratio']:.3f}, {w['linear_bits_per_parameter']:.3f} bits per weight."
    )


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.4g}"


TABLES = {"infer": _infer_table, "train": _train_table, "quant": _quant_table}


def _ratio_table(suite: str, ratios: dict[str, dict[str, Any]], rounds: int) -> str:
    """Median of the per-round ratios, with their min-max over rounds when there are several."""
    metrics = TIME_METRICS[suite]
    title = f"ratio (median of {rounds} rounds, min–max)" if rounds > 1 else "ratio (same run)"
    memory = ("peak_rss", "step_peak_rss") if suite == "train" else ("peak_rss",)
    if any("step_peak_gpu" in entry for entry in ratios.values()):
        memory = ("step_peak_gpu", "peak_gpu", *memory)
    metrics = tuple(m for m in metrics if any(m in entry for entry in ratios.values())) or metrics
    heads = {"peak_rss": "peak RSS", "step_peak_rss": "peak RSS of the steps"}
    heads.update(step_peak_gpu="GPU peak of the steps", peak_gpu="GPU peak of the case")
    rows = [
        f"| {title} | " + " | ".join(metrics) + " | " + " | ".join(heads[m] for m in memory) + " |",
        "|---|" + "---|" * (len(metrics) + len(memory)),
    ]
    for name, entry in ratios.items():
        cells = " | ".join(_ratio_cell(entry, m) if m in entry else "" for m in (*metrics, *memory))
        rows.append(f"| {name} | {cells} |")
    return "\n".join(rows)


def _ratio_cell(entry: dict[str, Any], metric: str) -> str:
    lo, hi = entry.get("spread", {}).get(metric, (entry[metric], entry[metric]))
    if len(entry.get("per_round", {}).get(metric, ())) < 2:
        return f"{entry[metric]:.3f}"
    return f"{entry[metric]:.3f} ({lo:.3f}–{hi:.3f})"


def _noise_floor_note(suite: str, floor: dict[str, Any]) -> str:
    metrics = TIME_METRICS[suite]
    values = ", ".join(f"{m} {_ratio_cell(floor, m)}" for m in metrics)
    return (
        f"Noise floor: {floor['ratio']} = {values}. Both sides are the same model in two processes, "
        "so its distance from 1 is noise alone; other ratios no further from 1 are within noise."
    )


def _check_table(checks: dict[str, dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for entry in checks.values() for k in entry))
    rows = [
        "| same weights, same outputs? | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, entry in checks.items():
        rows.append(f"| {name} | " + " | ".join(_cell(entry[k]) if k in entry else "" for k in keys) + " |")
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
    if suite in ("train", "quant") or forward is None:
        return f"{steps} timed iterations"
    others = "generations" if suite == "infer" else "generations or train steps"
    return f"{forward} timed forwards and {steps} timed {others}"


def _jobs_note(jobs: int) -> str:
    return f", {jobs} cases at once (a smoke test: these timings disturb each other)" if jobs > 1 else ""


def _flags(machine: dict[str, Any]) -> str:
    """The CPU's speed flags, and any limit on the instruction sets the run was allowed (older
    reports have neither)."""
    out = f" ({' '.join(machine['cpu_flags'])})" if machine.get("cpu_flags") else ""
    limits = machine.get("isa_limits")
    if limits:
        out += "; **instruction sets limited**: " + ", ".join(f"{k}={v}" for k, v in limits.items())
        out += f" (torch dispatch: {machine.get('torch_cpu_capability')})"
    return out
