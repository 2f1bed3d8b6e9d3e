"""target_modules matching and several named adapters on one model."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.core.contract import AdaptedLayer
from lorakit.core.target import find_targets
from lorakit.models import tiny_gpt2, tiny_llama


def _leaves(paths: list[str]) -> set[str]:
    return {p.split(".")[-1] for p in paths}


def test_all_linear_skips_the_output_head() -> None:
    paths = find_targets(tiny_llama(), "all-linear")
    assert _leaves(paths) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(paths) == 14
    assert _leaves(find_targets(tiny_gpt2(), "all-linear")) == {"c_attn", "c_proj", "c_fc"}


def test_list_entries_match_exact_or_dot_bounded_suffix() -> None:
    model = tiny_llama()
    assert find_targets(model, ["self_attn.q_proj"]) == find_targets(model, ["q_proj"])
    assert find_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="'proj' matched no module"):
        find_targets(model, ["proj"])  # not a dot-bounded suffix of anything


def test_unknown_name_in_a_list_is_an_error_that_lists_modules() -> None:
    with pytest.raises(ValueError, match=r"'q_prj' matched no module.*include: q_proj, k_proj"):
        find_targets(tiny_llama(), ["q_proj", "q_prj"])


def test_non_adaptable_module_is_named() -> None:
    with pytest.raises(ValueError, match="names a LlamaRMSNorm, which cannot be adapted"):
        find_targets(tiny_llama(), ["input_layernorm"])


def test_regex_is_a_full_match_and_exclude_applies() -> None:
    model = tiny_llama()
    assert _leaves(find_targets(model, r".*\.(q|v)_proj")) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="no module matched"):
        find_targets(model, "q_proj")  # a string is a full-match regex, as in PEFT
    paths = find_targets(model, "all-linear", exclude_modules=["mlp.down_proj", "k_proj"])
    assert _leaves(paths) == {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    with pytest.raises(ValueError, match="minus exclude_modules"):
        find_targets(model, ["q_proj"], exclude_modules=r".*")


def test_apply_freezes_the_base_and_summary_reports_it() -> None:
    model = tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = lk.trainable_parameters(model)
    assert trainable == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # q: 32->32, v: 32->16 (2 KV heads)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    text = lk.summary(model)
    assert "q_proj, v_proj" in text and f"trainable params: {trainable:,}" in text
    assert f"{trainable * 4:,} bytes" in text  # fp32 adapter tensors


def _out(model, ids):
    return model(ids).logits


def test_several_named_adapters_add_activate_delete() -> None:
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (1, 6))
    base = _out(model, ids)
    lk.apply(model, lk.LoRAConfig(rank=2, target_modules=["q_proj"], init="gaussian"), "a")
    lk.apply(model, lk.LoRAConfig(rank=3, target_modules=["q_proj", "v_proj"], init="gaussian"), "b")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lk.Delta):
                m.lora_B.normal_(std=0.2)
    assert lk.active_adapters(model) == ["b"]
    q_proj, x = model.model.layers[0].self_attn.q_proj, torch.randn(3, 32)
    layer_b = q_proj(x)
    lk.set_active(model, "a")
    only_a, layer_a = _out(model, ids), q_proj(x)
    lk.set_active(model, ["a", "b"])
    layer_base = q_proj.base_layer(x)
    torch.testing.assert_close(q_proj(x) - layer_base, (layer_a - layer_base) + (layer_b - layer_base))
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        lk.set_active(model, "c")
    with lk.disable_adapters(model):
        torch.testing.assert_close(_out(model, ids), base)
    lk.delete_adapter(model, "b")
    assert lk.adapter_names(model) == ["a"] and lk.active_adapters(model) == ["a"]
    v_proj = model.model.layers[0].self_attn.v_proj
    assert not isinstance(v_proj, AdaptedLayer)  # no adapter left there: the original module is back
    torch.testing.assert_close(_out(model, ids), only_a)
    with pytest.raises(ValueError, match="already exists"):
        lk.apply(model, lk.LoRAConfig(target_modules=["q_proj"]), "a")


def test_inactive_adapter_does_not_train() -> None:
    model = tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=2, target_modules=["q_proj"]), "a")
    lk.apply(model, lk.LoRAConfig(rank=2, target_modules=["q_proj"]), "b")
    a = model.model.layers[0].self_attn.q_proj.adapters["a"]
    assert not a.lora_A.requires_grad
    assert model.model.layers[0].self_attn.q_proj.adapters["b"].lora_A.requires_grad


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="init must be one of"):
        lk.LoRAConfig(init="svd")
    with pytest.raises(ValueError, match="rank must be a positive"):
        lk.LoRAConfig(rank=0)


@pytest.mark.parametrize("training", [False, True])
def test_new_adapters_follow_the_models_training_mode(training: bool) -> None:
    # apply() after model.eval(): dropout in the new adapters must stay off at inference
    model = tiny_llama()
    model.train(training)
    lk.apply(model, lk.LoRAConfig(rank=2, alpha=4, dropout=0.5, target_modules="all-linear"))
    new_modules = [m for layer in model.modules() if isinstance(layer, AdaptedLayer) for m in layer.modules()]
    assert new_modules and all(m.training is training for m in new_modules)
    if not training:
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()  # B = 0 at init would hide dropout
            torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_lora_fuses_its_addition_except_under_autocast_training_and_computes_the_same() -> None:
    """LoRA adds its branch with one addmm without gradients and in full-precision training; under
    autocast with gradients it keeps the separate ops. Each gives the reference formula
    out + scale * (x A^T) B^T, and the fused training path its gradients for x, A and B."""
    from torch import nn
    from torch.nn import functional as F

    from lorakit.methods.lora import LoRADelta

    layer = nn.Linear(12, 10)
    lk_model = nn.Sequential(layer)
    lk.apply(lk_model, lk.LoRAConfig(rank=3, alpha=6, target_modules=["0"], init="gaussian"))
    adapted = lk_model[0]
    delta = adapted.adapters["default"]
    assert isinstance(delta, LoRADelta)
    with torch.no_grad():
        delta.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    calls = []
    real_addmm = torch.addmm
    try:
        torch.addmm = lambda *a, **k: calls.append(1) or real_addmm(*a, **k)  # type: ignore[assignment]
        with torch.no_grad():
            fused = adapted(x)
        trained = adapted(x)
        assert len(calls) == 2  # no grad, and fp32 training
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapted(x)
        assert len(calls) == 2  # autocast training: the separate ops
    finally:
        torch.addmm = real_addmm
    grads = torch.autograd.grad(trained.square().sum(), (x, delta.lora_A, delta.lora_B))

    def reference(x, a, b):
        return F.linear(x, adapted.base_layer.weight, adapted.base_layer.bias) + 2.0 * (x @ a.T) @ b.T

    expected = reference(x, delta.lora_A, delta.lora_B)
    torch.testing.assert_close(fused, expected.detach())
    torch.testing.assert_close(trained, expected)
    wanted = torch.autograd.grad(expected.square().sum(), (x, delta.lora_A, delta.lora_B))
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want)


def test_lora_without_gradients_applies_dropout_only_in_training_mode() -> None:
    """The no-grad fast path reads the dropout module itself: active while training (two calls
    differ), off in eval mode (the reference formula)."""
    from torch import nn

    layer = nn.Linear(16, 8, bias=False)
    model = nn.Sequential(layer)
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=4, dropout=0.5, target_modules=["0"], init="gaussian"))
    adapted = model[0]
    delta = adapted.adapters["default"]
    with torch.no_grad():
        delta.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    base = x @ adapted.base_layer.weight.T
    with torch.no_grad():
        model.train()
        first, second = adapted(x), adapted(x)
        assert not torch.allclose(first, second)  # two dropout masks
        model.eval()
        torch.testing.assert_close(adapted(x), base + (x @ delta.lora_A.T) @ delta.lora_B.T)
