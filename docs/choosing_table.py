"""The selection table of docs/choosing.md, from an arena's results.json and the source itself.

    .venv/bin/python docs/choosing_table.py [ARENA_DIR]     (default: arena)

Performance (held-out exact match and answer NLL), efficiency (trainable parameters, s/step),
memory (peak RSS of the run), forgetting (KL from the base) and implementation complexity: the
lines of code of each method's own modules, counted here (non-blank lines that are not comments;
docstrings count, they are part of what a reader reads). The shared core every method stands on
(src/lorakit/core: the layer wrapper, the contract, saving and loading) is counted once, apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
MODULES = {  # the files a method adds on top of the core (its own code only)
    "lora": ["methods/lora.py"],
    "rslora": ["methods/lora.py"],
    "pissa": ["methods/lora.py"],
    "dora": ["methods/dora.py"],
    "loraplus": ["methods/loraplus.py"],
    "qlora": ["methods/qlora.py", "quant/nf4.py", "quant/linear.py"],
    "adalora": ["methods/adalora.py", "methods/adalora_budget.py"],
    "alora": ["methods/alora.py"],
    "quantum": ["methods/quantum.py"],
    "mopeft": ["methods/mopeft.py"],
    "adapter": ["methods/adapter.py"],
    "prompt": ["methods/prompt.py"],
    "prefix": ["methods/prefix.py", "methods/kv_prefix.py"],
    "bitfit": ["methods/inplace.py"],
    "norm": ["methods/inplace.py"],
    "full": ["methods/inplace.py"],
}


def lines_of_code(path: Path) -> int:
    return sum(
        1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")
    )


def loc(method: str) -> int:
    return sum(lines_of_code(SRC / f) for f in MODULES[method])


def fmt(stats: dict | None, scale: float = 1, digits: int = 1) -> str:
    if stats is None:
        return "n/a"
    text = f"{stats['mean'] * scale:.{digits}f}"
    return text + (f" ± {stats['sd'] * scale:.{digits}f}" if stats.get("sd") is not None else "")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "arena")
    results = json.loads((root / "results.json").read_text())
    core = sum(lines_of_code(p) for p in sorted((SRC / "core").glob("*.py")))
    print("| method | exact match % | answer NLL | KL from base | trainable params | s/step | peak RSS GB "
          "| decode ms/token (merged) | lines of code |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, arm in results["arms"].items():
        m = arm["metrics"]
        if not arm["done"]:
            error = arm["failed"][0]["error"] if arm["failed"] else "no finished run"
            print(f"| {name} | failed: {error} | | | | | | | {loc(name) if name in MODULES else 'n/a'} |")
            continue
        params = f"{m['trainable_params']['mean']:,.0f}" if m["trainable_params"] else "n/a"
        decode = fmt(m["unmerged_ms"]) + (f" ({fmt(m['merged_ms'])})" if m["merged_ms"] else "")
        print(
            f"| {name} | {fmt(m['exact_match'], 100)} | {fmt(m['answer_nll'], 1, 3)} | {fmt(m['kl_from_base'], 1, 4)} "
            f"| {params} | {fmt(m['step_s'], 1, 2)} | {fmt(m['peak_rss_mb'], 1 / 1024, 2)} | {decode} "
            f"| {loc(name) if name in MODULES else 'n/a'} |"
        )
    print(
        f"\nShared core (src/lorakit/core, every method): {core:,} lines. Commit {results['header']['commit']}."
    )
    claims(results)


def _stat(results: dict, arm: str, key: str, part: str = "mean") -> float | None:
    stats = (results["arms"].get(arm) or {}).get("metrics", {}).get(key)
    return None if stats is None else stats[part]


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def claims(results: dict) -> None:
    """The figures each of the documents' claims is judged on (docs/choosing.md)."""
    arms = results["arms"]

    def pair(a: str, b: str, key: str, spec: str, scale: float = 1, part: str = "mean") -> str:
        x, y = _stat(results, a, key, part), _stat(results, b, key, part)
        return f"{_f(None if x is None else x * scale, spec)} vs {_f(None if y is None else y * scale, spec)}"

    print("\n## Figures for the claims\n")
    if "lora" in arms and "loraplus" in arms:
        lora_curve, plus_curve = arms["lora"]["curve"], arms["loraplus"]["curve"]
        target = lora_curve[-1][1] if lora_curve else None
        reached = next((step for step, loss in plus_curve if target is not None and loss <= target), None)
        print(f"- LoRA+ vs LoRA: answer NLL {pair('loraplus', 'lora', 'answer_nll', '.3f')}; exact match "
              f"{pair('loraplus', 'lora', 'exact_match', '.1f', 100)}%; LoRA's final mean training loss "
              f"{_f(target, '.4f')} first reached by LoRA+ at step {reached}; KL from base "
              f"{pair('loraplus', 'lora', 'kl_from_base', '.4f')}")  # fmt: skip
    if "dora" in arms and "full" in arms:
        print(f"- DoRA vs full fine-tuning: answer NLL {pair('dora', 'full', 'answer_nll', '.3f')}; exact match "
              f"{pair('dora', 'full', 'exact_match', '.1f', 100)}%; KL {pair('dora', 'full', 'kl_from_base', '.4f')}; "
              f"s/step {pair('dora', 'full', 'step_s', '.2f')}")  # fmt: skip
    if "qlora" in arms and "lora" in arms:
        print(f"- QLoRA vs LoRA: peak RSS {pair('qlora', 'lora', 'peak_rss_mb', ',.0f')} MB; s/step "
              f"{pair('qlora', 'lora', 'step_s', '.2f')}; decode unmerged {pair('qlora', 'lora', 'unmerged_ms', '.1f')} "
              f"ms/token, merged {pair('qlora', 'lora', 'merged_ms', '.1f')}; answer NLL "
              f"{pair('qlora', 'lora', 'answer_nll', '.3f')}")  # fmt: skip
    if "adalora" in arms and "lora" in arms:
        print(f"- AdaLoRA vs LoRA: answer NLL {pair('adalora', 'lora', 'answer_nll', '.3f')} (sd over seeds "
              f"{pair('adalora', 'lora', 'answer_nll', '.3f', part='sd')}); exact match "
              f"{pair('adalora', 'lora', 'exact_match', '.1f', 100)}% (sd {pair('adalora', 'lora', 'exact_match', '.1f', 100, 'sd')}); "
              f"failed runs {len(arms['adalora']['failed'])}")  # fmt: skip
    base = results.get("base_ms_per_token")
    rows = [(n, _stat(results, n, "unmerged_ms"), _stat(results, n, "merged_ms")) for n in arms]
    print(f"- decoding ms/token (base {_f(base, '.1f')}): " + "; ".join(
        f"{n} {u:.1f}" + (f" / merged {m:.1f}" if m else "") for n, u, m in rows if u is not None))  # fmt: skip


if __name__ == "__main__":
    main()
