"""Scoring a model for a run: the task (exact match, answer NLL) and forgetting (general-text NLL,
next-token KL from the base), merged where the method allows, the base model's scores cached."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api
from .core.contract import NotMergeableError
from .core.io import atomic_write_json
from .data import collate, score_exact_match
from .data.general import answer_contains
from .options import RunConfig
from .run_data import EvalData
from .train import evaluate as ev
from .train.optim import autocast_dtype


def evaluate(
    model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig, reference: Any = None
) -> dict[str, Any]:
    """Task score and forgetting of `model` as it is now."""
    amp = eval_autocast(model)
    started = time.perf_counter()
    out: dict[str, Any] = {}
    match: dict[str, Any] = {"examples": []}
    starts: dict[tuple[int, ...], list[int]] = {}
    if data.answer_samples:  # first: its pass over the references says how far greedy answers follow them
        nll = ev.answer_nll(
            model,
            data.answer_samples,
            collate,
            tokenizer.pad_token_id,
            autocast_dtype=amp,
            tokenizer=tokenizer,
            greedy_starts=True,
        )
        out.update(answer_nll=nll["nll"], answer_nll_per_char=nll["nll_per_char"])
        starts = nll["greedy_starts"]
    if data.items:  # none: --data without --eval-data and too few conversations to hold any out
        match = ev.exact_match(
            model,
            tokenizer,
            data.items,
            score_exact_match,
            max_new_tokens=cfg.eval_max_new_tokens,
            autocast_dtype=amp,
            starts=starts,
        )
        out.update(exact_match=match["accuracy"], correct=match["correct"], n=match["n"])
    general = ev.text_nll(model, tokenizer, data.texts, max_tokens=cfg.general_tokens, autocast_dtype=amp)
    out.update(general_nll=general["nll"], general_nll_per_char=general["nll_per_char"])
    bad = {k: v for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"evaluation gave {', '.join(f'{k}={v}' for k, v in bad.items())}: the model or adapter "
            "computes non-finite values (diverged weights, or an overflow under bf16 autocast)"
        )
    out["general_ppl"] = float(torch.tensor(out["general_nll"]).exp())
    if data.questions:
        qa = ev.exact_match(
            model, tokenizer, data.questions, answer_contains, n_examples=0,
            max_new_tokens=GENERAL_QA_TOKENS, autocast_dtype=amp,
        )  # fmt: skip
        out.update(general_qa=qa["accuracy"], general_qa_correct=qa["correct"], general_qa_n=qa["n"])
    if reference is not None:
        out["kl_from_base"] = ev.next_token_kl(model, tokenizer, data.prompts, reference, autocast_dtype=amp)
    out["examples"] = match["examples"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


GENERAL_QA_TOKENS = 32  # a sentence: the base model answers trivia in one
# The evaluation code's version, part of the base-evaluation cache key: raise it with any change
# that can move a figure, so no run reads a base score computed the old way. 2: greedy answers
# start from the answer-NLL pass's teacher-forced tokens (`answer_nll(greedy_starts=True)`).
EVAL_VERSION = 2


def eval_autocast(model: nn.Module) -> torch.dtype | None:
    """The evaluation dtype: bf16 autocast where the model's device runs it fast. The KL reference
    and the later KL must use the same one, so both come from here."""
    return autocast_dtype("auto", next(model.parameters()).device)


def evaluate_merged(
    model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig, reference: Any
) -> dict[str, Any]:
    """Evaluate with the adapter merged where the method allows it (generation at base speed);
    merging is exact to fp32 rounding, and the model is unmerged again afterwards."""
    try:
        api.merge(model)
    except NotMergeableError:
        return evaluate(model, tokenizer, data, cfg, reference)
    try:
        return evaluate(model, tokenizer, data, cfg, reference)
    finally:
        api.unmerge(model)


def base_scores(model, tokenizer, data, cfg, out_dir, resume, say) -> tuple[dict | None, Any]:
    """Base-model metrics and the KL reference. On resume they are read back from the run folder;
    otherwise from the base-evaluation cache when an earlier run evaluated the same weights on the
    same data with the same options (the evaluation is deterministic, so this only saves time:
    about 70 s of every default run). The KL reference is cheap and always recomputed."""
    if cfg.skip_eval:
        return None, None
    cached = out_dir / "metrics_before.json"
    say("evaluating the base model (task score, general-text NLL, KL reference)...")
    reference = ev.reference_next_token_logprobs(
        model, tokenizer, data.prompts, autocast_dtype=eval_autocast(model)
    )
    if resume and cached.is_file():
        return json.loads(cached.read_text()), reference
    shared = base_eval_cache_file(model, tokenizer, data, cfg) if cfg.base_eval_cache else None
    if shared is not None and shared.is_file():
        say(f"base-model scores from the cache {shared} (--no-base-eval-cache to recompute)")
        before = json.loads(shared.read_text())
    else:
        before = evaluate(model, tokenizer, data, cfg)
        if shared is not None:
            atomic_write_json(shared, before)
    cached.write_text(json.dumps(before, indent=2) + "\n")
    return before, reference


def base_eval_cache_file(model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig) -> Path:
    """Where the base evaluation of exactly this model, data and options is cached. The key hashes
    every parameter and buffer (names, shapes, dtypes, bytes), the chat template, the held-out
    items, the general texts and prompts, every evaluation option, the device, the autocast dtype
    and the torch / transformers versions: anything that could change a figure changes the key."""
    import transformers

    from .models import cache_root

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    options = {
        "items": [dataclasses.asdict(it) for it in data.items],
        "texts": data.texts,
        "prompts": data.prompts,
        "questions": [dataclasses.asdict(it) for it in data.questions],
        "template": getattr(tokenizer, "chat_template", None),
        "vocab": len(tokenizer),
        "added": sorted(getattr(tokenizer, "get_added_vocab", dict)().items()),
        "eval": [cfg.eval_max_new_tokens, cfg.general_tokens, cfg.max_length, _attention_name(model, cfg)],
        "device": str(next(model.parameters()).device),
        "autocast": str(eval_autocast(model)),
        "versions": [torch.__version__, transformers.__version__, _version()],
        "fields": 2,  # what a cached result holds: 2 adds the per-character NLLs
        "scoring": EVAL_VERSION,
    }
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return cache_root().parent / "base-eval" / f"{digest.hexdigest()[:32]}.json"


def _attention_name(model: nn.Module, cfg: RunConfig) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or cfg.attention)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


ROWS = [
    ("held-out exact match", "exact_match", "{:.1%}"),
    ("held-out answer NLL (nats/token)", "answer_nll", "{:.3f}"),
    ("general-text NLL (forgetting)", "general_nll", "{:.3f}"),
    ("general-text perplexity", "general_ppl", "{:.2f}"),
    ("next-token KL from the base", "kl_from_base", "{:.4f}"),
    ("general questions answered", "general_qa", "{:.1%}"),
]


def format_table(before: dict | None, after: dict | None) -> str:
    if before is None and after is None:
        return "(evaluation skipped)"
    lines = [f"{'metric':<34} {'before':>10} {'after':>10}", "-" * 56]
    for label, key, fmt in ROWS:
        cells = [fmt.format(m[key]) if m and key in m else "-" for m in (before, after)]
        if key == "kl_from_base" and before is not None:
            cells[0] = "0 (base)"
        lines.append(f"{label:<34} {cells[0]:>10} {cells[1]:>10}")
    return "\n".join(lines)
