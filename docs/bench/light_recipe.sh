#!/bin/bash
# The runs behind the light recipe (lorakit/recipe.py, docs/benchmarks.md): shorter LoRA runs of the
# default task trained in fp32, each scored by `lorakit train`'s own evaluation. Quality only: run
# them one at a time (two at once on 2 cores slow each other several-fold). Timing: see the timed
# run in docs/benchmarks.md. OUT defaults to runs/light-recipe.
set -euo pipefail
OUT=${OUT:-runs/light-recipe}
mkdir -p "$OUT"
upper="model\.layers\.(1[5-9]|2[0-9])\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"  # layers 15-29 of 30
run() {
  name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && return
  rm -rf "${OUT:?}/$name"
  lorakit train --recipe standard --precision fp32 --no-progress-bar --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
run upper15_150 --target-modules "$upper"                       # backward stops at layer 15
run all_100_2e3 --steps 100 --lr 2e-3 --micro-batch-size 16     # the light recipe (micro-batch: same gradients)
run all_100_15e3 --steps 100 --lr 1.5e-3 --micro-batch-size 16
run all_80_2e3 --steps 80 --lr 2e-3 --micro-batch-size 16
# 2026-12-04: two shorter candidates (70 steps), each with the AVX2 cap a real AVX2-only CPU has:
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 bash docs/bench/light_recipe.sh
run all_70_3e3 --steps 70 --lr 3e-3
run all_70_2e3_loraplus16 --steps 70 --lr 2e-3 --loraplus-ratio 16
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| run | exact match | answer NLL | general ppl | KL | general questions |")
print("|---|---|---|---|---|---|")
for m in sorted(Path(sys.argv[1]).glob("*/metrics.json")):
    a = json.loads(m.read_text())["after"]
    print(f"| {m.parent.name} | {a['exact_match']:.1%} | {a['answer_nll']:.3f} | {a['general_ppl']:.2f} | "
          f"{a['kl_from_base']:.3f} | {a['general_qa']:.1%} |")
PY
