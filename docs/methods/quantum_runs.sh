#!/usr/bin/env bash
# The figures of docs/methods/quantum.md, one run after the other on an otherwise idle machine
# (about 50 min on a 2-core Xeon). Run from the repository root after `make install`:
#   docs/methods/quantum_runs.sh sweep            # then, with the learning rate it picked:
#   docs/methods/quantum_runs.sh main 2e-2
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
stage=$1
out=${OUT:-runs/quantum-study}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
run() {  # name, then lorakit train options; peak RSS of the whole run from /usr/bin/time
  local name=$1; shift
  /usr/bin/time -v .venv/bin/lorakit train --no-progress-bar --output-dir "$out/$name" "$@" \
    > "$out/$name.log" 2> "$out/$name.time"
  grep -E "held-out exact|answer NLL|perplexity|KL from" "$out/$name.log" | sed "s/^/$name: /" || true
}
if [ "$stage" = sweep ]; then
  .venv/bin/python docs/methods/quantum_params.py | tee "$out/params.md"
  # a short learning-rate sweep for Quantum-PEFT (K=8, L=2): 40 steps, held-out answer NLL at the end
  for lr in 5e-3 3e-2; do
    run "sweep-lr$lr" --method quantum --lr "$lr" --steps 40 --eval-every 40 --skip-eval
    grep -o '"eval_answer_nll": [0-9.]*' "$out/sweep-lr$lr/log.jsonl" | tail -1 | sed "s/^/lr $lr: /"  || true
  done
  exit 0
fi
# the default task, default steps and data: two Quantum-PEFT settings and LoRA r=1 (LoRA r=16 is
# the default run: docs/methods/alora_runs.sh made it on the same machine)
lr=$2
run quantum-k8-l2 --method quantum --rank 8 --circuit-layers 2 --lr "$lr"
run quantum-k16-l2 --method quantum --rank 16 --circuit-layers 2 --lr "$lr"
run lora-r1 --method lora --rank 1 --alpha 2
