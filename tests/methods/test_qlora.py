"""QLoRA: the 4-bit linear layer against reference math, the method, its folders, merge."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.methods import METHODS
from lorakit.methods.qlora import QUANT_FILE, quantize_as_trained
from lorakit.models import tiny_llama
from lorakit.quant import dequantize_nf4, quantize_nf4
from lorakit.quant.linear import Linear4bit, dequantize_model, quantize_model


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(96, 40, bias=bias)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_and_input_gradient_match_reference(dtype: torch.dtype) -> None:
    base = _linear()
    layer = Linear4bit.from_linear(base, compute_dtype=dtype)
    w = dequantize_nf4(quantize_nf4(base.weight.detach()), dtype)  # (out, in)
    x = _x(3, 5, 96).requires_grad_()
    y = layer(x)
    assert y.dtype == x.dtype  # outside autocast: computed in `dtype`, returned in the input's
    expected = (x.detach().to(dtype) @ w.T + base.bias.detach().to(dtype)).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    g = _x(3, 5, 40)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g.to(dtype) @ w).float(), atol=0, rtol=0)
    assert not any(p.requires_grad for p in layer.parameters())


def test_backward_keeps_no_full_precision_weight() -> None:
    layer = Linear4bit.from_linear(_linear(bias=False), compute_dtype=torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(_x(4, 96).requires_grad_()).sum().backward()
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 40]


def test_autocast_computes_in_its_dtype() -> None:
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(_x(2, 96)).dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_kernel_switch_runs_bitsandbytes_on_the_same_bytes(double_quant: bool) -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    base = nn.Linear(128, 40)  # rows a multiple of the block: bnb 0.50.2's CPU dequantize is wrong otherwise
    ours = Linear4bit.from_linear(base, double_quant=double_quant, compute_dtype=torch.float32)
    bnb = Linear4bit.from_linear(
        base, double_quant=double_quant, compute_dtype=torch.float32, kernel="bitsandbytes"
    )
    x = _x(3, 128).requires_grad_()
    w = F.dequantize_4bit(bnb.packed.view(-1, 1), bnb.bnb_quant_state(torch.float32))
    torch.testing.assert_close(bnb(x), x @ w.T + base.bias, atol=1e-5, rtol=0)
    bnb(x).sum().backward()
    assert x.grad is not None
    if not double_quant:  # with it, the 8-bit scale codes may differ by one step (see test_nf4)
        torch.testing.assert_close(bnb(x), ours(x), atol=1e-5, rtol=0)


def test_apply_quantizes_linear_layers_but_not_the_head_or_embeddings() -> None:
    model = tiny_llama()
    lk.apply(model, lk.QLoRAConfig(rank=4))
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert quantized and all(".base_layer" in n for n in quantized)  # every one carries LoRA
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert quantized[0].endswith("q_proj.base_layer")
    assert model.get_submodule(quantized[0]).compute_dtype == torch.bfloat16
    assert METHODS["qlora"] is lk.QLoRAConfig


def _qlora_with_nonzero_adapter(scale: float) -> tuple[nn.Module, torch.Tensor]:
    """A tiny Llama (with biases) under QLoRA in fp32 compute, every trainable tensor moved by
    `scale` noise so the adapter changes the outputs; and a fixed batch of ids."""
    model = tiny_llama(bias=True).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    lk.apply(model, lk.QLoRAConfig(rank=4, alpha=8, compute_dtype="float32"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model, ids


def test_folder_is_plain_lora_and_loads_on_the_full_precision_base(tmp_path, peft_logits) -> None:
    model, ids = _qlora_with_nonzero_adapter(0.05)
    qlora_out = model(ids).logits
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert json.loads((tmp_path / QUANT_FILE).read_text())["blocksize"] == 64
    full = tiny_llama(bias=True).eval()
    lk.load_adapter(full, tmp_path)  # plain LoRA on the full-precision base
    torch.testing.assert_close(peft_logits(lambda: tiny_llama(bias=True), tmp_path, ids), full(ids).logits)
    rebuilt = tiny_llama(bias=True).eval()
    record = quantize_as_trained(rebuilt, tmp_path)
    assert record is not None
    for m in rebuilt.modules():
        if isinstance(m, Linear4bit):
            m.compute_dtype = torch.float32
    lk.load_adapter(rebuilt, tmp_path)  # the very 4-bit base it trained on: the same outputs
    torch.testing.assert_close(rebuilt(ids).logits, qlora_out, atol=1e-6, rtol=0)


def test_merge_and_unload_writes_full_precision_and_requantizing_costs() -> None:
    model, ids = _qlora_with_nonzero_adapter(0.1)
    expected = model(ids).logits
    plain = lk.merge_and_unload(model)
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)
    quantize_model(plain, compute_dtype=torch.float32)  # what merging "in 4 bits" amounts to
    assert (plain(ids).logits - expected).abs().max() > 1e-3


def test_dequantize_model_restores_plain_linear_layers() -> None:
    model = tiny_llama()
    quantize_model(model)
    names = dequantize_model(model)
    assert names and not any(isinstance(m, Linear4bit) for m in model.modules())
    assert isinstance(model.get_submodule(names[0]), nn.Linear)


def test_bad_options_and_writes_into_4_bit_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="pissa"):
        lk.QLoRAConfig(init="pissa")
    with pytest.raises(ValueError, match="blocksize"):
        lk.QLoRAConfig(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        lk.QLoRAConfig(compute_dtype="int8")
    model = tiny_llama()
    lk.apply(model, lk.QLoRAConfig(rank=2))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(lk.NotMergeableError, match="4 bits"):
        layer.set_weight_out_in(layer.weight_out_in())


def test_quantizing_unmaps_the_safetensors_file_it_read(tmp_path) -> None:
    """The replaced fp32 weights were pages of one file mapping; a tensor left in it (the
    embedding) would keep every page counted in the process's memory."""
    import gc

    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return weights in maps.read()

    model = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    if not mapped():
        pytest.skip("this safetensors/transformers pair copies the weights instead of mapping the file")
    quantize_model(model)
    gc.collect()
    assert not mapped()
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
