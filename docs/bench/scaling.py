"""Issue 26's scaling study: lorakit's LoRA training step against PEFT's as the work grows.

    python docs/bench/scaling.py run [--dtype fp32] [--avx2] [--rounds 2] [--steps 2] [--skip-1b]
    python docs/bench/scaling.py plot

`run` calls `lorakit bench --suite train` (each case in its own process, rounds in alternating
order) for
- sequence length: one row of 256 ... 4,096 tokens on the default model (SmolLM2-135M),
  cases `lora_seq{N}_{dtype}` / `peft_lora_seq{N}_{dtype}`;
- model size: the 4 x 256 batch (`lora_{dtype}` / `peft_lora_{dtype}`) on the default model and on
  random-weight Llamas of 362M (SmolLM2-360M's shape) and 1.07B parameters (TinyLlama-1.1B's
  layers, the default vocabulary), built from a config (`--model random-360m` / `random-1b`).
LoRA r16 on every linear layer in both libraries, the same adapter values; lorakit with its
chunked loss and prepared model, PEFT with `model(..., labels=...)`, as in every train case.
`--avx2` runs this AVX512 CPU as an AVX2-only one (ONEDNN_MAX_CPU_ISA=AVX2,
ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2; the reports name them).
Reports land in docs/bench/scaling/<dtype>[-avx2]/{seq,size-*}/latest.{json,md}; `plot` draws
docs/bench/scaling/scaling.png from whatever reports are there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent / "scaling"
LENGTHS = (256, 512, 1024, 2048, 4096)
MODELS = (("default", None, 135), ("random-360m", "random-360m", 362), ("random-1b", "random-1b", 1070))
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run(args: argparse.Namespace) -> None:
    if args.avx2:
        os.environ.update(AVX2)  # before torch is imported: the children inherit it too
    from lorakit.bench import run_bench

    top = HERE / (args.dtype + ("-avx2" if args.avx2 else ""))
    common = dict(suite="train", rounds=args.rounds, steps=args.steps, warmup=1, threads=args.threads)
    if not args.size_only:
        cases = [f"{p}lora_seq{n}_{args.dtype}" for n in LENGTHS for p in ("", "peft_")]
        run_bench(cases=cases, out_dir=top / "seq", **common)
    for label, model, _ in MODELS:
        if args.skip_1b and label == "random-1b":
            continue
        cases = [f"lora_{args.dtype}", f"peft_lora_{args.dtype}"]
        run_bench(cases=cases, model=model, out_dir=top / f"size-{label}", **common)


def _cases(report: Path) -> dict:
    return json.loads(report.read_text())["suites"]["train"]["cases"] if report.exists() else {}


def _draw(row, points: list, style: str, label: str) -> None:  # noqa: ANN001 (matplotlib axes)
    """One library's step time (left) and peak RSS (right) over (x, case) points."""
    if points:
        xs = [x for x, _ in points]
        row[0].plot(xs, [c["step"]["median_s"] for _, c in points], style, label=label)
        row[1].plot(xs, [c["peak_rss_mb"] / 1024 for _, c in points], style, label=label)


def plot(_: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(p.name for p in HERE.iterdir() if p.is_dir()) if HERE.exists() else []
    if not kinds:
        sys.exit(f"no reports under {HERE}: run `python {__file__} run` first")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for kind in kinds:
        seq = _cases(HERE / kind / "seq" / "latest.json")
        for library, prefix, style in (("lorakit", "", "-o"), ("PEFT", "peft_", "--s")):
            dtype = kind.split("-")[0]
            points = [(n, seq.get(f"{prefix}lora_seq{n}_{dtype}")) for n in LENGTHS]
            points = [(n, c) for n, c in points if c and "error" not in c]
            _draw(axes[0], points, style, f"{library} {kind}")
            sizes = []
            for label, _, millions in MODELS:
                case = _cases(HERE / kind / f"size-{label}" / "latest.json").get(f"{prefix}lora_{dtype}")
                if case and "error" not in case:
                    sizes.append((millions, case))
            _draw(axes[1], sizes, style, f"{library} {kind}")
    titles = (
        ("train step (s), one row of N tokens, SmolLM2-135M", "peak RSS (GiB), one row of N tokens"),
        ("train step (s), 4 x 256 tokens, by model size", "peak RSS (GiB), 4 x 256 tokens"),
    )
    for row, (ax_row, title_row) in enumerate(zip(axes, titles, strict=True)):
        for ax, title in zip(ax_row, title_row, strict=True):
            ax.set_title(title, fontsize=10)
            ax.set_xscale("log", base=2 if row == 0 else 10)
            ax.set_xlabel("tokens" if row == 0 else "parameters (millions)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("LoRA r16, all linear layers: lorakit vs PEFT (lorakit bench; docs/bench/scaling.py)")
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=110)
    print(HERE / "scaling.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    r.add_argument("--avx2", action="store_true", help="run this CPU as an AVX2-only one")
    r.add_argument("--rounds", type=int, default=2)
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--skip-1b", action="store_true")
    r.add_argument("--size-only", action="store_true")
    sub.add_parser("plot")
    args = parser.parse_args()
    {"run": run, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
