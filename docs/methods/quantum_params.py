"""The trainable-parameter table of docs/methods/quantum.md, counted on the default model.

.venv/bin/python docs/methods/quantum_params.py
"""

from __future__ import annotations

import lorakit as lk

SETTINGS = [
    ("LoRA r=1", lambda: lk.LoRAConfig(rank=1)),
    ("LoRA r=4", lambda: lk.LoRAConfig(rank=4)),
    ("LoRA r=16", lambda: lk.LoRAConfig(rank=16)),
    *(
        (
            f"Quantum-PEFT K={k} L={layers}",
            lambda k=k, layers=layers: lk.QuantumPEFTConfig(rank=k, layers=layers),
        )
        for k, layers in ((8, 1), (8, 2), (8, 4), (16, 2), (32, 2))
    ),
]


def main() -> None:
    counts = {}
    for name, make in SETTINGS:
        model, _ = lk.load_model()
        lk.apply(model, make())
        counts[name] = lk.trainable_parameters(model)[0]
    print(
        "| adapter (all 7 linear projections of 30 layers) | trainable parameters | / LoRA r=16 | / LoRA r=1 |"
    )
    print("|---|---|---|---|")
    for name, count in counts.items():
        print(
            f"| {name} | {count:,} | {count / counts['LoRA r=16']:.4f} | {count / counts['LoRA r=1']:.3f} |"
        )


if __name__ == "__main__":
    main()
