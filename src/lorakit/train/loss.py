"""Causal-LM cross-entropy that never builds fp32 logits for the whole batch.

A plain `model(input_ids, labels=...)` computes `(batch, seq, vocab)` logits, upcasts them to fp32
and keeps them, and the log-softmax output, for backward: for a 49k vocabulary and 4 x 256 tokens
that is ~200 MB each, and on 2 CPU cores the log-softmax and its backward over them took 0.65 s
of a 2.8 s LoRA step. Here:

    h   = final hidden states, after the final norm             # (B, T, H)
    h   = h[:, :-1][labels[:, 1:] != -100]                      # (N, H), only the loss tokens
    sum = sum over chunks c of CE(lm_head(h_c).float(), y_c)    # chunks of `chunk_size` rows

When the head is a plain `nn.Linear` (every Hugging Face causal LM), the loss and its gradient
are computed together, chunk by chunk, in forward (`linear_cross_entropy`): each chunk's logits
live only while its loss and its gradient `softmax - onehot` are formed and multiplied back into
a gradient for the hidden rows (and, if the head trains, for its weight). Backward then only
scales what forward kept. No logits are recomputed and none outlive their chunk; the precision is
autocast's: logits from a matmul in the compute dtype, softmax in fp32, the gradient cast back to
the compute dtype for its matmul. Chunks default to ~24 MB of fp32 logits (128 rows of a 49k
vocabulary), which glibc's allocator serves from its heap instead of fresh pages; under bf16
autocast the head's matmuls take two chunks at a time (the same 24 MB in bf16). Any other head
(an adapted or quantized one) falls back to activation checkpointing per chunk, and so does a model
that soft-caps its logits (Gemma 2: `cap * tanh(logits / cap)` with `config.final_logit_softcapping`),
whose cap is applied to each chunk's logits before the softmax.

The function returns the sum of token losses and the token count, so the caller can divide by the
token count of a whole accumulated batch rather than average per micro-batch.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.contract import AdaptedLayer

IGNORE_INDEX = -100


def chunked_causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    chunk_size: int = 0,
    verify_head: bool = False,
    keep_rows: Tensor | None = None,
    row_groups: Tensor | None = None,
    group_sums: dict[Any, tuple[float, int]] | None = None,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor]:
    """Return (sum of next-token CE over the non-ignored labels, number of those labels).

    `model` is a Hugging Face causal LM. Its decoder (`model.base_model`) gives the final hidden
    states (after the final norm) and the model's head is applied here. `verify_head=True` runs the
    whole model instead (`output_hidden_states=True`, `logits_to_keep=1`) and checks that
    `lm_head(hidden_states[-1])` reproduces the model's own logits, which fails for models that
    scale logits after the head in a way the config does not declare; the trainer does this on its
    first batch. A declared soft-cap (`config.final_logit_softcapping`) is applied here too.

    `keep_rows` (B, T) bool: also return the final hidden states at those positions, (N, H), from
    the same forward (the KL-to-base term reads them; `kl_to_reference`).

    `row_groups` (B,): a group per row (replay or task), or (B, T) a group per position (a row
    holding both, train/batching.py `_end_to_end`; a label counts in its own token's group);
    `group_sums` then receives each group's (CE sum, label count), the total being their sum.

    `position_ids` (B, T): packed rows (train/batching.py `packed_collate`); pass `attention_mask`
    None with them, so that transformers builds the per-sample mask from where positions restart.
    """
    cap = softcap_of(model)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0 and keep_rows is None:
        return torch.zeros((), device=input_ids.device), 0
    positions = {} if position_ids is None else {"position_ids": position_ids}  # models without the argument
    decoder = getattr(model, "base_model", None)
    if not verify_head and isinstance(decoder, nn.Module) and decoder is not model:
        # the decoder alone: the head's own call (even on one position) would cast its whole
        # (vocab x hidden) weight under autocast and keep the copy until the loss returns
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions
        ).last_hidden_state
        head = output_head(model)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
            **positions,
        )
        hidden = out.hidden_states[-1]  # (B, T, H)
        head = output_head(model)
        if verify_head:
            _check_head(head, hidden, out.logits, cap)
    rows = hidden[:, :-1][keep]  # (N, H)
    if not count:
        total = hidden.new_zeros(())
    elif row_groups is None:
        total = _chunked_ce(head, rows, targets[keep], chunk_size, cap)
    else:  # one loss call per group: the same total, and each group's part for the log
        group = row_groups.to(keep.device)
        group = (group[:, None].expand_as(keep) if group.dim() == 1 else group[:, 1:])[keep]
        labels_kept = targets[keep]
        total = torch.zeros((), device=rows.device, dtype=torch.float32)
        for value in group.unique().tolist():
            pick = group == value
            part = _chunked_ce(head, rows[pick], labels_kept[pick], chunk_size, cap)
            total = total + part
            if group_sums is not None:
                group_sums[value] = (float(part.detach()), int(pick.sum()))
    if keep_rows is None:
        return total, count
    return total, count, hidden[keep_rows]


def softcap_of(model: nn.Module) -> float | None:
    """The final-logit soft-cap a model's config declares (Gemma 2 and 3), or None."""
    config = getattr(model, "config", None)
    cap = getattr(getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _chunked_ce(
    head: nn.Module, rows: Tensor, targets: Tensor, chunk_size: int, cap: float | None = None
) -> Tensor:
    """Sum of CE over row chunks (`chunk_size` rows; 0 = about LOGITS_CHUNK_BYTES of fp32 logits)."""
    fused = cap is None  # the fused kernels know no soft-cap: the checkpointed chunks apply it
    if fused and type(head) is nn.Linear:
        return linear_cross_entropy(rows, head.weight, head.bias, targets, chunk_size)
    replaced = _row_replacing_head(head) if fused else None
    if replaced is not None:  # a head whose only change is token rows or a whole copy: still fused
        weight, bias, token_rows = replaced
        return linear_cross_entropy(rows, weight, bias, targets, chunk_size, token_rows)
    if fused and getattr(head, "is_quantized_linear", False) and getattr(head, "bias", None) is None:
        # a 4-bit head (an NF4 tied embedding): dequantize it once for all chunks, not per chunk
        return linear_cross_entropy(rows, head.dequantize(_compute_dtype(rows)), None, targets, chunk_size)
    if chunk_size <= 0:
        chunk_size = auto_chunk_rows(_vocab(head))
    recompute = torch.is_grad_enabled() and rows.shape[0] > chunk_size
    total = torch.zeros((), device=rows.device, dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(_chunk_loss, head, h, y, cap, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y, cap)
    return total


def _row_replacing_head(head: nn.Module) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None] | None:
    """(weight, bias, token rows or None) when `head` is a plain Linear whose one active change
    replaces rows of its weight (`Delta.replaces_rows`: trainable token rows; the base weight with
    (token ids, their rows)) or the whole weight (`Delta.replaced_weight`: a trained copy of the
    module, core/copies.py), else None."""
    layer = head if isinstance(head, AdaptedLayer) else None
    if layer is None or type(layer.base_layer) is not nn.Linear or not layer.enabled or layer.weights:
        return None
    live = [d for n, d in layer.adapters.items() if n in layer.active and n not in layer.merged]
    if len(live) != 1:
        return None
    if callable(whole := getattr(live[0], "replaced_weight", None)):
        weight, bias = whole()
        return weight, bias, None
    if not callable(getattr(live[0], "replaces_rows", None)):
        return None
    base = layer.base_layer
    return base.weight, base.bias, live[0].replaces_rows()


LOGITS_CHUNK_BYTES = 24 * 2**20  # under glibc's 32 MB mmap ceiling: reused heap memory, no page faults


def auto_chunk_rows(vocab: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def _vocab(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.ndim == 2 else 32768


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int = 0,
    rows: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """sum_i CE(hidden_i @ weight^T + bias, targets_i), fp32, with the gradient formed in forward.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) class indices (no ignore index:
    pass only the rows that count). Under autocast the matmuls run in the autocast dtype, as
    `nn.Linear` would; the softmax always runs in fp32 (fp64 for fp64 inputs).

    `rows` = (index (n,), values (n, H)): the weight's rows `index` are `values` instead (trainable
    token rows, core/tokens.py), and their gradient is formed for those n rows only, not for the
    whole (V, H) weight.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be (N, H) and targets (N,); got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    chunk = chunk_size if chunk_size > 0 else auto_chunk_rows(weight.shape[0])
    compute = _compute_dtype(hidden)  # read before autocast is switched off below
    index, values = rows if rows is not None else (None, None)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, chunk, compute, torch.is_grad_enabled(), index, values
        )


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in here: autocast's if it is on, else `t`'s own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


_HEAD_CACHE: dict[int, tuple[weakref.ref, int, int, torch.dtype, Tensor]] = {}


def _cast_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight` in `dtype`; a frozen weight's copy is kept between steps (a tied 49k x 576 head is
    54 MB in bf16, and casting it into fresh memory every step took ~0.1 s of page faults)."""
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad:
        return weight.to(dtype)
    key = id(weight)
    hit = _HEAD_CACHE.get(key)
    stamp = (weight.data_ptr(), weight._version, dtype)
    if hit is not None and hit[0]() is weight and hit[1:4] == stamp:
        return hit[4]
    cast = weight.detach().to(dtype)
    _HEAD_CACHE.clear()  # one head at a time: a cache, not a second copy of every model's head
    _HEAD_CACHE[key] = (weakref.ref(weight), *stamp, cast)
    return cast


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, compute, grads, index, values):  # type: ignore[no-untyped-def]
        need_h = grads and hidden.requires_grad
        need_w = grads and weight.requires_grad
        need_b = grads and bias is not None and bias.requires_grad
        need_r = grads and values is not None and values.requires_grad
        need_grad = need_h or need_w or need_b or need_r
        acc = torch.promote_types(compute, torch.float32)
        h_all, w = hidden.to(compute), _cast_weight(weight, compute)
        if index is not None:  # the replaced rows, in a copy (the cached frozen cast stays as it is)
            w = w.index_copy(0, index, values.detach().to(compute))
        d_rows = torch.zeros(values.shape, device=w.device, dtype=acc) if need_r else None
        b = None if bias is None else bias.to(compute)
        total = torch.zeros((), device=hidden.device, dtype=acc)
        d_hidden = torch.empty_like(h_all) if need_h else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None
        # Two buffers serve every chunk (fresh 25 MB tensors per chunk cost more in page faults
        # than the arithmetic): `low` holds a block of logits and then their gradient in the compute
        # dtype, `work` a chunk of fp32 logits, turned in place into softmax - onehot. In a 2-byte
        # compute dtype a block is two chunks (the same bytes as one fp32 chunk): the head's two
        # matmuls run on 256 rows instead of 128 (for a 49k vocabulary), which oneDNN does ~20% faster.
        block = chunk if compute == acc else 2 * chunk
        low = torch.empty(min(block, h_all.shape[0]), w.shape[0], device=w.device, dtype=compute)
        work = (
            low
            if compute == acc
            else torch.empty(min(chunk, low.shape[0]), w.shape[0], device=w.device, dtype=acc)
        )
        for start in range(0, h_all.shape[0], block):
            h = h_all[start : start + block]
            logits = low[: h.shape[0]]
            if b is None:
                torch.mm(h, w.t(), out=logits)
            else:  # the bias added before the rounding to the compute dtype, as F.linear does
                torch.addmm(b, h, w.t(), out=logits)
            for first in range(0, h.shape[0], chunk):
                part = logits[first : first + chunk]
                z = part if work is low else work[: part.shape[0]]
                y = targets[start + first : start + first + part.shape[0]]
                total += _softmax_grad_(part, z, y, need_grad, d_bias)
            if not need_grad:
                continue
            if need_h:
                torch.mm(logits, w, out=d_hidden[start : start + block])
            if need_w:
                d_weight += (logits.t() @ h).to(acc)
            if need_r:
                d_rows += (logits[:, index].t() @ h).to(acc)
        if need_w and index is not None:  # the replaced rows' gradient goes to `values` only
            d_weight[index] = 0
        ctx.save_for_backward(d_hidden, d_weight, d_bias, d_rows)
        ctx.dtypes = (
            hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
            None if values is None else values.dtype,
        )
        return total.float() if acc != torch.float64 else total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        d_hidden, d_weight, d_bias, d_rows = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype, r_dtype = ctx.dtypes
        scale = grad_out.to(torch.float32 if grad_out.dtype != torch.float64 else torch.float64)

        def scaled(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
            return None if t is None else (t.to(scale.dtype) * scale).to(dtype)

        return (
            scaled(d_hidden, h_dtype),
            scaled(d_weight, w_dtype),
            scaled(d_bias, b_dtype),
            None,
            None,
            None,
            None,
            None,
            scaled(d_rows, r_dtype),
        )


def _softmax_grad_(logits: Tensor, z: Tensor, targets: Tensor, grad: bool, d_bias: Tensor | None) -> Tensor:
    """sum(logsumexp - target logit) of one chunk; with `grad`, `logits` becomes softmax - onehot
    (and its column sums, the bias gradient, are added to `d_bias` in fp32).

    `z` is the fp32 work buffer for these rows (`logits` itself when that is fp32 already).
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    if z is not logits:
        z.copy_(logits)
    picked = z[rows, targets].clone()  # the target logits, before z is overwritten
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(top).exp_()
    norm = z.sum(dim=-1, keepdim=True)
    loss = (norm.log() + top).sum() - picked.sum()
    if grad:
        z.div_(norm)  # softmax - onehot: d(sum CE)/d(logits)
        z[rows, targets] -= 1.0
        if d_bias is not None:
            d_bias += z.sum(0)
        if z is not logits:
            logits.copy_(z)
    return loss


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor, cap: float | None = None) -> Tensor:
    logits = _capped(head(hidden).float(), cap)  # (n, V): the only fp32 logits alive at a time
    return F.cross_entropy(logits, targets, reduction="sum")


def _capped(logits: Tensor, cap: float | None) -> Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def output_head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no output head (get_output_embeddings() returned "
            "nothing); the chunked loss needs a Hugging Face *ForCausalLM model with an lm_head"
        )
    return head


def _check_head(head: nn.Module, hidden: Tensor, model_logits: Tensor, cap: float | None) -> None:
    """Compare our head on the last position with the logits the model computed itself."""
    with torch.no_grad():
        ours = _capped(head(hidden[:, -1:]).float(), cap)
        theirs = model_logits[:, -1:].float()
        scale = 1.0 + float(theirs.abs().max())
        if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * scale):
            raise ValueError(
                "lm_head(hidden_states[-1]) does not reproduce the model's logits (max difference "
                f"{float((ours - theirs).abs().max()):.3g}): this model changes logits after the "
                "head in a way its config does not declare (a scale, an undeclared soft-cap) or its "
                "last hidden state is not after the final norm; the chunked loss cannot be used for it"
            )


def kl_to_reference(
    head: nn.Module, rows: Tensor, reference: Tensor, chunk_size: int = 0, cap: float | None = None
) -> Tensor:
    """sum_i KL(p_ref,i || p_i), p_i = softmax(head(rows_i)) (the model being trained), p_ref,i =
    exp(reference_i) (log-probabilities, (N, V), no gradient). Chunks of rows are checkpointed, so
    only one chunk's (chunk, V) logits live at a time in forward and again in backward."""
    if chunk_size <= 0:
        chunk_size = auto_chunk_rows(_vocab(head))
    total = torch.zeros((), device=rows.device, dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        h, ref = rows[start : start + chunk_size], reference[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_kl, head, h, ref, cap, use_reentrant=False)
        else:
            total = total + _chunk_kl(head, h, ref, cap)
    return total


def reference_log_probs(
    head: nn.Module, rows: Tensor, chunk_size: int = 0, cap: float | None = None
) -> Tensor:
    """log softmax(head(rows)) in fp32, (N, V), chunk by chunk, without gradient."""
    if chunk_size <= 0:
        chunk_size = auto_chunk_rows(_vocab(head))
    with torch.no_grad():
        parts = [
            F.log_softmax(_capped(head(rows[s : s + chunk_size]).float(), cap), -1)
            for s in range(0, rows.shape[0], chunk_size)
        ]
    return torch.cat(parts) if parts else rows.new_zeros(0, _vocab(head), dtype=torch.float32)


def _chunk_kl(head: nn.Module, hidden: Tensor, reference: Tensor, cap: float | None) -> Tensor:
    log_p = F.log_softmax(_capped(head(hidden).float(), cap), -1)
    return F.kl_div(log_p, reference, log_target=True, reduction="sum")
