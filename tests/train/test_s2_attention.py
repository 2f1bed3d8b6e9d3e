"""Shifted sparse attention (later-methods.md 2.6): equal to the dense-mask rule for even and odd
head counts and grouped-query attention; causal, where the authors' roll variant is not; full SDPA
in evaluation, with a cache; padded batches exact; clear refusals; checkpointing gives the same
gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.models import tiny_llama
from lorakit.train import s2_attention as s2


def _qkv(heads: int, kv: int, length: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, 8, generator=gen, dtype=dtype)
    k = torch.randn(2, kv, length, 8, generator=gen, dtype=dtype)
    v = torch.randn(2, kv, length, 8, generator=gen, dtype=dtype)
    return q, k, v


def _reference(q, k, v, size):
    """Dense attention under the rule written out: j <= i and the same group in head h."""
    heads, length = q.shape[1], q.shape[2]
    plain = torch.arange(length) // size
    shifted = (torch.arange(length) + size // 2) // size
    mask = torch.zeros(heads, length, length, dtype=torch.bool)
    for h in range(heads):
        group = plain if h < heads // 2 else shifted
        for i in range(length):
            for j in range(i + 1):
                mask[h, i, j] = bool(group[i] == group[j])
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def _rolled(q, k, v, size):
    """The authors' roll-based variant (not causal): the shifted heads' tokens rolled by G/2."""
    split, half = q.shape[1] // 2, size // 2
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    parts = [s2._grouped_causal(q[:, :split], k[:, :split], v[:, :split], size, None)]
    rolled = [torch.roll(x[:, split:], -half, dims=2) for x in (q, k, v)]
    out = s2._grouped_causal(*rolled, size, None)
    parts.append(torch.roll(out, half, dims=2))
    return torch.cat(parts, 1)


@pytest.mark.parametrize(("heads", "kv"), [(4, 4), (9, 9), (9, 3), (1, 1)])
@pytest.mark.parametrize(("length", "ratio"), [(8, 0.25), (32, 0.25), (24, 0.5), (16, 0.125)])
def test_equals_the_dense_rule(heads: int, kv: int, length: int, ratio: float) -> None:
    q, k, v = _qkv(heads, kv, length)
    size = s2.group_size(length, ratio)
    torch.testing.assert_close(s2.s2_attention(q, k, v, size), _reference(q, k, v, size), rtol=0, atol=1e-12)
    assert torch.equal(s2.s2_mask(length, heads, size), _reference_mask(heads, length, size))


def _reference_mask(heads: int, length: int, size: int) -> torch.Tensor:
    q = torch.eye(length, dtype=torch.float64)[None, None].expand(1, heads, -1, -1)  # one-hot values
    rows = _reference(
        torch.zeros(1, heads, length, 8, dtype=torch.float64),
        torch.zeros(1, heads, length, 8, dtype=torch.float64),
        q,
        size,
    )
    return rows[0] > 0


def test_gradients_equal_the_dense_rule() -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(9, 3, 16))
    size = s2.group_size(16, 0.25)
    s2.s2_attention(q, k, v, size).square().sum().backward()
    fast = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    _reference(q, k, v, size).square().sum().backward()
    for a, x in zip(fast, (q, k, v), strict=True):
        torch.testing.assert_close(a, x.grad, rtol=0, atol=1e-12)


def test_causal_where_the_roll_variant_is_not() -> None:
    length, size = 32, 8
    q, k, v = _qkv(9, 3, length)
    for j in (length - 1, 20, 5):
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] -= 2.0
        q2[:, :, j] *= 3.0
        before, after = s2.s2_attention(q, k, v, size), s2.s2_attention(q2, k2, v2, size)
        torch.testing.assert_close(after[:, :, :j], before[:, :, :j], rtol=0, atol=0)
        assert (after[:, :, j:] - before[:, :, j:]).abs().max() > 1e-3
    # negative control: the roll variant lets positions 0..G/2-1 of the shifted heads see the last token
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 1.0
    v2[:, :, -1] -= 2.0
    leaked = (_rolled(q, k2, v2, size) - _rolled(q, k, v, size))[:, 4:, : size // 2]
    assert leaked.abs().max() > 1e-3


def _module(training: bool, ratio: float = 0.25) -> SimpleNamespace:
    return SimpleNamespace(
        training=training, config=SimpleNamespace(lorakit_s2_group_ratio=ratio), is_causal=True
    )


def test_padded_batches_are_exact_and_never_nan() -> None:
    length, size = 16, 4
    q, k, v = _qkv(4, 2, length, dtype=torch.float32)
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[1, 9:] = False  # row 1 right-padded after 9 tokens: its last groups hold only padding
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :])[:, None]  # (B, 1, N, N), as sdpa_mask gives
    out, _ = s2.attention_forward(_module(True), q, k, v, mask)
    assert torch.isfinite(out).all()
    expected = _reference(q.double(), k.double(), v.double(), size).float().transpose(1, 2)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5)  # no padding: S2 itself
    real = _reference(q[1:, :, :9].double(), k[1:, :, :9].double(), v[1:, :, :9].double(), size)
    torch.testing.assert_close(out[1, :9], real[0].float().transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_evaluation_and_the_cache_use_full_attention() -> None:
    q, k, v = _qkv(4, 4, 16, dtype=torch.float32)  # (grouped-query fallbacks: the model test below)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, _ = s2.attention_forward(_module(False), q, k, v, None)
    torch.testing.assert_close(out, full.transpose(1, 2), rtol=1e-6, atol=1e-6)
    decode, _ = s2.attention_forward(_module(True), q[:, :, -1:], k, v, None)  # one query on a cache
    torch.testing.assert_close(decode, full[:, :, -1:].transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_through_a_model_train_and_eval() -> None:
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = tiny_llama().eval()
    model = tiny_llama().eval()
    s2.use_s2_attention(model)
    assert model.config._attn_implementation == s2.NAME
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)  # eval: full
    model.train()
    plain.train()
    assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-4  # training: groups of 4
    with pytest.raises(ValueError, match="multiple of 8"):
        model(ids[:, :10])
    seen = {}
    real = s2.attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen["mask"] = attention_mask
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(s2.NAME, spy)
    try:
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
        assert seen["mask"] is not None  # the mask interface is registered: padding reaches S2
    finally:
        s2.register()


def test_checkpointing_gives_the_same_gradients(checkpointing_grads) -> None:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        model = tiny_llama()
        s2.use_s2_attention(model)
        lk.apply(model, lk.LoRAConfig(rank=4, alpha=8, init="gaussian"))
        return model

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, checkpointed = checkpointing_grads(make, ids)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_lengths_and_ratios_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 8 tokens"):
        s2.group_size(20, 0.25)
    with pytest.raises(ValueError, match="group ratio"):
        s2.use_s2_attention(tiny_llama(), ratio=0.9)
