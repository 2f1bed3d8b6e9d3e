"""Compiled decoder layers (lorakit.train.compiled): the same training as eager layers, eager for
everything that is not training, and a failed compile that costs nothing.

Compiling the tiny model takes ~30 s on two cores, so one test compiles and checks all it can.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.train import TrainConfig, compiled
from lorakit.train.attention import _attention_math, _GroupedAttention
from lorakit.train.batching import default_collate
from lorakit.train.fast import prepare_for_training
from lorakit.train.loss import chunked_causal_lm_loss


def _lora_model(tiny, config=lk.LoRAConfig):
    model = tiny.llama()
    torch.manual_seed(0)
    lk.apply(model, config(rank=4, target_modules="all-linear", init="gaussian"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(6))
    return model.train()


def _step(model, batch, amp: bool) -> tuple[float, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        total, count = chunked_causal_lm_loss(model, **batch)
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float((total / count).detach()), grads


def test_compiled_layers_train_like_eager_ones(tiny) -> None:
    eager = _lora_model(tiny)
    fast = _lora_model(tiny)
    done = prepare_for_training(fast, None, compile="on")
    assert done[-1] == "torch.compile: 2 decoder layers compiled for training (the first step compiles them)"
    layer = fast.model.layers[0]
    assert isinstance(layer.forward, compiled.TrainingForward)
    # the norms and the MLP recompute their outputs in backward (only inside compiled code)
    assert "forward" in layer.mlp.__dict__ and "forward" in layer.input_layernorm.__dict__

    calls = {"compiled": 0}
    inner = layer.forward.compiled

    def counting(*args, **kwargs):
        calls["compiled"] += 1
        return inner(*args, **kwargs)

    for each in fast.model.layers:
        each.forward.compiled = counting

    # two lengths and batch sizes, as the trainer's micro-batches have: one dynamic-shape compile
    for seed, n in ((5, 6), (7, 3)):
        batch = default_collate(tiny.samples(n, seed=seed, max_len=12 + seed), pad_id=0)
        ref_loss, ref_grads = _step(eager, batch, amp=False)
        loss, grads = _step(fast, batch, amp=False)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert ref_grads.keys() == grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert calls["compiled"] == 4  # 2 layers x 2 batches: training calls went through compile

    # evaluation and generation run the eager forward, with the same outputs
    with torch.no_grad():
        ids = batch["input_ids"]
        torch.testing.assert_close(fast(input_ids=ids).logits, eager(input_ids=ids).logits)
        fast.eval()
        fast_tokens = fast.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        eager.eval()
        assert torch.equal(fast_tokens, eager.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))
        fast.train()
    assert calls["compiled"] == 4, "a no-grad call took the compiled path"

    # a deep copy calls its own layers, not the original's
    twin = copy.deepcopy(fast)
    assert twin.model.layers[0].forward.layer is twin.model.layers[0]
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.zero_()
    twin_loss, _ = _step(twin, batch, amp=False)
    assert twin_loss != pytest.approx(loss, rel=1e-3)  # zeroed adapters: a different loss

    assert compiled.uncompile_layers(fast) == 2
    assert "forward" not in layer.__dict__ and "forward" not in layer.mlp.__dict__


def test_a_failing_compile_falls_back_to_eager_and_says_so(tiny, monkeypatch) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager, fast = _lora_model(tiny), _lora_model(tiny)
    prepare_for_training(fast, None, compile="on")
    batch = default_collate(tiny.samples(4, seed=1), pad_id=0)
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler: no working C\\+\\+ compiler found\\)"):
        loss, grads = _step(fast, batch, amp=False)
    ref_loss, ref_grads = _step(eager, batch, amp=False)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert fast.model.layers[0].forward.state.enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once switched off, no further attempt and no warning
        _step(fast, batch, amp=False)


def test_a_wrong_call_still_raises_its_own_error(tiny) -> None:
    model = _lora_model(tiny)
    compiled.compile_layers(model)
    layer = model.model.layers[0]
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        layer(torch.randn(1, 3, 5), position_embeddings=None)  # hidden size 5 is not the model's
    assert layer.forward.state.enabled  # an error of the call is not a compile failure


def test_auto_compiles_only_big_models_on_cpu_and_on_needs_a_compiler(tiny, monkeypatch) -> None:
    model = _lora_model(tiny)
    done = prepare_for_training(model, None)
    assert "parameters: compiling takes longer than it saves" in done[-1]
    assert "forward" not in model.model.layers[0].__dict__
    assert "torch.compile" not in " ".join(prepare_for_training(_lora_model(tiny), None, compile="off"))
    monkeypatch.setattr(compiled, "AUTO_MIN_PARAMETERS", 0)  # as if the tiny model were big
    dora = tiny.llama()
    lk.apply(dora, lk.DoRAConfig(rank=4, target_modules="all-linear"))
    assert compiled.slower_compiled(dora) is None  # DoRA compiles well since prepare_compiled
    qlora = tiny.llama()
    lk.apply(qlora, lk.QLoRAConfig(rank=4, target_modules="all-linear"))
    assert compiled.slower_compiled(qlora) is None  # and NF4 since its matmul is one opaque op
    slow = _lora_model(tiny)
    slow.model.layers[1].mlp.compiles_slower = "measured slower compiled: 2.0 s against 1.5"
    done = prepare_for_training(slow, None)
    assert "measured slower compiled: 2.0 s against 1.5" in done[-1]  # auto leaves it eager
    assert "forward" not in slow.model.layers[0].__dict__
    short = prepare_for_training(_lora_model(tiny), None, passes=10)[-1]
    assert short.startswith("torch.compile: not used (10 forward/backward passes")
    lora = _lora_model(tiny)
    assert prepare_for_training(lora, None, passes=1000)[-1].startswith("torch.compile: 2 decoder layers")
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    assert compiled.compile_problem(model) == (
        "no C++ compiler found (TorchInductor builds its CPU kernels with one)"
    )
    with pytest.raises(ValueError, match="compile='on' is not possible here: no C\\+\\+ compiler"):
        prepare_for_training(_lora_model(tiny), None, compile="on")
    with pytest.raises(ValueError, match="compile='sometimes'"):
        prepare_for_training(_lora_model(tiny), None, compile="sometimes")


def test_train_config_compile_option() -> None:
    assert TrainConfig().compile == "auto"
    assert TrainConfig.from_dict({"compile": False}).compile == "off"  # YAML's unquoted off
    assert TrainConfig.from_dict({"compile": True}).compile == "on"
    with pytest.raises(ValueError, match="compile='fast'; expected one of auto, on, off"):
        TrainConfig(compile="fast")  # type: ignore[arg-type]


def test_attention_math_for_the_compiler_equals_the_kernel() -> None:
    """The plain-ops attention that compiled layers trace (and recompute in backward) computes
    what the eager kernel does, values and gradients, in bf16 as under autocast."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen).bfloat16().requires_grad_() for h in (6, 2, 2))
    grad = torch.randn(2, 6, 9, 8, generator=gen).bfloat16()
    plain = _attention_math(q, k, v, None, 8**-0.5)
    kernel = _GroupedAttention.apply(q, k, v, None, 8**-0.5)
    torch.testing.assert_close(plain, kernel)
    for a, b in zip(
        torch.autograd.grad(plain, (q, k, v), grad),
        torch.autograd.grad(kernel, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_compiled_dora_trains_like_eager_dora_with_its_norm_computed_outside(tiny) -> None:
    """DoRA's weight norms come from Delta.prepare_compiled (eager, before each compiled call);
    losses and gradients, the magnitude's included, equal eager DoRA's, and no norm outlives a call."""
    from lorakit.methods.dora import DoRADelta

    eager, fast = _lora_model(tiny, lk.DoRAConfig), _lora_model(tiny, lk.DoRAConfig)
    prepare_for_training(fast, None, compile="on")
    deltas = [m for m in fast.modules() if isinstance(m, DoRADelta)]
    seen = []
    original = DoRADelta.prepare_compiled

    def spy(self, layer):
        seen.append(self)
        original(self, layer)

    DoRADelta.prepare_compiled = spy
    try:
        batch = default_collate(tiny.samples(4, seed=3, max_len=14), pad_id=0)
        ref_loss, ref_grads = _step(eager, batch, amp=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            loss, grads = _step(fast, batch, amp=False)
    finally:
        DoRADelta.prepare_compiled = original
    assert set(map(id, seen)) == set(map(id, deltas))  # every DoRA layer got its norm from outside
    assert all(d._compiled_norm is None for d in deltas)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert any("magnitude" in name for name in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_qlora_trains_like_eager_qlora_with_nf4_as_one_op(tiny) -> None:
    """Inside compiled layers the NF4 matmul is the opaque `lorakit::nf4_linear` op (no graph
    break): the same loss and LoRA gradients as the eager QLoRA layers."""
    eager, fast = _lora_model(tiny, lk.QLoRAConfig), _lora_model(tiny, lk.QLoRAConfig)
    prepare_for_training(fast, None, compile="on")
    batch = default_collate(tiny.samples(4, seed=5, max_len=14), pad_id=0)
    ref_loss, ref_grads = _step(eager, batch, amp=False)
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        loss, grads = _step(fast, batch, amp=False)
    assert not torch._dynamo.utils.counters["graph_break"]  # the NF4 op no longer splits the layer
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_longlora_with_s2_trains_like_eager(tiny) -> None:
    """LongLoRA inside compiled layers: S2-Attn as the attention, norms as trained copies
    (functional_call) and LoRA on q/k/v/o, the same loss and gradients as eager layers."""

    def make():
        model = tiny.llama()
        torch.manual_seed(0)
        lk.apply(model, lk.LongLoRAConfig(rank=4, context=2 * model.config.max_position_embeddings))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        return model.train()

    eager, fast = make(), make()
    assert fast.config._attn_implementation == "lorakit_s2"
    done = prepare_for_training(fast, None, compile="on")
    assert done[-1].startswith("torch.compile: 2 decoder layers compiled")
    ids = torch.randint(3, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ref_loss, ref_grads = _step(eager, batch, amp=False)
    loss, grads = _step(fast, batch, amp=False)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert ref_grads.keys() == grads.keys()
    assert any("input_layernorm.adapters" in n for n in grads)  # the norms' copies train
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
