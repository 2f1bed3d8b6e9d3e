"""The training speed-ups against reference math: attention kernel, fused linear cross-entropy,
norm-output casts, bf16 frozen weights (and exact unmerge on them), each checked for values and
gradients, not timed."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.train.attention import _attention_math, grouped_attention
from lorakit.train.batching import default_collate
from lorakit.train.fast import prepare_for_training, store_frozen_linears
from lorakit.train.loss import auto_chunk_rows, chunked_causal_lm_loss, linear_cross_entropy


def reference_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v with every key/value head repeated for its query heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is None:
        length, keys = q.shape[2], k.shape[2]
        allowed = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    else:
        allowed = mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


def _qkv(batch=2, heads=6, kv=2, length=7, keys=None, dim=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    keys = keys or length
    make = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return make(batch, heads, length, dim), make(batch, kv, keys, dim), make(batch, kv, keys, dim)


@pytest.mark.parametrize("impl", ["kernel", "compiled_math"])
@pytest.mark.parametrize("kind", ["causal", "causal_with_past", "padding", "fully_masked_row"])
def test_grouped_attention_matches_reference_values_and_gradients(kind: str, impl: str) -> None:
    """The eager kernel (rows of a group stacked group-major) and the plain ops compiled layers
    trace (query-major) against attention with repeated key/value heads."""
    keys = 10 if kind == "causal_with_past" else None
    q, k, v = _qkv(keys=keys)
    mask = None
    if kind in ("padding", "fully_masked_row"):
        mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :2] = False  # left padding in the second row: its first queries see only themselves
        mask[1, :, 0, 0] = mask[1, :, 1, 1] = True
        if kind == "fully_masked_row":
            mask[1, :, 0, :] = False
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    if impl == "kernel":
        ours = grouped_attention(q, k, v, mask)
    else:
        ours = _attention_math(q, k, v, mask, q.shape[-1] ** -0.5)
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(
        torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True
    ):
        torch.testing.assert_close(a, b)
    if kind == "fully_masked_row":
        assert torch.equal(ours[1, :, 0], torch.zeros_like(ours[1, :, 0]))  # zeros, not NaN


def test_grouped_attention_passes_gradcheck() -> None:
    q, k, v = _qkv(batch=1, heads=4, kv=2, length=4, dim=3)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_attention(a, b, c), (q, k, v))


def test_grouped_attention_matches_sdpa_in_the_model(tiny) -> None:
    """The whole tiny Llama under our kernel against SDPA: same loss and gradients (fp32)."""
    batch = default_collate(tiny.samples(4, seed=3), pad_id=0)

    def run(attention: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = tiny.llama()
        if attention == "lorakit":
            from lorakit.train.attention import register

            model.set_attn_implementation(register())
        else:
            model.set_attn_implementation("sdpa")
        loss, _ = chunked_causal_lm_loss(model, **batch)
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (ours, ours_grads), (ref, ref_grads) = run("lorakit"), run("sdpa")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-4, atol=1e-5)


def reference_ce(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).double(), targets, reduction="sum")


@pytest.mark.parametrize("chunk", [0, 1, 3, 50])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_reference(chunk: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 13, (11,), generator=gen)
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    ours = linear_cross_entropy(hidden, weight, bias, targets, chunk)
    ref = reference_ce(hidden, weight, bias, targets)
    torch.testing.assert_close(ours, ref)
    scale = torch.tensor(0.37, dtype=torch.float64)  # backward scales by the incoming gradient
    got = torch.autograd.grad(ours, inputs, scale)
    want = torch.autograd.grad(ref, inputs, scale)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("trainable_head", [False, True])
def test_linear_cross_entropy_under_autocast_matches_the_autocast_path(trainable_head: bool) -> None:
    """bf16 logits, fp32 softmax, bf16 gradient matmul: what nn.Linear + F.cross_entropy do.

    40 rows in chunks of 7: bf16 logit blocks of 14 rows, each softmaxed in two fp32 chunks, the
    last block partial (14, 14, 12 = 7 + 5)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen, requires_grad=trainable_head)  # frozen: a tied LoRA head
    bias = torch.randn(300, generator=gen, requires_grad=True) if trainable_head else None
    targets = torch.randint(0, 300, (40,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=7)
        ref = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    got = torch.autograd.grad(ours, inputs)
    want = torch.autograd.grad(ref, inputs)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_linear_cross_entropy_without_grad_keeps_nothing() -> None:
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    targets = torch.randint(0, 9, (6,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk_size=4)
        ref = reference_ce(hidden, weight, None, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_auto_chunk_keeps_fp32_logits_under_the_mmap_threshold() -> None:
    rows = auto_chunk_rows(49152)
    assert rows * 49152 * 4 <= 32 * 2**20 and rows >= 64


def test_chunked_loss_through_the_decoder_equals_the_verified_full_model_path(tiny) -> None:
    model = tiny.llama()
    batch = default_collate(tiny.samples(5, seed=4), pad_id=0)
    direct, n1 = chunked_causal_lm_loss(model, **batch)
    verified, n2 = chunked_causal_lm_loss(model, **batch, verify_head=True)
    assert n1 == n2
    torch.testing.assert_close(direct, verified)


@pytest.mark.parametrize("config", [lk.LoRAConfig, lk.DoRAConfig])
def test_prepare_for_training_keeps_the_loss_and_gradients(tiny, config) -> None:
    """Every speed-up on: the bf16 loss and LoRA gradients are as close to fp32 training as plain
    autocast training with eager attention is (the kernel rounds scores to bf16 as eager does;
    SDPA keeps them in fp32)."""
    batch = default_collate(tiny.samples(6, seed=5), pad_id=0)

    def run(prepare: bool, amp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        model = tiny.llama()
        torch.manual_seed(0)  # the same A in every run
        lk.apply(model, config(rank=4, target_modules="all-linear", init="gaussian"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(6))
        if prepare:
            done = prepare_for_training(model, torch.bfloat16)
        else:
            done = []
            model.set_attn_implementation("eager")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = chunked_causal_lm_loss(model, **batch)
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, done

    fast_loss, fast_grads, done = run(True, True)
    plain_loss, plain_grads, _ = run(False, True)
    exact_loss, exact_grads, _ = run(False, False)
    assert any(line.startswith("attention: lorakit") for line in done)
    assert any(line.startswith("frozen linear weights stored in bfloat16") for line in done)
    fast_loss, plain_loss, exact_loss = (float(x.detach()) for x in (fast_loss, plain_loss, exact_loss))
    tolerance = max(2 * abs(plain_loss - exact_loss), 1e-3 * abs(exact_loss))
    assert abs(fast_loss - exact_loss) <= tolerance  # a summed loss: bf16 is ~1e-3 relative
    for name, g in exact_grads.items():
        fast_err = float((fast_grads[name] - g).norm() / g.norm())
        plain_err = float((plain_grads[name] - g).norm() / g.norm())
        assert fast_err <= 2 * plain_err + 0.01, (name, fast_err, plain_err)


def test_frozen_linears_go_to_bf16_but_trainable_tied_and_pissa_weights_do_not(tiny) -> None:
    model = tiny.llama()
    lk.apply(model, lk.LoRAConfig(rank=2, target_modules=["q_proj"], init="pissa"))
    count = store_frozen_linears(model, torch.bfloat16)
    params = dict(model.named_parameters())
    assert count > 0
    assert params["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert (
        params["model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.float32
    )  # PiSSA's residual
    assert all(p.dtype == torch.float32 for n, p in params.items() if p.requires_grad)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32


def test_unmerge_on_a_bf16_base_restores_it_exactly(tiny) -> None:
    model = tiny.llama()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    store_frozen_linears(model, torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    lk.merge(model)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed  # the merge did write into the bf16 weights
    lk.unmerge(model)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name


def test_norm_outputs_are_cast_once_under_autocast(tiny) -> None:
    model = tiny.llama()
    prepare_for_training(model, torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 3, norm.weight.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
    assert norm(x).dtype == torch.float32  # outside autocast: unchanged
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_long_sequences_go_to_sdpa(monkeypatch) -> None:
    """From LONG queries on, training attention is SDPA's (the kernel is slower there, longlora.md)."""
    from types import SimpleNamespace

    import transformers.integrations.sdpa_attention as sdpa

    from lorakit.train import attention

    calls = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(
        sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k)
    )
    module = SimpleNamespace(training=True, is_causal=True, num_key_value_groups=1)
    for length in (attention.LONG - 1, attention.LONG):
        q, k, v = (torch.randn(1, 2, length, 8, requires_grad=True) for _ in range(3))
        attention.attention_forward(module, q, k, v, None)
    assert calls == [attention.LONG]


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt")
def test_the_lean_allocator_is_set_said_and_switched_back(tiny) -> None:
    """`--allocator lean` hands large blocks back to the OS (its memory effect is a bench figure,
    docs/benchmarks.md); here: it is set once, said in the preparation lines, and "fast" restores
    the default for the rest of this process."""
    from lorakit.train import fast

    try:
        lines = fast.prepare_for_training(tiny.llama(), None, "off", allocator="lean")
        said = [line for line in lines if line.startswith(fast.ALLOCATOR_LINES["lean"])]
        assert said and fast._ALLOCATOR_TUNED == "lean"
        assert said[0].endswith(fast.small_block_caches())  # and the small-block caches, on or off
        assert fast.tune_allocator("lean") is False  # already set: nothing to do, nothing said
        with pytest.raises(ValueError, match="allocator='small': choose one of fast, lean"):
            fast.tune_allocator("small")
    finally:
        fast.tune_allocator("fast")
    assert fast._ALLOCATOR_TUNED == "fast"


def test_the_log_says_whether_glibcs_small_block_caches_are_off(monkeypatch) -> None:
    import lorakit_launcher
    from lorakit.train import fast

    if not lorakit_launcher.glibc():
        assert "not glibc" in fast.small_block_caches()
        return
    monkeypatch.setenv("GLIBC_TUNABLES", lorakit_launcher.tunables("glibc.malloc.arena_max=2"))
    assert fast.small_block_caches().startswith("small-block caches off")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")  # half of it is not off
    said = fast.small_block_caches()
    assert said.startswith("glibc's small-block caches on") and lorakit_launcher.tunables() in said
