"""Causal-LM cross-entropy that never builds fp32 logits for the whole batch.

A plain `model(input_ids, labels=...)` computes `(batch, seq, vocab)` logits, upcasts them to fp32
and keeps them for backward: for a 49k vocabulary and 4 x 256 tokens that is ~200 MB, more than the
rest of a LoRA step needs, and most rows are prompt tokens whose loss is masked anyway. Here:

    h   = final hidden states, after the final norm             # (B, T, H)
    h   = h[:, :-1][labels[:, 1:] != -100]                      # (N, H), only the loss tokens
    sum = sum over chunks c of CE(lm_head(h_c).float(), y_c)    # chunks of `chunk_size` rows

When there is more than one chunk, each runs under activation checkpointing, so backward
recomputes its logits instead of keeping them all: peak logits memory is one chunk,
`chunk_size x vocab` in fp32. A single chunk is kept as is: recomputing it would cost a head
matmul (~0.3 s per 1024 rows of a 49k vocabulary on 2 CPU cores) and lower no peak. The function returns
the sum of token losses and the token count, so the caller can divide by the token count of a
whole accumulated batch rather than average per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    verify_head: bool = False,
) -> tuple[Tensor, int]:
    """Return (sum of next-token CE over the non-ignored labels, number of those labels).

    `model` is a Hugging Face causal LM: `output_hidden_states=True` gives the final hidden states
    (after the final norm; transformers 5 replaces the last entry with the normed output) and
    `logits_to_keep=1` stops it from computing logits for every position. `verify_head=True`
    checks once that `lm_head(hidden_states[-1])` reproduces the model's own logits, which fails
    for models that scale or soft-cap logits after the head.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return torch.zeros((), device=input_ids.device), 0
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]  # (B, T, H)
    head = _output_head(model)
    if verify_head:
        _check_head(head, hidden, out.logits)
    rows = hidden[:, :-1][keep]  # (N, H)
    return _chunked_ce(head, rows, targets[keep], chunk_size), count


def _chunked_ce(head: nn.Module, rows: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Sum of CE over row chunks; with several chunks, backward recomputes each chunk's logits."""
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk_size
    total = torch.zeros((), device=rows.device, dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden).float()  # (n, V): the only fp32 logits alive at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def _output_head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no output head (get_output_embeddings() returned "
            "nothing); the chunked loss needs a Hugging Face *ForCausalLM model with an lm_head"
        )
    return head


def _check_head(head: nn.Module, hidden: Tensor, model_logits: Tensor) -> None:
    """Compare our head on the last position with the logits the model computed itself."""
    with torch.no_grad():
        ours = head(hidden[:, -1:]).float()
        theirs = model_logits[:, -1:].float()
        scale = 1.0 + float(theirs.abs().max())
        if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * scale):
            raise ValueError(
                "lm_head(hidden_states[-1]) does not reproduce the model's logits (max difference "
                f"{float((ours - theirs).abs().max()):.3g}): this model changes logits after the "
                "head (scaling, soft-capping) or its last hidden state is not after the final "
                "norm; the chunked loss cannot be used for it"
            )
