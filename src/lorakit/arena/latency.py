"""Decoding latency of a trained run, unmerged and merged (a child process of the arena).

    python -m lorakit.arena.latency --out FILE [--adapter FOLDER] [--model M] [--tokens N]

Greedy decoding of exactly N new tokens, batch 1, after a one-sentence chat prompt; the median of 3
timed generations after 1 warm-up, in ms per new token. With an adapter: first as loaded
(unmerged), then merged into the base when the method can be merged (`merged` is null with the
reason otherwise: bottleneck adapters, prompt and prefix tuning, aLoRA; and methods that changed
the weights in place have nothing to merge). Without one: the base model, the arena's reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lorakit.bench.infer import _prompt
from lorakit.bench.timing import measure
from lorakit.core.io import atomic_write_json

WARMUP, REPEATS = 1, 3


def ms_per_token(model: Any, tokenizer: Any, tokens: int) -> dict[str, Any]:
    prompt = _prompt(tokenizer)

    def generate() -> None:
        model.generate(**prompt, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    model.eval()
    with torch.inference_mode():
        timing = measure(generate, WARMUP, REPEATS)
    return {"ms_per_token": 1000 * timing["median_s"] / tokens, "samples_s": timing["samples_s"]}


def measure_run(model_path: str | None, adapter: str | None, tokens: int) -> dict[str, Any]:
    from lorakit import api
    from lorakit.core.contract import NotMergeableError
    from lorakit.core.model import merge_and_unload
    from lorakit.run import api_load

    model, tokenizer = api_load(model_path)
    result: dict[str, Any] = {"tokens": tokens, "threads": torch.get_num_threads()}
    if adapter is None:
        result["base"] = ms_per_token(model, tokenizer, tokens)
        return result
    tokenizer, _ = api.load_as_trained(model, tokenizer, adapter)
    result["unmerged"] = ms_per_token(model, tokenizer, tokens)
    if not api.adapter_names(model):
        result["merged"], result["merged_note"] = None, "weights changed in place: nothing to merge"
        return result
    try:
        model = merge_and_unload(model)
    except NotMergeableError as err:
        result["merged"], result["merged_note"] = None, f"cannot merge: {err}"
        return result
    result["merged"] = ms_per_token(model, tokenizer, tokens)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorakit.arena.latency")
    parser.add_argument("--out", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    atomic_write_json(Path(args.out), measure_run(args.model, args.adapter, args.tokens))


if __name__ == "__main__":
    main()
