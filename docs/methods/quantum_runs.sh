#!/usr/bin/env bash
# The figures of docs/methods/quantum.md, one stage after the other on an otherwise idle machine.
# Run from the repository root after `make install`:
#   docs/methods/quantum_runs.sh bench                 # step time and peak memory (~15 min)
#   docs/methods/quantum_runs.sh sweep 5e-3 3e-2       # 40-step learning-rate sweep (~5 min a rate)
#   docs/methods/quantum_runs.sh main 3e-2             # full runs at the chosen rate (~15 min each)
#   docs/methods/quantum_runs.sh single 3e-1           # K=8 L=2 alone at another rate
#   docs/methods/quantum_runs.sh seeds 3e-2            # seeds 1 and 2 of K=8 L=2 and LoRA r=1
set -euo pipefail
export OMP_WAIT_POLICY=ACTIVE
stage=$1
shift
out=${OUT:-runs/quantum-study}
mkdir -p "$out"
lscpu | grep -E "Model name|Flags" > "$out/cpu.txt"
run() {  # name, then lorakit train options; peak RSS of the whole run from /usr/bin/time
  local name=$1; shift
  if [ -f "$out/$name/metrics.json" ]; then echo "$name: done before, kept"; return; fi
  rm -rf "${out:?}/$name"  # an interrupted run of this script: start it again
  /usr/bin/time -v .venv/bin/lorakit train --no-progress-bar --output-dir "$out/$name" "$@" \
    > "$out/$name.log" 2> "$out/$name.time"
  grep -E "held-out exact|answer NLL|perplexity|KL from" "$out/$name.log" | sed "s/^/$name: /" || true
}
case "$stage" in
bench)  # one AdamW step of 4 x 256 tokens, bf16, each case in its own process, 3 rounds
  cases=$(.venv/bin/python -c "from lorakit.bench.cases import QUANTUM_TRAIN_CASES as c; print(','.join(c))")
  .venv/bin/lorakit bench --suite train --cases "$cases" --threads 2 --out "$out/bench" | tee "$out/bench.md"
  ;;
sweep)  # Quantum-PEFT (K=8, L=2): 40 steps, held-out answer NLL at the end
  .venv/bin/python docs/methods/quantum_params.py | tee "$out/params.md"
  for lr in "$@"; do
    run "sweep-lr$lr" --method quantum --lr "$lr" --steps 40 --eval-every 40 --skip-eval
    grep -o '"eval_answer_nll": [0-9.]*' "$out/sweep-lr$lr/log.jsonl" | tail -1 | sed "s/^/lr $lr: /" || true
  done
  ;;
main)  # the default task, steps and data; LoRA r=16 is the default run (docs/methods/alora_runs.sh)
  lr=$1
  run "quantum-k8-l2-lr$lr" --method quantum --rank 8 --circuit-layers 2 --lr "$lr"
  run lora-r1 --method lora --rank 1 --alpha 2
  run "quantum-k16-l2-lr$lr" --method quantum --rank 16 --circuit-layers 2 --lr "$lr"
  run "quantum-k8-l4-lr$lr" --method quantum --rank 8 --circuit-layers 4 --lr "$lr"
  ;;
single)  # K=8, L=2 alone at another rate
  lr=$1
  run "quantum-k8-l2-lr$lr" --method quantum --rank 8 --circuit-layers 2 --lr "$lr"
  ;;
seeds)  # --seed sets the data order and each adapter's init
  lr=$1
  for seed in 1 2; do
    run "quantum-k8-l2-lr$lr-seed$seed" --method quantum --rank 8 --circuit-layers 2 --lr "$lr" --seed "$seed"
    run "lora-r1-seed$seed" --method lora --rank 1 --alpha 2 --seed "$seed"
  done
  ;;
*) echo "usage: $0 bench | sweep LR... | main LR | single LR | seeds LR" >&2; exit 2 ;;
esac
