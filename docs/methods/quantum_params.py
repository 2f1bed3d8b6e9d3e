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
        (f"Quantum-PEFT K={k} L={layers}", lambda k=k, layers=layers: lk.QuantumPEFTConfig(rank=k, layers=layers))
        for k, layers in ((8, 1), (8, 2), (8, 4), (16, 2), (32, 2))
    ),
]


def main() -> None:
    print("| adapter (all 7 linear projections of 30 layers) | trainable parameters | vs LoRA r=16 |")
    print("|---|---|---|")
    lora16 = None
    for name, make in SETTINGS:
        model, _ = lk.load_model()
        lk.apply(model, make())
        trainable, _ = lk.trainable_parameters(model)
        lora16 = trainable if name == "LoRA r=16" else lora16
        ratio = f"{trainable / lora16:.4f}" if lora16 else "-"
        print(f"| {name} | {trainable:,} | {ratio} |")


if __name__ == "__main__":
    main()
