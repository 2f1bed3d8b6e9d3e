"""How large each adapter's weight change is, per module: ||dW||_F / ||W||_F, from the adapter
folders of docs/methods/quantum_runs.sh (run from the repository root, after the runs).

    .venv/bin/python docs/methods/quantum_norms.py runs/quantum-study/lora-r1 runs/quantum-study/quantum-k8-l2-lr1e-1
"""

from __future__ import annotations

import statistics
import sys

import torch

import lorakit as lk
from lorakit.core.model import adapter_deltas
from lorakit.run import api_load

torch.set_num_threads(1)
model, _ = api_load(None)
print("| run | mean ||dW||_F / ||W||_F | max | total ||dW||_F |")
print("|---|---|---|---|")
for i, run in enumerate(sys.argv[1:]):
    name = f"a{i}"
    lk.load_adapter(model, f"{run}/adapter", adapter_name=name, trainable=False)
    ratios, total = [], 0.0
    with torch.no_grad():
        for _, layer, delta in adapter_deltas(model, name):
            w = layer.weight_out_in().double()
            dw = delta.merged_weight(w.float()).double() - w
            ratios.append(float(dw.norm() / w.norm()))
            total += float(dw.norm()) ** 2
    print(f"| {run} | {statistics.mean(ratios):.4f} | {max(ratios):.4f} | {total**0.5:.2f} |")
    lk.delete_adapter(model, name)
