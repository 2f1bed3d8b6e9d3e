#!/usr/bin/env bash
# GPU checks that need no default model (docs/gpu.md): the machine, the GPU test set, NF4 against
# bitsandbytes' CUDA kernels, and LoRA / DoRA / QLoRA against PEFT (+ bitsandbytes) on a random-weight
# 1B Llama at 8 x 2k tokens. Each part runs whatever happened to the one before; results in $OUT.
set -u
source docs/gpu/device_setup.sh
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, bitsandbytes, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name(0))"
  lscpu | grep -E "Model name|^CPU\(s\)"
} 2>&1 | tee "$OUT/machine.txt"
echo "== GPU tests"; date +%T
timeout 200 python3 -m pytest -q -ra -m gpu tests/gpu -p no:cacheprovider -o addopts="--import-mode=importlib" -s > "$OUT/gpu_tests.txt" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt"
echo "== quant"; date +%T
timeout 120 python3 -m lorakit bench --suite quant --device cuda --threads 8 --rounds 1 --steps 20 --warmup 5 \
  --cases nf4 bnb_nf4 nf4_matmul bnb_nf4_matmul --out /tmp/bq > /dev/null 2> "$OUT/quant.err"
cp /tmp/bq/latest.json "$OUT/quant.json" 2>/dev/null; tail -3 "$OUT/quant.err"
echo "== random-1b"; date +%T
timeout 300 python3 -m lorakit bench --suite train --device cuda --threads 8 --model random-1b --rounds 1 \
  --steps 10 --warmup 3 --cases lora_8x2k_bf16 peft_lora_8x2k_bf16 dora_8x2k_bf16 peft_dora_8x2k_bf16 \
  qlora_8x2k_bf16 peft_qlora_8x2k_bf16 --out /tmp/b1 > /dev/null 2> "$OUT/b1.err"
cp /tmp/b1/latest.json "$OUT/b1.json" 2>/dev/null; tail -8 "$OUT/b1.err"
date +%T
