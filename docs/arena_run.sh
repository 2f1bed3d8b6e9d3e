#!/usr/bin/env bash
# The full default arena behind docs/arena.md and docs/choosing.md: every arm x 3 seeds on the
# default task, then the selection table (docs/choosing_table.py). Run it on an otherwise idle
# machine (step times and latencies are measured). From the repository root:
#   docs/arena_run.sh                 (OUT=arena; SRC=DIR: another checkout's src, e.g. a snapshot)
set -euo pipefail
out=${OUT:-arena}
lscpu | grep -E "Model name|Flags" > /dev/stderr
PYTHONPATH=${SRC:-src} /usr/bin/time -v .venv/bin/python -m lorakit arena --out "$out" "$@"
PYTHONPATH=${SRC:-src} .venv/bin/python docs/choosing_table.py "$out" > "$out/choosing_table.md"
cat "$out/choosing_table.md"
