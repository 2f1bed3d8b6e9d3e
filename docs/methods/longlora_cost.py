"""The cost table and plot of docs/methods/longlora.md from one `lorakit bench` run of LONG_TRAIN_CASES.

    .venv/bin/python docs/methods/longlora_cost.py runs/longlora-bench/latest.json [--plot docs/methods/longlora_cost.png]

Per N: s/step and peak RSS of SDPA, lorakit's kernel and S2-Attn, the S2/SDPA ratios, and the
a*N + b*N^2 fit of the SDPA times (what share of a step is attention)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench", type=Path)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    cases = json.loads(args.bench.read_text())["suites"]["train"]["cases"]
    lengths = sorted({int(name.rsplit("_", 1)[1]) for name in cases if name.startswith("lora_qkvo_")})

    def step(kind: str, n: int) -> float:
        return cases[f"lora_qkvo_{kind}_{n}"]["step"]["median_s"]

    def rss(kind: str, n: int) -> float:
        return cases[f"lora_qkvo_{kind}_{n}"]["step_peak_rss_mb"]

    # t(N) = a N + b N^2 through the shortest and longest SDPA points: b N^2 is attention's share
    n0, n1 = lengths[0], lengths[-1]
    b = (step("sdpa", n1) - step("sdpa", n0) * n1 / n0) / (n1 * n1 - n0 * n1)
    a = (step("sdpa", n0) - b * n0 * n0) / n0
    print(
        "| N | SDPA s/step | kernel s/step | S2 s/step | S2 / SDPA step | speed-up | S2 / SDPA peak RSS | SDPA peak RSS (MB) | attention share of the SDPA step (fit) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        ratio = step("s2", n) / step("sdpa", n)
        share = b * n * n / (a * n + b * n * n)
        print(
            f"| {n:,} | {step('sdpa', n):.2f} | {step('kernel', n):.2f} | {step('s2', n):.2f} | {ratio:.3f} | "
            f"{1 / ratio:.2f}x | {rss('s2', n) / rss('sdpa', n):.3f} | {rss('sdpa', n):,.0f} | {share:.0%} |"
        )
    print(
        f"\nfit through {n0:,} and {n1:,}: t(N) = {a * 1e3:.3f} ms x N + {b * 1e6:.4f} us x N^2 (N in tokens)"
    )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        for kind, label in (
            ("sdpa", "full attention, SDPA"),
            ("kernel", "full attention, lorakit kernel"),
            ("s2", "S2-Attn"),
        ):
            left.plot(lengths, [step(kind, n) for n in lengths], marker="o", label=label)
        left.set_xscale("log", base=2)
        left.set_yscale("log")
        left.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        left.set_xlabel("tokens per step (one row)")
        left.set_ylabel("s per training step")
        left.legend(fontsize=7)
        right.plot(
            lengths,
            [step("sdpa", n) / step("s2", n) for n in lengths],
            marker="o",
            label="S2 speed-up over SDPA",
        )
        right.plot(
            lengths, [rss("s2", n) / rss("sdpa", n) for n in lengths], marker="s", label="S2 / SDPA peak RSS"
        )
        right.axhline(1, color="grey", lw=0.8)
        right.set_xscale("log", base=2)
        right.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        right.set_xlabel("tokens per step (one row)")
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
