"""Shifted sparse attention (S2-Attn, LongLoRA: Chen et al., ICLR 2024), causal-correct, for training.

With N tokens and groups of G = ratio * N (LongLoRA: a quarter), a token attends only to the earlier
tokens of its own group. The first H // 2 heads use groups [0, G), [G, 2G), ...; the other heads
(H - H // 2 of them: 5 of SmolLM2's 9) use groups shifted by half a group, [0, G/2), [G/2, 3G/2),
..., [N - G/2, N), so information crosses every group boundary in some head. Tokens stay in place:
only the mask changes.

    token i attends to j  iff  j <= i  and  group_h(i) == group_h(j)
    group_h(t) = t // G for the unshifted heads, (t + G/2) // G for the shifted ones

The authors' roll-based code (rolling the shifted heads' tokens by G/2 and attending in groups) lets
the first half-group see the last one, i.e. the future; `tests/train/test_s2_attention.py` keeps
that variant as the negative control of the causality test. Here the unshifted heads run as N/G
independent causal sequences of G tokens, and the shifted heads as a causal half-group at each end
and N/G - 1 causal groups between them, so every piece takes SDPA's is_causal path, attention costs
N^2/4 of dense at ratio 1/4, and no mask is ever built.

It is registered with transformers as the attention implementation "lorakit_s2" and applies only in
training (`module.training`), without a cache and with whole groups (N divisible by G, G even):
- evaluation, generation and any call with a cache use ordinary causal SDPA: the model is trained
  with short-range attention and used with full attention, as LongLoRA prescribes;
- a padded batch gets the S2 mask intersected with the padding mask, dense (exact, not faster;
  a padding position also sees itself, so no row is empty);
- a training length that does not split into whole even groups is refused with the lengths that do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import autocast_inputs, register_attention

NAME = "lorakit_s2"
DEFAULT_RATIO = 0.25
RATIO_ATTRIBUTE = "lorakit_s2_group_ratio"  # on the model config; set by `use_s2_attention`


def group_size(length: int, ratio: float) -> int:
    """G for a training length N; refuses lengths that do not split into whole, even groups."""
    size = round(length * ratio)
    if abs(length * ratio - size) > 1e-9 or size < 2 or size % 2 or length % size:
        raise ValueError(
            f"shifted sparse attention needs the training length to split into groups of an even "
            f"size ({ratio:g} of it): {length} tokens give groups of {length * ratio:g}; pad or cut "
            f"sequences to a multiple of {int(round(2 / ratio))} tokens (e.g. {_near(length, ratio)})"
        )
    return size


def _near(length: int, ratio: float) -> int:
    step = int(round(2 / ratio))
    return max(step, (length // step) * step)


def heads_split(heads: int) -> int:
    """How many heads keep unshifted groups: the first H // 2 (the rest, the larger half, shift)."""
    return heads // 2


def s2_mask(length: int, heads: int, size: int, device: Any = None) -> Tensor:
    """The rule as a dense (H, N, N) bool mask (padded batches; the fast path builds none)."""
    t = torch.arange(length, device=device)
    plain, shifted = t // size, (t + size // 2) // size
    causal = t[None, :] <= t[:, None]
    same_plain = plain[:, None] == plain[None, :]
    same_shifted = shifted[:, None] == shifted[None, :]
    split = heads_split(heads)
    return torch.stack([causal & (same_plain if h < split else same_shifted) for h in range(heads)])


def _repeat_kv(x: Tensor, heads: int) -> Tensor:
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _grouped_causal(q: Tensor, k: Tensor, v: Tensor, size: int, scale: float | None) -> Tensor:
    """Causal attention within consecutive groups of `size` tokens: (B, h, L, D) with L % size == 0.
    The groups are folded into the batch, (B * L/size, h, size, D): SDPA's fused CPU kernel takes 4-D
    input only, and a 5-D call falls back to the math path, which keeps every group's probabilities
    for backward (4x slower and about twice the step's memory at N = 4096 in a one-off timing)."""
    b, h, length, d = q.shape
    n = length // size

    def fold(x: Tensor) -> Tensor:
        return x.reshape(b, h, n, size, d).transpose(1, 2).reshape(b * n, h, size, d)

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, scale=scale)
    return out.reshape(b, n, h, size, d).transpose(1, 2).reshape(b, h, length, d)


def s2_attention(query: Tensor, key: Tensor, value: Tensor, size: int, scale: float | None = None) -> Tensor:
    """(B, H, N, D) queries, (B, Hkv, N, D) keys and values -> (B, H, N, D), without a dense mask."""
    heads, length = query.shape[1], query.shape[2]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    split, half = heads_split(heads), size // 2
    parts = []
    if split:
        parts.append(_grouped_causal(query[:, :split], key[:, :split], value[:, :split], size, scale))
    # shifted heads: the half-group [0, G/2), the whole groups [G/2 + kG, 3G/2 + kG), the half-group
    # [N - G/2, N); each a causal attention of its own, so every call takes SDPA's is_causal path
    q, k, v = query[:, split:], key[:, split:], value[:, split:]
    pieces = [_grouped_causal(q[:, :, :half], k[:, :, :half], v[:, :, :half], half, scale)]
    if length > size:
        middle = slice(half, length - half)
        pieces.append(_grouped_causal(q[:, :, middle], k[:, :, middle], v[:, :, middle], size, scale))
    tail = slice(length - half, length)
    pieces.append(_grouped_causal(q[:, :, tail], k[:, :, tail], v[:, :, tail], half, scale))
    parts.append(torch.cat(pieces, dim=2))
    return torch.cat(parts, dim=1)


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
    """transformers' attention-function signature: S2 in training, SDPA everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    training = module.training and key.shape[2] == length and length > 1 and kwargs.get("cache") is None
    if not training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    ratio = float(getattr(module.config, RATIO_ATTRIBUTE, DEFAULT_RATIO))
    size = group_size(length, ratio)
    query, key, value = autocast_inputs(query, key, value)
    if attention_mask is None:
        out = s2_attention(query, key, value, size, scaling)
    else:  # padding: the group rule and the padding mask together, dense
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        allowed = attention_mask[..., -length:] & s2_mask(length, query.shape[1], size, query.device)
        # a padding query whose group holds only padding would see nothing (NaN, and NaN gradients
        # through the masked loss): let every query see itself; real tokens always do anyway
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=query.device)
        heads = query.shape[1]
        out = F.scaled_dot_product_attention(
            query, _repeat_kv(key, heads), _repeat_kv(value, heads), attn_mask=allowed, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register S2-Attn (and SDPA's mask format, so padded batches get a mask) with transformers."""
    return register_attention(NAME, attention_forward)


def use_s2_attention(model: nn.Module, ratio: float = DEFAULT_RATIO) -> None:
    """Train `model` with S2-Attn from now on (its evaluation and generation keep full attention)."""
    if not 0 < ratio <= 0.5:
        raise ValueError(f"the group ratio must be in (0, 0.5], got {ratio}")
    setattr(model.config, RATIO_ATTRIBUTE, ratio)
    model.set_attn_implementation(register())
