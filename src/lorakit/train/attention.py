"""A training attention kernel for CPUs: plain batched matmuls, grouped-query aware, memory-light.

At the lengths people fine-tune on a laptop (a few hundred tokens), PyTorch's CPU flash-attention
kernel is the slowest way to compute attention: on the default model (4 x 256 tokens, 9 query and
3 key/value heads) its backward alone took 1.0 s of a 6.4 s step on one thread. Eager attention
(transformers' `eager`) is about twice as fast but keeps every layer's attention probabilities for
backward, twice (bf16 and fp32): 36 x 256 x 256 x 6 bytes = 14 MB a layer, 425 MB for 30 layers.

This kernel computes what eager attention computes, with the same precision (scores from a matmul
in the input dtype, softmax in fp32, probabilities cast back for the value matmul; SDPA keeps the
scores in fp32, so under bf16 autocast its gradients are a little closer to fp32 training), but:

- keeps only q, k, v and the output for backward, and recomputes the probabilities there (one
  (Q x K) score matmul and softmax per layer, cheap at these lengths);
- never copies keys and values per query head: the G query heads that share a key/value head are
  stacked into one (G*Q, D) matrix, so one matmul serves the whole group and the key/value
  gradients come out already summed over it.

    s  = (q k^T) * scale  (+ mask)            p = softmax(s)              o = p v
    dv = p^T do     dp = do v^T     ds = p * (dp - rowsum(do * o))     dq = ds k * scale
    dk = ds^T q * scale

It is registered with transformers as the attention implementation "lorakit" and is used only
where gradients flow; without them (evaluation, generation) the call goes to SDPA unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NAME = "lorakit"


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        probs = _probs(q, k, mask, scale, v.dtype)  # straight into v's dtype: the same values as a cast
        out = torch.matmul(probs, v)  # (B, KV, G*Q, D)
        ctx.save_for_backward(q, k, v, out, mask)
        ctx.scale = scale
        return out.view(q.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, mask = ctx.saved_tensors
        scale = ctx.scale
        probs = _probs(q, k, mask, scale)
        dout = grad_out.reshape(out.shape).to(v.dtype)  # (B, KV, G*Q, D)
        dv = torch.matmul(probs.to(v.dtype).transpose(-1, -2), dout)
        acc = probs.dtype
        dprobs = torch.matmul(dout, v.transpose(-1, -2)).to(acc)
        row = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        dscores = probs.mul_(dprobs.sub_(row)).mul_(scale).to(q.dtype)  # in place: probs is ours
        dq = torch.matmul(dscores, k).view(q.shape)
        dk = torch.matmul(dscores.transpose(-1, -2), _grouped(q, k))
        return dq, dk, dv, None, None


def _grouped(q: Tensor, k: Tensor) -> Tensor:
    """(B, H, Q, D) -> (B, KV, G*Q, D): the query heads of a key/value group stacked in rows."""
    b, h, length, d = q.shape
    return q.reshape(b, k.shape[1], (h // k.shape[1]) * length, d)


def _probs(
    q: Tensor, k: Tensor, mask: Tensor | None, scale: float, dtype: torch.dtype | None = None
) -> Tensor:
    """Probabilities (B, KV, G*Q, K); a fully masked row gives zeros.

    One baddbmm adds the mask as a bias while it computes the scores, and the softmax reads them in
    the input dtype, accumulates in fp32 and writes `dtype` (default fp32, fp64 for fp64 inputs):
    no separate cast, scale or masked_fill pass over the scores.
    """
    b, h, length, d = q.shape
    kv, keys = k.shape[1], k.shape[2]
    rows = (h // kv) * length
    bias = _bias(mask, b, kv, h // kv, length, keys, q.dtype, q.device)
    scores = torch.baddbmm(
        bias.expand(b * kv, rows, keys),
        q.reshape(b * kv, rows, d),
        k.reshape(b * kv, keys, d).transpose(1, 2),
        alpha=scale,
    )
    probs = torch.softmax(scores, dim=-1, dtype=dtype or torch.promote_types(q.dtype, torch.float32))
    if mask is not None:  # in place only outside autograd (the compiled path differentiates this)
        probs = probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)
    return probs.view(b, kv, rows, keys)


def _bias(
    mask: Tensor | None,
    b: int,
    kv: int,
    groups: int,
    length: int,
    keys: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The additive mask, (1 or B*KV, G*Q, K): 0 where a query may attend, -inf (or the float mask) elsewhere."""
    if mask is None:
        build = _causal_bias.__wrapped__ if torch.compiler.is_compiling() else _causal_bias
        return build(groups, length, keys, dtype, str(device))
    if mask.dtype == torch.bool:  # (B or 1, 1, Q, K), True = attend
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    grid = mask.to(dtype)[:, :, None].expand(-1, kv, groups, length, keys)  # (B or 1, KV, G, Q, K)
    return grid.reshape(-1, groups * length, keys)


@functools.lru_cache(maxsize=16)
def _causal_bias(groups: int, length: int, keys: int, dtype: torch.dtype, device: str) -> Tensor:
    """Causal, aligned to the end: a query at i sees keys up to i + keys - length."""
    rows = torch.arange(length, device=device)[:, None] + (keys - length)
    bias = torch.zeros(length, keys, dtype=dtype, device=device)
    bias.masked_fill_(torch.arange(keys, device=device)[None, :] > rows, float("-inf"))
    return bias.repeat(groups, 1)[None]


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Attention of q (B, H, Q, D) over k, v (B, KV, K, D) with H a multiple of KV; returns (B, H, Q, D).

    `mask` is None (causal), a boolean (B or 1, 1, Q, K) mask with True where a query may attend,
    or an additive float mask of that shape.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        if torch.compiler.is_compiling():  # plain ops for TorchInductor, recomputed in backward
            return checkpoint(_attention_math, q, k, v, mask, scale, use_reentrant=False)
        return _GroupedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale)


def _attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The kernel's forward in differentiable ops; compiled, the checkpoint around it makes backward
    recompute the probabilities from q and k, as the eager kernel does, instead of keeping them."""
    probs = _probs(q, k, mask, scale)  # fp32, so that backward's softmax gradient is eager's
    return torch.matmul(probs.to(v.dtype), v).view(q.shape)


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; SDPA wherever this kernel does not apply."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    unsupported = (
        (dropout > 0.0 and module.training)
        or kwargs.get("softcap") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("position_bias") is not None
        or not getattr(module, "is_causal", True)
        or kwargs.get("is_causal") is False
    )
    if not needs_grad or unsupported:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] > 1 and attention_mask is None and key.shape[2] < query.shape[2]:
        raise ValueError("attention without a mask needs at least as many keys as queries")
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast: rotary embeddings made q, k fp32
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = grouped_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the kernel (and SDPA's mask format) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
