"""The `lorakit bench` subcommand: `add_arguments(parser)` declares it, `main(args)` runs it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cases import SUITES
from .runner import run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=(*SUITES, "all", "alora"),
        default="infer",
        help="alora: the multi-turn conversation of docs/methods/alora.md (its own report)",
    )
    parser.add_argument("--turns", type=int, default=50, help="alora suite: conversation turns")
    parser.add_argument(
        "--vs-peft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the PEFT and bitsandbytes cases (each skipped anyway if not installed)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face folder, 'tiny', or a random-weight Llama: 'random-360m', 'random-1b' (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--out", default="bench-results", help="folder for the JSON and Markdown")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="run the whole case list this many times, order reversed every other round; ratios are "
        "taken per round, then their median (default: 3, or 1 for --model tiny)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per case")
    parser.add_argument(
        "--forward-steps", type=int, default=None, help="timed forwards per infer case (default: 2 x --steps)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each case")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the cases run: cpu, cuda, cuda:N, or auto (the GPU when torch sees one); on a GPU "
        "the timings are synchronised and its memory peaks reported (docs/gpu.md)",
    )
    parser.add_argument(
        "--cases", nargs="+", default=None, help="run only these cases (space- or comma-separated)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cases at once; >1 only for smoke tests (they slow each other)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the JSON report on stdout (the Markdown then goes to stderr)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the bench; exit status 1 if any case failed."""
    if args.suite == "alora":
        from .alora import run_alora_bench

        alora = run_alora_bench(model=args.model, turns=args.turns, threads=args.threads, out_dir=args.out)
        print(Path(alora["files"]["markdown"]).read_text())
        return 0 if all(c["equal"] for c in alora["arms"].get("alora", {}).get("checks", [])) else 1
    report = run_bench(
        suite=args.suite,
        vs_peft=args.vs_peft,
        model=args.model,
        out_dir=args.out,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        cases=[name for item in args.cases for name in item.split(",") if name] if args.cases else None,
        jobs=args.jobs,
        rounds=args.rounds,
        forward_steps=args.forward_steps,
        device=args.device,
    )
    markdown = Path(report["files"]["markdown"]).read_text()
    if args.json:
        print(markdown, file=sys.stderr)
        print(json.dumps(report, indent=1))
    else:
        print(markdown)
    return 1 if report["failed"] else 0
