"""How much context a model really uses: perplexity of long text at several lengths, and passkey
retrieval; both with full attention (S2-Attn is for training only).

`long_perplexity` scores the same held-out tokens cut into rows of each length L, so the lengths
differ only in how much context each token has. Per row it keeps every position's NLL and reports
the mean over all positions, over the positions past the model's original window (where an
unextended model has never seen the rotary angles), and over the row's last quarter (the longest
contexts). The head runs on chunks of positions, so a 16k-token row never holds its (16k x vocab)
logits at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..train.evaluate import _autocast, _device, exact_match
from ..train.loss import output_head
from .passkey import passkey_items

PASSKEY_ROOM = 40  # tokens left for the chat template (~10 here) and the answer (up to 12)
HEAD_CHUNK = 1024  # positions per head call: 1024 x 49k fp32 logits = 200 MB


def token_nlls(
    model: nn.Module, row: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """NLL of each next token of one row of ids (T,): a (T-1,) fp32 tensor, full attention."""
    device = _device(model)
    ids = row.to(device)[None]
    decoder = getattr(model, "base_model", model)
    head = output_head(model)
    with torch.inference_mode(), _autocast(model, autocast_dtype):
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        targets = ids[0, 1:]
        out = torch.empty(targets.shape[0], dtype=torch.float32, device=device)
        for start in range(0, targets.shape[0], HEAD_CHUNK):
            logits = head(hidden[start : start + HEAD_CHUNK]).float()
            out[start : start + HEAD_CHUNK] = F.cross_entropy(
                logits, targets[start : start + HEAD_CHUNK], reduction="none"
            )
    return out


def long_perplexity(
    model: nn.Module,
    ids: Sequence[int],
    lengths: Sequence[int],
    window: int,
    budget: int,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """Per length L: perplexity of the first `budget` tokens of `ids` (at least one row) cut into rows
    of L; `window` is the model's original one. Keys: "ppl", "ppl_past_window" (L > window only),
    "ppl_last_quarter", "rows", "tokens"."""
    results: dict[str, dict[str, float]] = {}
    with _evaluating(model):
        for length in lengths:
            rows = min(max(1, budget // length), len(ids) // length)
            if rows == 0:
                raise ValueError(
                    f"the held-out text holds {len(ids):,} tokens, fewer than one row of {length:,}"
                )
            nll = torch.stack(
                [
                    token_nlls(model, torch.tensor(ids[r * length : (r + 1) * length]), autocast_dtype)
                    for r in range(rows)
                ]
            )  # (rows, L-1): position p+1 predicted from p+1 tokens of context
            entry = {
                "ppl": math.exp(nll.mean().item()),
                "ppl_last_quarter": math.exp(nll[:, -(length // 4) :].mean().item()),
                "rows": rows,
                "tokens": rows * length,
            }
            if length > window:
                entry["ppl_past_window"] = math.exp(nll[:, window - 1 :].mean().item())
            results[str(length)] = entry
    return results


def _same_number(prediction: str, reference: str) -> bool:
    found = re.findall(r"\d+", prediction)
    return bool(found) and found[0] == reference


def passkey_accuracy(
    model: nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_depth: int,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy of passkey retrieval per prompt length and depth (the first number in the
    answer must be the key)."""
    out: dict[str, Any] = {}
    with _evaluating(model):
        for length in lengths:
            per: dict[str, float] = {}
            # the prompt, the chat template's tokens and the answer all inside `length`
            every = passkey_items(tokenizer, length - PASSKEY_ROOM, list(depths), per_depth, seed)
            for i, depth in enumerate(depths):
                items = every[i * per_depth : (i + 1) * per_depth]
                result = exact_match(
                    model,
                    tokenizer,
                    items,
                    _same_number,
                    n_examples=1,
                    max_new_tokens=12,
                    batch_size=1,
                    autocast_dtype=autocast_dtype,
                )
                per[f"{depth:g}"] = result["accuracy"]
            out[str(length)] = {"accuracy": sum(per.values()) / len(per), "by_depth": per}
    return out


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (full attention: S2-Attn is for training only)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
