"""What writing a merged QLoRA model back into NF4 costs, measured on the default model.

    PYTHONPATH=src .venv/bin/python docs/methods/qlora_requantize.py --adapter ADAPTER_DIR

Three models, all from the same NF4 base (the default model's linear layers quantized as
`lorakit train --method qlora` does) and the same adapter:

- unmerged: NF4 base + the LoRA adapter (what was trained; the reference);
- merged: the adapter merged into the dequantized base, written in full precision (`lorakit merge`);
- requantized: that merged model quantized to NF4 again (what merging "in 4 bits" amounts to);
- nf4 base: the NF4 base without the adapter (where the fine-tuning is lost entirely).

Each is run on the default task's held-out answers (prompt + reference answer, teacher-forced),
computing in fp32 and under bf16 autocast. Printed per pair: max and mean |logit difference| over
every position of every answer token, next-token argmax agreement there, and the answer NLL.
Without --adapter, B is drawn at random (A ~ N(0, 1/in), B ~ N(0, 0.01^2), as `lorakit bench`).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import lorakit as lk
from lorakit.bench.build import _fill, _lorakit_pairs
from lorakit.bench.cases import ALPHA, RANK
from lorakit.options import RunConfig
from lorakit.quant.linear import quantize_model
from lorakit.run import api_load
from lorakit.run_data import build_data, read_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="a LoRA/QLoRA adapter folder (default: seeded random B)")
    parser.add_argument("--samples", type=int, default=64, help="held-out answers to score")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = RunConfig()
    model, tokenizer = api_load(cfg.model)
    _, data = build_data(cfg, tokenizer, read_data(cfg, 0))
    samples = data.answer_samples[: args.samples]

    quantize_model(model, compute_dtype=None)  # compute in the input's dtype: fp32, or autocast's
    if args.adapter:
        lk.load_adapter(model, args.adapter, trainable=False)
    else:
        lk.apply(model, lk.LoRAConfig(rank=RANK, alpha=ALPHA))
        _fill(_lorakit_pairs(model))  # the bench's seeded A and B
    merged = lk.merge_and_unload(copy.deepcopy(model))
    requantized = copy.deepcopy(merged)
    quantize_model(requantized, compute_dtype=None)
    nf4_base = lk.unload(copy.deepcopy(model))  # the NF4 base alone: what is left without the adapter

    report = {}
    for precision in ("fp32", "bf16"):
        ref = _outputs(model, samples, precision)
        report[precision] = {
            "nll": {"unmerged": ref["nll"]},
            "merged vs unmerged": None,
            "requantized vs unmerged": None,
            "nf4 base vs unmerged": None,
        }
        for name, other in (("merged", merged), ("requantized", requantized), ("nf4 base", nf4_base)):
            out = _outputs(other, samples, precision)
            report[precision]["nll"][name] = out["nll"]
            report[precision][f"{name} vs unmerged"] = _diff(ref, out)
    print(
        json.dumps(
            {"adapter": args.adapter or "random B (std 0.01)", "samples": len(samples), **report}, indent=1
        )
    )


@torch.no_grad()
def _outputs(model: torch.nn.Module, samples: list, precision: str) -> dict:
    """Logits at the positions that predict an answer token, and the answer NLL (nats/token)."""
    model.eval()
    logits, nll, count = [], 0.0, 0
    for sample in samples:
        ids = torch.tensor([sample.input_ids])
        labels = torch.tensor(sample.labels[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        logits.append(out[keep])
        nll += float(torch.nn.functional.cross_entropy(out[keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return {"logits": torch.cat(logits), "nll": nll / count}


def _diff(a: dict, b: dict) -> dict:
    d = (a["logits"] - b["logits"]).abs()
    agree = (a["logits"].argmax(-1) == b["logits"].argmax(-1)).float().mean()
    return {
        "logit_max_abs_diff": float(d.max()),
        "logit_mean_abs_diff": float(d.mean()),
        "argmax_agreement": float(agree),
        "positions": int(d.shape[0]),
    }


if __name__ == "__main__":
    main()
