"""The table and plot of docs/forgetting.md from the runs of docs/forgetting_runs.sh.

    .venv/bin/python docs/forgetting_table.py [runs/forgetting] [docs/forgetting.png]

Per arm: held-out exact match, general-text perplexity and its change from the base, next-token KL
from the base, general questions answered, and the training time (only comparable between arms
that ran alone). Arms still running or missing are listed as such."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/forgetting")
    plot = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/forgetting.png")
    rows, points = [], []
    arms = sorted(p.parent for p in runs.glob("*/metrics.json"))
    pending = sorted(p.stem for p in runs.glob("*.log") if not (runs / p.stem / "metrics.json").is_file())
    metrics = {arm.name: json.loads((arm / "metrics.json").read_text()) for arm in arms}
    print(
        "| arm | exact match | general ppl (change) | KL from base | general questions answered | train s |\n"
        "|---|---|---|---|---|---|"
    )
    for name, m in metrics.items():
        before, after, train = m["before"], m["after"], m["train"]
        change = after["general_ppl"] / before["general_ppl"] - 1
        qa = (
            f"{after.get('general_qa_correct', '?')} of {after.get('general_qa_n', '?')} ({after['general_qa']:.1%})"
            if "general_qa" in after
            else "-"
        )
        rows.append(
            f"| {name} | {after['exact_match']:.1%} | {after['general_ppl']:.2f} ({change:+.0%}) | "
            f"{after.get('kl_from_base', float('nan')):.3f} | {qa} | {train['train_seconds']:.0f} |"
        )
        points.append((name, change, after["exact_match"], after.get("general_qa")))
    print("\n".join(rows))
    if pending:
        print(f"\nnot finished: {', '.join(pending)}")
    if points:
        _plot(points, plot, metrics)


def _plot(points: list, path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, change, em, qa in points:
        axes[0].scatter(100 * change, 100 * em)
        axes[0].annotate(
            name, (100 * change, 100 * em), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
        if qa is not None:
            axes[1].scatter(100 * qa, 100 * em)
            axes[1].annotate(
                name, (100 * qa, 100 * em), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    base = next(iter(metrics.values()))["before"]
    axes[0].axvline(10, color="grey", linestyle=":", linewidth=1)
    axes[0].axhline(80, color="grey", linestyle=":", linewidth=1)
    axes[0].set_xscale("symlog", linthresh=20)  # linear to +/-20%, then logarithmic: LoRA+'s +700% fits
    axes[0].set_xlabel(
        f"general-text perplexity change from the base ({base['general_ppl']:.1f}), % (symlog)"
    )
    axes[0].set_ylabel("held-out exact match, %")
    axes[0].set_title("task score against forgetting (goal: upper left of the dotted lines)")
    if "general_qa" in base:
        axes[1].axvline(100 * base["general_qa"], color="grey", linestyle=":", linewidth=1)
    axes[1].set_xlabel("general questions answered after training, % (dotted: the base)")
    axes[1].set_title("task score against the general-question probe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
