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
where gradients flow and for fewer than `LONG` (1,024) queries; evaluation, generation and long
sequences go to SDPA unchanged.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NAME = "lorakit"
# An attention function that wraps another (methods/gated_prefix.py adds a branch to the model's own
# attention) keeps the wrapped implementation's name under this config attribute.
INNER = "lorakit_inner_attention"
# From this many queries on, training calls go to SDPA: at 1,024 tokens the default model's whole
# training step took 3.35 s with this kernel against 2.43 s with SDPA, at 4,096 70 s against 13.7 s
# (docs/methods/longlora.md); the kernel's gain is at the few hundred tokens of ordinary SFT.
LONG = 1024


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
    """Probabilities (B, KV, G*Q, K), rows ordered (group, query); a fully masked row gives zeros."""
    b, h, length, d = q.shape
    kv, keys = k.shape[1], k.shape[2]
    rows = (h // kv) * length
    bias = _bias(mask, b, kv, h // kv, length, keys, q.dtype, q.device)
    probs = _softmax_scores(q.reshape(b * kv, rows, d), k, bias, mask is not None, scale, dtype)
    return probs.view(b, kv, rows, keys)


def _softmax_scores(
    rows: Tensor, k: Tensor, bias: Tensor, masked: bool, scale: float, dtype: torch.dtype | None = None
) -> Tensor:
    """softmax(rows k^T * scale + bias) for grouped query rows (B*KV, R, D) and keys (B, KV, K, D).

    One baddbmm adds the mask as a bias while it computes the scores, and the softmax reads them in
    the input dtype, accumulates in fp32 and writes `dtype` (default fp32, fp64 for fp64 inputs):
    no separate cast, scale or masked_fill pass over the scores. A fully masked row (a left-padded
    query) gives zeros.
    """
    keys = k.reshape(-1, k.shape[2], k.shape[3]).transpose(1, 2)  # (B*KV, D, K)
    scores = torch.baddbmm(bias.expand(rows.shape[0], rows.shape[1], keys.shape[2]), rows, keys, alpha=scale)
    dtype = dtype or torch.promote_types(rows.dtype, torch.float32)
    if not masked:
        return torch.softmax(scores, dim=-1, dtype=dtype)
    if not scores.requires_grad:  # the eager kernel: its own backward never differentiates this
        return torch.softmax(scores, dim=-1, dtype=dtype).nan_to_num_(0.0)
    # differentiated (the compiled path): a fully masked row's softmax is NaN, and NaN * 0 in the
    # softmax gradient would reach q and k through any later zeroing, so such rows never see -inf
    blind = scores.amax(dim=-1, keepdim=True) == float("-inf")
    probs = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1, dtype=dtype)
    return probs.masked_fill(blind, 0.0)


def _bias(
    mask: Tensor | None,
    b: int,
    kv: int,
    groups: int,
    length: int,
    keys: int,
    dtype: torch.dtype,
    device: torch.device,
    query_major: bool = False,
) -> Tensor:
    """The additive mask, (1 or B*KV, G*Q, K): 0 where a query may attend, -inf (or the float mask)
    elsewhere; rows ordered (group, query), or (query, group) with `query_major`."""
    if mask is None:
        build = _causal_bias.__wrapped__ if torch.compiler.is_compiling() else _causal_bias
        return build(groups, length, keys, dtype, str(device), query_major)
    if mask.dtype == torch.bool:  # (B or 1, 1, Q, K), True = attend
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    mask = mask.to(dtype)
    if query_major:
        grid = mask[:, :, :, None].expand(-1, kv, length, groups, keys)  # (B or 1, KV, Q, G, K)
    else:
        grid = mask[:, :, None].expand(-1, kv, groups, length, keys)  # (B or 1, KV, G, Q, K)
    return grid.reshape(-1, groups * length, keys)


@functools.lru_cache(maxsize=16)
def _causal_bias(
    groups: int, length: int, keys: int, dtype: torch.dtype, device: str, query_major: bool = False
) -> Tensor:
    """Causal, aligned to the end: a query at i sees keys up to i + keys - length."""
    rows = torch.arange(length, device=device)[:, None] + (keys - length)
    bias = torch.zeros(length, keys, dtype=dtype, device=device)
    bias = bias.masked_fill(torch.arange(keys, device=device)[None, :] > rows, float("-inf"))
    stacked = bias.repeat_interleave(groups, dim=0) if query_major else bias.repeat(groups, 1)
    return stacked[None]


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
    recompute the probabilities from q and k, as the eager kernel does, instead of keeping them.

    The query rows of a key/value group are stacked query-major, (query, group), not group-major as
    in the eager kernel: with a dynamic sequence length TorchInductor cannot simplify the indexing of
    the group-major split in backward, and the kernel that turns the query gradient back into q_proj's
    layout ran element by element (0.9 ms a layer on the default model, 0.1 ms query-major).
    """
    b, h, length, d = q.shape
    kv, keys = k.shape[1], k.shape[2]
    groups = h // kv
    rows = q.view(b, kv, groups, length, d).transpose(2, 3).reshape(b * kv, length * groups, d)
    bias = _bias(mask, b, kv, groups, length, keys, q.dtype, q.device, query_major=True)
    # fp32 probabilities, so that backward's softmax gradient is the eager kernel's
    probs = _softmax_scores(rows, k, bias, mask is not None, scale)
    out = torch.bmm(probs.to(v.dtype), v.reshape(b * kv, keys, d))  # (B*KV, Q*G, D)
    return out.view(b, kv, length, groups, d).transpose(2, 3).reshape(q.shape)


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

    if kwargs.get("softcap") is not None:  # Gemma 2's attention soft-cap: SDPA has none either
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds its mask
            blocked = torch.finfo(query.dtype).min
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, blocked
            )
        eager = _eager_of(module)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    unsupported = (
        (dropout > 0.0 and module.training)
        or kwargs.get("cache") is not None
        or kwargs.get("position_bias") is not None
        or not getattr(module, "is_causal", True)
        or kwargs.get("is_causal") is False
    )
    if not needs_grad or unsupported or query.shape[2] >= LONG:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] > 1 and attention_mask is None and key.shape[2] < query.shape[2]:
        raise ValueError("attention without a mask needs at least as many keys as queries")
    query, key, value = autocast_inputs(query, key, value)
    out = grouped_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in the autocast dtype when autocast is on, as SDPA casts them (rotary embeddings made
    q and k fp32)."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _eager_of(module: nn.Module) -> Any:
    """The eager attention function of the module's own modeling file (it knows the soft-cap)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} soft-caps its attention scores and its modeling file has no "
            "eager_attention_forward; train it with --attention eager"
        )
    return eager


def register() -> str:
    """Register the kernel (and SDPA's mask format) with transformers; returns its name."""
    return register_attention(NAME, attention_forward)


def register_attention(name: str, function: Any) -> str:
    """Register an attention function under `name` with transformers, with SDPA's mask format (without
    a mask function of the same name, transformers would give the function no mask even for padded
    batches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
