"""The tables (and the plot) of docs/methods/longlora.md from the runs of docs/methods/longlora_runs.sh
(or any folder of `lorakit train --task wiki` runs).

    .venv/bin/python docs/methods/longlora_table.py [runs/longlora-toy] [--plot docs/methods/longlora_toy.png]

Per arm: the method, what trained, the perplexity at each evaluated length before (the base model;
for the full fine-tuning arm, the base with interpolated positions) and after, the perplexity past
the original window, passkey accuracy where measured, training time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ppl(block: dict | None, length: str, key: str = "ppl") -> str:
    if not block:
        return "-"
    value = block["perplexity"].get(length, {}).get(key)
    return f"{value:.1f}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="?", default="runs/longlora-toy")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(args.runs).glob("*/metrics.json"))}
    if not runs:
        raise SystemExit(f"no */metrics.json under {args.runs}")
    lengths = sorted({int(n) for m in runs.values() for n in (m["after"] or m["before"])["perplexity"]})
    head = " | ".join(f"ppl {n:,} (before -> after)" for n in lengths)
    print(f"| arm | trainable | {head} | past the window at {lengths[-1]:,} | passkey | train s |")
    print("|---|---|" + "---|" * len(lengths) + "---|---|---|")
    for arm, m in runs.items():
        before, after = m["before"], m["after"]
        cells = [f"{_ppl(before, str(n))} -> {_ppl(after, str(n))}" for n in lengths]
        past = f"{_ppl(before, str(lengths[-1]), 'ppl_past_window')} -> {_ppl(after, str(lengths[-1]), 'ppl_past_window')}"
        passkey = "-"
        if after and "passkey" in after:
            passkey = ", ".join(
                f"{int(n):,}: {before['passkey'][n]['accuracy']:.0%} -> {after['passkey'][n]['accuracy']:.0%}"
                for n in after["passkey"]
            )
        trainable = f"{m['train']['trainable_params'] / 1e6:.2f}M"
        print(
            f"| {arm} | {trainable} | {' | '.join(cells)} | {past} | {passkey} | {m['train']['train_seconds']:.0f} |"
        )
    if args.plot:
        _plot(runs, lengths, Path(args.plot))


def _plot(runs: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown_base = set()
    for arm, m in runs.items():
        after = m["after"]["perplexity"]
        ax.plot(lengths, [after[str(n)]["ppl"] for n in lengths], marker="o", label=arm)
        before = m["before"]["perplexity"]
        key = json.dumps(before, sort_keys=True)
        if key not in shown_base:
            shown_base.add(key)
            # a method without --context trained a base whose positions were interpolated beforehand
            pi = m["run"]["method"] != "longlora" and m["window"]["now"] > m["window"]["original"]
            label = (
                "base, positions interpolated (no training)" if pi else "base, own positions (no training)"
            )
            ax.plot(
                lengths,
                [before[str(n)]["ppl"] for n in lengths],
                ls="--",
                color="grey" if not pi else "black",
                label=label,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.set_xlabel("evaluation length (tokens), full attention")
    ax.set_ylabel("held-out perplexity")
    ax.axvline(next(iter(runs.values()))["window"]["original"], color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
