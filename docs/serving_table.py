"""The table of docs/export.md: `lorakit check`'s verdict on an adapter of every method, each built
with the method's defaults (as `lorakit train --method NAME` would) on the tiny test model and saved.

    .venv/bin/python docs/serving_table.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lorakit as lk
from lorakit.methods import METHODS
from lorakit.models import tiny_gpt2, tiny_llama
from lorakit.serving import check_folder

EXTRA = {  # what the command line would fill in from the tokenizer or other options
    "alora": {"invocation_tokens": [257, 97]},
    "quantum": {"rank": 2, "layers": 1},
}
VARIANTS = {  # LoRA options that change the verdict
    "lora (rsLoRA)": ("lora", {"use_rslora": True}),
    "lora (r=64)": ("lora", {"rank": 64}),
    "lora (alpha_pattern)": ("lora", {"alpha_pattern": {"v_proj": 8}}),
}


def main() -> None:
    rows = []
    cases = {name: (name, EXTRA.get(name, {})) for name in METHODS} | VARIANTS
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, options) in cases.items():
            model = tiny_gpt2() if name == "bitfit" else tiny_llama()  # Llama has no biases
            lk.apply(model, METHODS[name](**options))
            folder = lk.save_adapter(model, Path(tmp) / label.replace(" ", "_"))[0]
            _, verdicts = check_folder(folder)
            cells = []
            for v in verdicts:
                what = "; ".join(
                    dict.fromkeys(w for a, w, _ in v.findings if a == v.answer and w != "format")
                )
                note = " (note: NF4 base)" if v.notes else ""
                cells.append(v.answer + (f" ({what})" if what and v.answer != "yes" else "") + note)
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    print("| method | vLLM | SGLang | llama.cpp | Ollama |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
