#!/usr/bin/env bash
# The extension study of docs/methods/longlora.md (issue 18, item 2), one run after the other on an
# otherwise idle machine. From the repository root:   docs/methods/longlora_runs.sh [ARM ...]
# A toy Llama pretrained at a 256-token window (docs/methods/longlora_toy.py) is extended 4x to 1,024
# with linear position interpolation under each arm; every arm is one `lorakit train` with the same
# steps, rows, learning rate and seed, scored with full attention at 256, 512 and 1,024 tokens on the
# held-out articles. Each arm is its own folder under runs/longlora-toy (OUT=... to change); a finished
# arm is kept. SRC=DIR runs lorakit from another checkout's src. docs/methods/longlora_table.py reads them.
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
out=${OUT:-runs/longlora-toy}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
git -C "${SRC:-src}" rev-parse HEAD > "$out/commit.txt"
py() { PYTHONPATH=${SRC:-src} .venv/bin/python "$@"; }
[ -f "$out/pretrain.json" ] || py docs/methods/longlora_toy.py "$out" > "$out/pretrain.log" 2>&1
common=(--task wiki --steps 300 --batch-size 4 --micro-batch-size 4 --lr 1e-3 --seed 0
        --passkey-per-depth 0 --long-eval-lengths 256,512,1024 --long-eval-tokens 16384 --no-progress-bar)
declare -A ARMS=(
  [dense-lora]="--model $out/toy-256 --method longlora --context 1024 --s2-ratio 0 --modules-to-save none"
  [dense-lora-embed-norm]="--model $out/toy-256 --method longlora --context 1024 --s2-ratio 0"
  [s2-lora]="--model $out/toy-256 --method longlora --context 1024 --modules-to-save none"
  [s2-lora-embed-norm]="--model $out/toy-256 --method longlora --context 1024"
  [full-dense]="--model $out/toy-256-pi4 --method full --max-length 1024"
  [s2-half-lora-embed-norm]="--model $out/toy-256 --method longlora --context 1024 --s2-ratio 0.5"
)
ORDER=(s2-lora-embed-norm dense-lora-embed-norm s2-lora dense-lora full-dense s2-half-lora-embed-norm)
for arm in "${@:-${ORDER[@]}}"; do
  [ -n "${ARMS[$arm]+x}" ] || { echo "no arm $arm; arms: ${ORDER[*]}"; exit 2; }
  if [ -f "$out/$arm/metrics.json" ]; then echo "$arm: done before, kept"; continue; fi
  rm -rf "${out:?}/$arm"
  # shellcheck disable=SC2086  # the options are words
  PYTHONPATH=${SRC:-src} /usr/bin/time -v .venv/bin/lorakit train --output-dir "$out/$arm" "${common[@]}" \
    ${ARMS[$arm]} > "$out/$arm.log" 2> "$out/$arm.time"
  grep -E "perplexity at|past the original" "$out/$arm.log" | sed "s/^/$arm: /" || true
done
