"""The tables of docs/vocabulary.md from the runs of docs/vocabulary_runs.sh.

    .venv/bin/python docs/vocabulary_table.py [runs/vocabulary]

Per arm: tokens added, held-out exact match, answer NLL per token and per character, training time
and tokens/s, general-text NLL per character and perplexity, KL from the base, general questions;
then the first logged steps' losses (the three initialisations)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vocabulary")
    print(
        "| arm | tokens added | exact match | answer NLL/token | answer NLL/char (before -> after) | train s "
        "| s/step | tokens/s | general NLL/char (before -> after) | KL from base | general questions |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    curves = {}
    for path in sorted(runs.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        before, after, train = m["before"], m["after"], m["train"]
        added = _added(path.parent / "adapter")
        qa = (
            f"{before.get('general_qa', 0):.1%} -> {after.get('general_qa', 0):.1%}"
            if "general_qa" in after
            else "-"
        )
        print(
            f"| {path.parent.name} | {added} | {after.get('exact_match', float('nan')):.1%} | "
            f"{after['answer_nll']:.3f} | {before['answer_nll_per_char']:.3f} -> {after['answer_nll_per_char']:.3f} | "
            f"{train['train_seconds']:.0f} | {train['train_seconds'] / train['steps']:.2f} | {train['tokens_per_s']:.0f} | "
            f"{before['general_nll_per_char']:.3f} -> {after['general_nll_per_char']:.3f} | "
            f"{after.get('kl_from_base', float('nan')):.3f} | {qa} |"
        )
        log = path.parent / "log.jsonl"
        if log.is_file():
            steps = [json.loads(line) for line in log.read_text().splitlines()]
            curves[path.parent.name] = [s["loss"] for s in steps if "loss" in s]
    if curves:
        print("\n| arm | loss at steps 1, 2, 5, 10, 25, 50 | last |\n|---|---|---|")
        for name, losses in curves.items():
            picks = [losses[i - 1] for i in (1, 2, 5, 10, 25, 50) if i <= len(losses)]
            print(f"| {name} | {', '.join(f'{v:.3f}' for v in picks)} | {losses[-1]:.3f} |")


def _added(adapter: Path) -> int:
    record = adapter / "vocabulary.json"
    return len(json.loads(record.read_text())["added"]) if record.is_file() else 0


if __name__ == "__main__":
    main()
