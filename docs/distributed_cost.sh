#!/usr/bin/env bash
# The cost of 2 processes (DDP, and FSDP2 with --fsdp) against 1 on the default model and task
# (docs/distributed.md): the same
# global batch (16, micro-batches of 4) and steps, training only (--skip-eval), on an otherwise idle
# machine. 2 processes on 2 cores get 1 thread each. From the repository root:
#   docs/distributed_cost.sh            (STEPS=20, OUT=runs/distributed-cost; SRC=DIR: another checkout's src)
set -euo pipefail
out=${OUT:-runs/distributed-cost}
steps=${STEPS:-20}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
git -C "${SRC:-src}" rev-parse HEAD > "$out/commit.txt"
common=(train --steps "$steps" --batch-size 16 --micro-batch-size 4 --skip-eval --replay none --no-progress-bar)
rm -rf "$out/one" "$out/two" "$out/fsdp"
PYTHONPATH=${SRC:-src} OMP_NUM_THREADS=2 /usr/bin/time -v .venv/bin/lorakit "${common[@]}" --output-dir "$out/one" \
  > "$out/one.log" 2> "$out/one.time"
PYTHONPATH=${SRC:-src} OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/torchrun --standalone --nproc-per-node 2 \
  -m lorakit "${common[@]}" --output-dir "$out/two" > "$out/two.log" 2> "$out/two.time"
PYTHONPATH=${SRC:-src} OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/torchrun --standalone --nproc-per-node 2 \
  -m lorakit "${common[@]}" --fsdp --output-dir "$out/fsdp" > "$out/fsdp.log" 2> "$out/fsdp.time"
for run in one two fsdp; do
  python3 - "$out/$run" <<'PY'
import json, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))["train"]
print(sys.argv[1], f"{m['train_seconds'] / m['steps']:.2f} s/step", f"{m['tokens_per_s']:.0f} tokens/s", f"final loss {m['final_loss']:.4f}")
PY
  grep "Maximum resident" "$out/$run.time"  # of the largest process (torchrun: one worker)
done
