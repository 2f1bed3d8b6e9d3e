"""Benchmarks of lorakit against Hugging Face PEFT, measured in the same run.

    from lorakit.bench import run_bench
    report = run_bench(suite="infer", vs_peft=True)   # JSON + Markdown in ./bench-results

Every case runs in its own process (peak RSS per case); ratios are computed only between cases
of one invocation. The CLI calls `add_arguments(parser)` and `main(args)`.
"""

from __future__ import annotations

from .command import add_arguments, main
from .runner import run_bench

__all__ = ["add_arguments", "main", "run_bench"]
