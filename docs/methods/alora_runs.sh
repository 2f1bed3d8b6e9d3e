#!/usr/bin/env bash
# The figures of docs/methods/alora.md, in the order they were measured (one after the other, on an
# otherwise idle machine; about 30 min on 2 cores). Run from the repository root after `make install`.
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
out=${1:-runs/alora-study}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
# 1. the 50-turn benchmark: five arms, default model, fp32, 2 threads
.venv/bin/lorakit bench --suite alora --turns 50 --threads 2 --out "$out/bench" | tee "$out/bench.md"
# 2. quality: aLoRA and LoRA with the default run's data, steps, batch and seed
.venv/bin/lorakit train --method alora --output-dir "$out/alora" --no-progress-bar | tee "$out/alora.log"
.venv/bin/lorakit train --method lora --output-dir "$out/lora" --no-progress-bar | tee "$out/lora.log"
