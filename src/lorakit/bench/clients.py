"""The round trip through llama.cpp itself (llama-cpp-python): an adapter exported with `lorakit
export --format gguf`, and the merged model as one GGUF, served by llama.cpp on the default task's
held-out prompts, against lorakit's own merged model.

    python -m lorakit.bench.clients --adapter runs/lorakit/adapter --out runs/clients [--prompts 50]

For each llama.cpp configuration — the base alone (the control: how far llama.cpp's own numerics,
e.g. its 8-bit activations in Q4_1 matmuls, move the greedy tokens with no adapter at all), the
Q4_1 base with the adapter GGUF, and the merged GGUF in f32 / f16 / q8_0 — against lorakit (fp32,
same weights dequantized): prompts whose greedy answers are identical, tokens that agree before the
first difference, the largest difference of the first answer token's logits, exact-match scores,
and llama.cpp's decoding speed. Needs `llama-cpp-python` (`make test-clients` builds it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MERGED_TYPES = ("f32", "f16", "q8_0")
SPEED_TOKENS, SPEED_PROMPTS = 64, 3  # decoding speed: this many tokens, no stop, on the first prompts


def llama_greedy(
    llm: Any, prompt: list[int], max_new: int, stops: set[int]
) -> tuple[list[int], np.ndarray, float]:
    """Greedy tokens from llama.cpp, the logits of the first answer token, and the seconds spent
    on the tokens after the first (decoding)."""
    import llama_cpp

    def last_logits() -> np.ndarray:  # the batch's last row (llama.cpp computes only that one here)
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)

    llm.reset()
    llm.eval(prompt)
    first = last_logits()
    out: list[int] = []
    logits = first
    started = None
    while len(out) < max_new:
        token = int(np.argmax(logits))
        if token in stops:
            break
        out.append(token)
        if started is None:
            started = time.perf_counter()
        llm.eval([token])
        logits = last_logits()
    seconds = time.perf_counter() - started if started is not None else 0.0
    return out, first, seconds


def open_llama(kwargs: dict[str, Any], threads: int) -> Any:
    """A llama_cpp.Llama without llama.cpp's weight repacking (its --no-repack): with it,
    llama-cpp-python 0.3.36 built for an AMX Xeon segfaults on Q4_1 batches of more than one token
    (seen here, docs/export.md). Llama() takes no such option, so its default is swapped for the call."""
    import llama_cpp
    import llama_cpp.llama as module

    default = llama_cpp.llama_model_default_params

    def no_repack() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(**kwargs, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        module.llama_cpp.llama_model_default_params = default


def lorakit_greedy(
    model: Any, prompt: list[int], max_new: int, stops: set[int]
) -> tuple[list[int], np.ndarray]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        first = model(ids).logits[0, -1].double().numpy()
        generated = model.generate(
            ids, max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stops), pad_token_id=min(stops)
        )[0, len(prompt) :].tolist()
    out = []
    for token in generated:
        if token in stops:
            break
        out.append(token)
    return out, first


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    prefix, total = 0, 0
    for a, b in zip(ours, theirs, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
        total += max(len(a), len(b))
    return {"identical_answers": same, "prompts": len(ours), "tokens_agreeing": prefix, "tokens": total}


def roundtrip(
    adapter: str, out: str | Path, prompts: int = 50, max_new_tokens: int = 24, threads: int = 2
) -> dict[str, Any]:
    from .. import api
    from ..api import load_as_trained
    from ..data.tasks import load_task, score_exact_match
    from ..export_gguf import export_gguf_adapter, export_merged_gguf
    from ..models import _default_gguf, load_model
    from ..train.evaluate import chat_prompt_ids
    from .report import machine_info

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_gguf = _default_gguf()
    model, tokenizer = load_model()
    items = load_task().eval[:prompts]
    ids = [chat_prompt_ids(tokenizer, item.messages) for item in items]
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    torch.set_num_threads(threads)

    def score(answers: list[list[int]]) -> float:
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        hits = [score_exact_match(t, item.reference) for t, item in zip(texts, items, strict=True)]
        return sum(hits) / len(hits)

    base_ours = [lorakit_greedy(model, p, max_new_tokens, stops) for p in ids]
    # the base in f32 too: llama.cpp's 8-bit activations of Q4_1 matmuls blur a small adapter's
    # effect (~0.6 in the logits); on an f32 base only the adapter's own serving is compared
    export_merged_gguf(model, base_gguf, out / "base-f32.gguf", "f32")
    load_as_trained(model, tokenizer, adapter)
    export_gguf_adapter(adapter, out / "adapter.gguf", model.config, "f32")
    plain = api.merge_and_unload(model).eval()
    ours = [lorakit_greedy(plain, p, max_new_tokens, stops) for p in ids]
    for kind in MERGED_TYPES:
        export_merged_gguf(plain, base_gguf, out / f"merged-{kind}.gguf", kind)
    runs = {
        "Q4_1 base (no adapter)": (dict(model_path=str(base_gguf)), base_ours),
        "Q4_1 base + adapter GGUF": (
            dict(model_path=str(base_gguf), lora_path=str(out / "adapter.gguf")),
            ours,
        ),
        "f32 base (no adapter)": (dict(model_path=str(out / "base-f32.gguf")), base_ours),
        "f32 base + adapter GGUF": (
            dict(model_path=str(out / "base-f32.gguf"), lora_path=str(out / "adapter.gguf")),
            ours,
        ),
        **{f"merged GGUF {k}": (dict(model_path=str(out / f"merged-{k}.gguf")), ours) for k in MERGED_TYPES},
    }
    results: dict[str, Any] = {
        "adapter": str(adapter),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "machine": machine_info(threads),
        "max_new_tokens": max_new_tokens,
        "lorakit_exact_match": {
            "base": score([a for a, _ in base_ours]),
            "merged": score([a for a, _ in ours]),
        },
        "runs": {},
    }
    firsts: dict[str, list[np.ndarray]] = {}
    for name, (kwargs, reference) in runs.items():
        llm = open_llama(kwargs, threads)
        answers, diffs, firsts[name] = [], [], []
        for prompt, (_, first_ours) in zip(ids, reference, strict=True):
            answer, first, _ = llama_greedy(llm, prompt, max_new_tokens, stops)
            answers.append(answer)
            firsts[name].append(first)
            diffs.append(float(np.abs(first - first_ours).max()))
        timed = [llama_greedy(llm, p, SPEED_TOKENS, set())[2] for p in ids[:SPEED_PROMPTS]]
        del llm
        results["runs"][name] = {
            **_agreement([a for a, _ in reference], answers),
            "first_token_logits_max_abs_diff": {"mean": float(np.mean(diffs)), "max": float(np.max(diffs))},
            "exact_match": score(answers),
            "decode_tokens_per_s": (SPEED_TOKENS - 1) * len(timed) / sum(timed),
        }
    # The adapter's own effect on the first answer token's logits, as llama.cpp and lorakit compute
    # it (each against its own base): a wrong scale or row order shows here at any base precision.
    mine = [a[1] - b[1] for a, b in zip(ours, base_ours, strict=True)]
    results["adapter_effect_relative_error"] = {}
    for base in ("Q4_1", "f32"):
        adapted, alone = (
            firsts[f"{base} base + adapter GGUF"],
            firsts[f"{base} base (no adapter)"],
        )
        errors = [
            np.linalg.norm((a - b) - m) / np.linalg.norm(m)
            for a, b, m in zip(adapted, alone, mine, strict=True)
        ]
        results["adapter_effect_relative_error"][base] = {
            "mean": float(np.mean(errors)),
            "max": float(np.max(errors)),
        }
    (out / "clients.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorakit.bench.clients", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    results = roundtrip(args.adapter, args.out, args.prompts, args.max_new_tokens, args.threads)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
