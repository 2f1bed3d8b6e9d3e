"""The tables of docs/methods/quantum.md from the runs of docs/methods/quantum_runs.sh (their
metrics.json and /usr/bin/time output): run from the repository root, after the runs.

    .venv/bin/python docs/methods/quantum_table.py [runs/quantum-study] [runs/alora-study/lora]
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quantum-study")
lora16 = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/alora-study/lora")


def row(folder: Path) -> dict | None:
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return None
    m = json.loads(metrics.read_text())
    time_file = folder.parent / f"{folder.name}.time"
    rss = None
    if time_file.is_file():
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
        rss = int(found.group(1)) / 1e6 if found else None
    after, train = m["after"], m["train"]
    if after is None:  # a sweep run (--skip-eval): its held-out NLL is in log.jsonl
        return None
    return {
        "params": train["trainable_params"],
        "em": after["exact_match"],
        "correct": after["correct"],
        "n": after["n"],
        "nll": after["answer_nll"],
        "ppl": after["general_ppl"],
        "kl": after["kl_from_base"],
        "loss": train["final_loss"],
        "tok_s": train["tokens_per_s"],
        "train_s": train["train_seconds"],
        "rss": rss,
        "lr": m["train_config"]["lr"],
        "seed": m["train_config"]["seed"],
    }


runs = {p.name: r for p in sorted(study.iterdir()) if p.is_dir() and (r := row(p))}
if (r := row(lora16)) is not None:
    runs["lora-r16 (default run)"] = r
print(
    "| run | lr | seed | trainable | exact match | answer NLL | general ppl | KL | final loss | tokens/s | train s | peak RSS GB |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, r in runs.items():
    rss = f"{r['rss']:.2f}" if r["rss"] else ""
    print(
        f"| {name} | {r['lr']:g} | {r['seed']} | {r['params']:,} | {r['em']:.1%} ({r['correct']}/{r['n']}) | "
        f"{r['nll']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['loss']:.3f} | {r['tok_s']:.0f} | {r['train_s']:.0f} | {rss} |"
    )
# seeds: the same setting over seeds 0, 1, 2 (seed 0 is the run without a -seed suffix)
groups: dict[str, list[dict]] = {}
for name, r in runs.items():
    base = re.sub(r"-seed\d+$", "", name)
    groups.setdefault(base, []).append(r)
print()
print("| setting | seeds | exact match mean (min-max) | answer NLL mean | general ppl mean (min-max) |")
print("|---|---|---|---|---|")
for base, rs in groups.items():
    if len(rs) < 2:
        continue
    em = [r["em"] for r in rs]
    ppl = [r["ppl"] for r in rs]
    print(
        f"| {base} | {len(rs)} | {statistics.mean(em):.1%} ({min(em):.1%}-{max(em):.1%}) | "
        f"{statistics.mean(r['nll'] for r in rs):.3f} | {statistics.mean(ppl):.1f} ({min(ppl):.1f}-{max(ppl):.1f}) |"
    )
