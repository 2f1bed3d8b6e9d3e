#!/usr/bin/env bash
# The real model of docs/methods/longlora.md (issue 18, item 3): SmolLM2-135M-Instruct extended from its
# 8,192-token window to CONTEXT (default 16,384) with LongLoRA on Wikipedia rows of CONTEXT tokens, on an
# otherwise idle machine; perplexity and passkey before and after at 4k, 8k and CONTEXT tokens.
# From the repository root:   docs/methods/longlora_smollm2.sh        (STEPS=..., CONTEXT=..., OUT=...)
# SRC=DIR runs lorakit from another checkout's src (a snapshot), so the tree can change meanwhile.
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
out=${OUT:-runs/longlora-smollm2}
context=${CONTEXT:-16384}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
git -C "${SRC:-src}" rev-parse HEAD > "$out/commit.txt"
PYTHONPATH=${SRC:-src} /usr/bin/time -v .venv/bin/lorakit train --method longlora --context "$context" \
  --steps "${STEPS:-40}" --long-eval-lengths "4096,8192,$context" --long-eval-tokens "$context" \
  --passkey-per-depth 1 --no-progress-bar --output-dir "$out/run" ${RESUME:+--resume} \
  > "$out/run.log" 2> "$out/run.time"
tail -n 20 "$out/run.log"
