#!/usr/bin/env bash
# The runs behind docs/vocabulary.md, one after the other on an otherwise idle machine. From the
# repository root:   docs/vocabulary_runs.sh [ARM ...]     (default: every arm below)
# Data: docs/vocabulary_data.py writes runs/vocabulary/data; the token lists come from `lorakit vocab`
# (below). Each arm is its own folder under runs/vocabulary (OUT=... to change); a finished arm is
# kept. SRC=DIR runs lorakit from another checkout's src (a snapshot). docs/vocabulary_table.py reads them.
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
out=${OUT:-runs/vocabulary}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
git -C "${SRC:-src}" rev-parse HEAD > "$out/commit.txt"
run() { PYTHONPATH=${SRC:-src} .venv/bin/lorakit "$@"; }
[ -f "$out/data/zh.jsonl" ] || PYTHONPATH=${SRC:-src} .venv/bin/python docs/vocabulary_data.py "$out/data"
[ -f "$out/zh-tokens.txt" ] || run vocab --data "$out/data/zh.jsonl" --max-new 2000 --min-count 3 \
  --sizes 100,500,2000 --show 25 --out "$out/zh-tokens.txt" > "$out/zh-vocab.txt"
head -n 500 "$out/zh-tokens.txt" > "$out/zh-tokens-500.txt"
declare -A ARMS=(
  [icd-base]=""
  [icd-auto500]="--add-tokens auto --vocab-max-new 500 --vocab-min-count 3"
  [zh-base]="--task chatterbot-zh"
  [zh-500-mean]="--task chatterbot-zh --add-tokens $out/zh-tokens-500.txt --token-init mean"
  [zh-500-random]="--task chatterbot-zh --add-tokens $out/zh-tokens-500.txt --token-init random"
  [zh-500-average]="--task chatterbot-zh --add-tokens $out/zh-tokens-500.txt --token-init average"
)
ORDER=(icd-base icd-auto500 zh-base zh-500-mean zh-500-random zh-500-average)
for arm in "${@:-${ORDER[@]}}"; do
  [ -n "${ARMS[$arm]+x}" ] || { echo "no arm $arm; arms: ${ORDER[*]}"; exit 2; }
  if [ -f "$out/$arm/metrics.json" ]; then echo "$arm: done before, kept"; continue; fi
  rm -rf "${out:?}/$arm"
  # shellcheck disable=SC2086  # the options are words
  PYTHONPATH=${SRC:-src} /usr/bin/time -v .venv/bin/lorakit train --no-progress-bar --output-dir "$out/$arm" \
    ${ARMS[$arm]} > "$out/$arm.log" 2> "$out/$arm.time"
  grep -E "vocabulary:|held-out exact|perplexity|KL from|general questions" "$out/$arm.log" | sed "s/^/$arm: /" || true
done
