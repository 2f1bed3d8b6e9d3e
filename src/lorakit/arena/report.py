"""The arena's results and report, drawn only from the run folders.

`collect` reads every run's status.json, metrics.json, latency.json and log.jsonl (nothing is kept
from the runner's memory, so a report rebuilt later says the same); `write_report` writes
results.json, report.md, four PNG plots and report.html (one static file: the plots inline as data
URIs, the table sortable by a click on its header, no network).
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.core.io import atomic_write

from .arms import ARMS


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str  # format of one value
    better: str | None  # "high", "low" or None (a cost or a size: context, not a score)
    scale: float = 1.0  # shown as value x scale


METRICS = (
    Metric("exact_match", "exact match %", "{:.1f}", "high", 100),
    Metric("answer_nll", "answer NLL", "{:.3f}", "low"),
    Metric("general_ppl_change", "general ppl change %", "{:+.1f}", "low", 100),
    Metric("kl_from_base", "KL from base", "{:.4f}", "low"),
    Metric("general_qa_change", "general QA change (pts)", "{:+.1f}", "high", 100),
    Metric("trainable_params", "trainable params", "{:,.0f}", None),
    Metric("adapter_mb", "saved MB", "{:.2f}", None),
    Metric("step_s", "s/step", "{:.2f}", None),
    Metric("peak_rss_mb", "peak RSS MB", "{:,.0f}", None),
    Metric("unmerged_ms", "decode ms/token", "{:.1f}", None),
    Metric("merged_ms", "merged ms/token", "{:.1f}", None),
    Metric("wall_s", "run wall s", "{:.0f}", None),
)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _log_rows(log: Path) -> list[dict[str, Any]]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run_row(folder: Path) -> dict[str, Any] | None:
    """One run's figures, straight from its folder; None for a run with no status yet."""
    status = _read(folder / "status.json")
    if status is None:
        return None
    row: dict[str, Any] = {"run": folder.name, "arm": status["arm"], "seed": status["seed"],
                           "status": status["status"], "error": status.get("error")}  # fmt: skip
    if status["status"] != "done":
        return row
    metrics, latency = _read(folder / "metrics.json"), _read(folder / "latency.json") or {}
    if metrics is None:  # the folder was tidied by hand after the run
        return {**row, "status": "failed", "error": f"{folder / 'metrics.json'} is missing"}
    before, after, train = metrics.get("before") or {}, metrics.get("after") or {}, metrics["train"]
    log = _log_rows(folder / "log.jsonl")
    row.update(
        exact_match=after.get("exact_match"),
        answer_nll=after.get("answer_nll"),
        general_ppl_change=_change(after.get("general_ppl"), before.get("general_ppl"), relative=True),
        kl_from_base=after.get("kl_from_base"),
        general_qa_change=_change(after.get("general_qa"), before.get("general_qa")),
        trainable_params=train.get("trainable_params"),
        adapter_mb=None if status.get("adapter_bytes") is None else status["adapter_bytes"] / 1e6,
        step_s=_step_seconds(log, train),
        peak_rss_mb=status.get("peak_rss_mb"),
        unmerged_ms=(latency.get("unmerged") or {}).get("ms_per_token"),
        merged_ms=(latency.get("merged") or {}).get("ms_per_token"),
        merged_note=latency.get("merged_note") or status.get("latency_error"),
        wall_s=status.get("wall_s"),
        final_loss=train.get("final_loss"),
        curve=[(r["step"], r["loss"]) for r in log if "loss" in r],
    )
    return row


def _step_seconds(log: list[dict[str, Any]], train: dict[str, Any]) -> float | None:
    """Training seconds per optimizer step: the log's last elapsed time (not rounded, and carried
    across a resume) over its step."""
    last = next((r for r in reversed(log) if "elapsed" in r), None)
    if last is not None and last["step"]:
        return last["elapsed"] / last["step"]
    return train["train_seconds"] / train["steps"] if train.get("steps") else None


def _change(after: float | None, before: float | None, relative: bool = False) -> float | None:
    if after is None or before is None:
        return None
    return (after - before) / before if relative else after - before


def summarise(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def collect(root: Path) -> dict[str, Any]:
    header = _read(root / "arena.json")
    if header is None:
        raise FileNotFoundError(f"{root} holds no arena (no arena.json); run lorakit arena --out {root}")
    runs = sorted((root / "runs").iterdir()) if (root / "runs").is_dir() else []
    rows = [row for folder in runs if folder.is_dir() and (row := run_row(folder)) is not None]
    order = list(ARMS)
    arms: dict[str, Any] = {}
    for name in sorted({r["arm"] for r in rows}, key=lambda n: order.index(n) if n in order else len(order)):
        mine = [r for r in rows if r["arm"] == name]
        done = [r for r in mine if r["status"] == "done"]
        arms[name] = {
            "what": ARMS[name].what if name in ARMS else "",
            "done": len(done),
            "failed": [{"seed": r["seed"], "error": r["error"]} for r in mine if r["status"] != "done"],
            "metrics": {m.key: summarise(done, m.key) for m in METRICS},
            "merged_note": next((r["merged_note"] for r in done if r.get("merged_note")), None),
            "curve": _mean_curve([r["curve"] for r in done]),
        }
    base = _read(root / "base_latency.json") or {}
    excluded = {a.name: a.excluded for a in ARMS.values() if a.excluded}
    return {"header": header, "runs": rows, "arms": arms, "excluded": excluded,
            "base_ms_per_token": (base.get("base") or {}).get("ms_per_token")}  # fmt: skip


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, loss in curve:
            by_step.setdefault(step, []).append(loss)
    return [(step, statistics.fmean(v)) for step, v in sorted(by_step.items())]


# ---- rendering ---------------------------------------------------------------------------------


def cell(stats: dict[str, Any] | None, metric: Metric) -> str:
    if stats is None:
        return "n/a"
    text = metric.fmt.format(stats["mean"] * metric.scale)
    if stats["sd"] is not None:
        text += " ± " + metric.fmt.format(stats["sd"] * metric.scale).lstrip("+")
    return text


def _environment_line(header: dict[str, Any]) -> str:
    m = header["machine"]
    bf16 = ", ".join(m["bf16"]) if isinstance(m["bf16"], list) else m["bf16"]
    return (
        f"commit {header['commit']}, started {header['started']}; {m['cpu']} ({m['logical_cpus']} cores, "
        f"{m['threads']} torch threads, bf16: {bf16}{', GPU ' + m['gpu'] if m.get('gpu') else ''}); "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}"
    )


def _settings_line(header: dict[str, Any]) -> str:
    s = header["settings"]
    parts = [f"{k}={v}" for k, v in s.items() if v not in (None, "")]
    line = f"{header['seeds']} seed(s); " + ", ".join(parts)
    matched = header.get("matched") or {}
    if matched:
        sized = [f"{n} {m['knob']}={m['value']}" for n, m in matched.items() if "knob" in m]
        own = [f"{n} ({m['note']})" for n, m in matched.items() if "knob" not in m]
        line += f". Sized to about {s['match_params']:,} trainable parameters: " + ", ".join(sized)
        line += ("; at their own size: " + ", ".join(own)) if own else ""
    return line


def markdown(result: dict[str, Any], images: dict[str, str]) -> str:
    header = result["header"]
    lines = [
        "# lorakit arena",
        "",
        _environment_line(header),
        "",
        _settings_line(header),
        "",
        "| method | runs | " + " | ".join(m.label for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name, arm in result["arms"].items():
        runs = f"{arm['done']}" + (f" ({len(arm['failed'])} failed)" if arm["failed"] else "")
        cells = [cell(arm["metrics"][m.key], m) for m in METRICS]
        lines.append(f"| {name} | {runs} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds. Base model decoding: "
              + (f"{result['base_ms_per_token']:.1f} ms/token." if result["base_ms_per_token"] else "not measured.")]  # fmt: skip
    notes = [(n, a["merged_note"]) for n, a in result["arms"].items() if a["merged_note"]]
    if notes:
        lines += ["", "Not merged: " + "; ".join(f"{n}: {note}" for n, note in notes) + "."]
    failures = [(n, f) for n, a in result["arms"].items() for f in a["failed"]]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {n} seed {f['seed']}: {f['error']}" for n, f in failures]
    if result["excluded"]:
        lines += ["", "## Not in the arena", ""] + [f"- {n}: {why}" for n, why in result["excluded"].items()]
    lines += ["", *[f"![{title}]({name})" for name, title in images.items()], ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], root: Path) -> dict[str, str]:
    """The four PNGs; {file name: title}. Arms without the plotted figures are left out of a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    made: dict[str, str] = {}

    def scatter(name: str, title: str, xkey: str, xlabel: str, log_x: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm_name, arm in arms.items():
            x, y = arm["metrics"][xkey], arm["metrics"]["exact_match"]
            if x is None or y is None:
                continue
            ax.errorbar(
                x["mean"], 100 * y["mean"], xerr=x["sd"] or 0, yerr=100 * (y["sd"] or 0), fmt="o", capsize=3
            )
            ax.annotate(
                arm_name, (x["mean"], 100 * y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out exact match %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / name, dpi=110)
        plt.close(fig)
        made[name] = title

    scatter(
        "score_vs_forgetting.png",
        "Score against forgetting",
        "kl_from_base",
        "next-token KL from the base (lower: less forgetting)",
    )
    scatter(
        "score_vs_params.png",
        "Score against trainable parameters",
        "trainable_params",
        "trainable parameters",
        log_x=True,
    )

    names = [n for n, a in arms.items() if a["metrics"]["step_s"] is not None]
    if names:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * len(names) + 1.5))
        for ax, key, label in (
            (left, "step_s", "s per optimizer step"),
            (right, "peak_rss_mb", "peak RSS of the run, MB"),
        ):
            means = [(arms[n]["metrics"][key] or {"mean": 0})["mean"] for n in names]
            errs = [(arms[n]["metrics"][key] or {}).get("sd") or 0 for n in names]
            ax.barh(names, means, xerr=errs, capsize=2)
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(root / "cost.png", dpi=110)
        plt.close(fig)
        made["cost.png"] = "Step time and memory per method"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm_name, arm in arms.items():
        if arm["curve"]:
            steps, losses = zip(*arm["curve"], strict=True)
            ax.plot(steps, losses, label=arm_name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    if any(arm["curve"] for arm in arms.values()):
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(root / "loss_curves.png", dpi=110)
    plt.close(fig)
    made["loss_curves.png"] = "Loss curves"
    return made


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lorakit arena</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; cursor: pointer; user-select: none; }}
th[aria-sort="ascending"]::after {{ content: " \\25B2"; }}
th[aria-sort="descending"]::after {{ content: " \\25BC"; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; margin: 1em 0; display: block; }}
.note {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>lorakit arena</h1>
<p class="note">{environment}</p>
<p class="note">{settings}</p>
<p class="note">Click a column header to sort; mean ± sample standard deviation over seeds.</p>
<table id="arena"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
{notes}
{images}
<script>
(function () {{
  var table = document.getElementById("arena");
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {{
    th.addEventListener("click", function () {{
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) {{ h.removeAttribute("aria-sort"); }});
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(table.tBodies[0].rows);
      rows.sort(function (a, b) {{
        var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
        var nx = x === "" ? NaN : Number(x), ny = y === "" ? NaN : Number(y);
        var order;
        if (isNaN(nx) && isNaN(ny)) {{ order = String(x).localeCompare(String(y)); }}
        else if (isNaN(nx)) {{ return 1; }}
        else if (isNaN(ny)) {{ return -1; }}
        else {{ order = nx - ny; }}
        return ascending ? order : -order;
      }});
      rows.forEach(function (row) {{ table.tBodies[0].appendChild(row); }});
    }});
  }});
}})();
</script>
</body></html>
"""


def html_page(result: dict[str, Any], images: dict[str, str], root: Path) -> str:
    head = "<th>method</th><th>runs</th>" + "".join(f"<th>{html.escape(m.label)}</th>" for m in METRICS)
    body = []
    for name, arm in result["arms"].items():
        failed = f" ({len(arm['failed'])} failed)" if arm["failed"] else ""
        cells = [f'<td data-value="{html.escape(name)}" title="{html.escape(arm["what"])}">{html.escape(name)}</td>',
                 f'<td data-value="{arm["done"]}">{arm["done"]}{failed}</td>']  # fmt: skip
        for m in METRICS:
            stats = arm["metrics"][m.key]
            value = "" if stats is None else repr(stats["mean"] * m.scale)
            cells.append(f'<td data-value="{value}">{html.escape(cell(stats, m))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    failures = [(n, f) for n, a in result["arms"].items() for f in a["failed"]]
    notes = ""
    if failures:
        notes += (
            "<h2>Failed runs</h2><ul>"
            + "".join(
                f"<li>{html.escape(n)} seed {f['seed']}: {html.escape(str(f['error']))}</li>"
                for n, f in failures
            )
            + "</ul>"
        )
    if result["excluded"]:
        notes += (
            "<h2>Not in the arena</h2><ul>"
            + "".join(
                f"<li>{html.escape(n)}: {html.escape(why)}</li>" for n, why in result["excluded"].items()
            )
            + "</ul>"
        )
    pictures = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode((root / name).read_bytes()).decode()}">'
        for name, title in images.items()
    )
    return PAGE.format(environment=html.escape(_environment_line(result["header"])),
                       settings=html.escape(_settings_line(result["header"])), head=head,
                       body="\n".join(body), notes=notes, images=pictures)  # fmt: skip


def write_report(root: Path) -> dict[str, Any]:
    result = collect(root)
    images = plots(result, root)
    for name, text in (
        ("results.json", json.dumps(result, indent=2) + "\n"),
        ("report.md", markdown(result, images)),
        ("report.html", html_page(result, images, root)),
    ):
        atomic_write(root / name, lambda tmp, text=text: tmp.write_text(text))
    return result
