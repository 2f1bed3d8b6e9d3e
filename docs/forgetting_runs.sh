#!/usr/bin/env bash
# The runs behind docs/forgetting.md: LoRA on the default task with each mitigation, one run after
# the other on an otherwise idle machine (~9 min a run on 2 cores). Run from the repository root:
#   docs/forgetting_runs.sh [ARM ...]       # default: every arm, in the order below
# Each arm is its own folder under runs/forgetting (OUT=... to change); a finished arm is kept, an
# interrupted one is started again. docs/forgetting_table.py reads them. SRC=DIR runs lorakit from
# another checkout's src (a snapshot, so that editing this one does not change the later arms).
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
out=${OUT:-runs/forgetting}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
git -C "${SRC:-src}" rev-parse HEAD > "$out/commit.txt"
declare -A ARMS=(
  [default]=""
  [replay-0.25]="--replay chatterbot:0.25"
  [kl-1]="--kl-to-base 1"
  [replay-0.25-kl-1]="--replay chatterbot:0.25 --kl-to-base 1"
  [lr-3e-4]="--lr 3e-4"
  [steps-75]="--steps 75"
  [rank-4]="--rank 4 --alpha 8"
  [replay-0.5]="--replay chatterbot:0.5"
  [kl-4]="--kl-to-base 4"
  [loraplus]="--method loraplus"
  [full]="--method full"
  [lr-1e-4]="--lr 1e-4"
  [replay-0.125]="--replay chatterbot:0.125"
  [kl-0.25]="--kl-to-base 0.25"
  [default-seed1]="--seed 1"
  [replay-0.25-seed1]="--replay chatterbot:0.25 --seed 1"
)
ORDER=(default replay-0.25 kl-1 replay-0.25-kl-1 lr-3e-4 steps-75 rank-4 replay-0.5 kl-4 loraplus full lr-1e-4
  replay-0.125 kl-0.25 default-seed1 replay-0.25-seed1)
for arm in "${@:-${ORDER[@]}}"; do
  [ -n "${ARMS[$arm]+x}" ] || { echo "no arm $arm; arms: ${ORDER[*]}"; exit 2; }
  if [ -f "$out/$arm/metrics.json" ]; then echo "$arm: done before, kept"; continue; fi
  rm -rf "${out:?}/$arm"
  opts=${ARMS[$arm]}
  [[ $opts == *--replay* ]] || opts="--replay none $opts"  # replay became the default after this study
  # shellcheck disable=SC2086  # the options are words
  PYTHONPATH=${SRC:-src} /usr/bin/time -v .venv/bin/lorakit train --no-progress-bar --output-dir "$out/$arm" $opts \
    > "$out/$arm.log" 2> "$out/$arm.time"
  grep -E "held-out exact|perplexity|KL from|general questions" "$out/$arm.log" | sed "s/^/$arm: /" || true
done
