"""Whole modules trained beside an adapter (`modules_to_save`, core/copies.py): exactness, PEFT's
format both ways, tied heads, merge, the fused loss and the refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.copies import ModuleCopyDelta
from lorakit.models import tiny_llama
from lorakit.train.loss import _row_replacing_head, chunked_causal_lm_loss

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
SAVED = ["embed_tokens", "norm"]


def _make(tied: bool):
    return lambda: tiny_llama(tie_word_embeddings=tied).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapted(make, tied_names=SAVED, seed: int = 3):
    model = make()
    torch.manual_seed(seed)  # LoRA's A init draws from the global generator
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8, target_modules=QKVO, modules_to_save=list(tied_names)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _copies(model) -> dict[str, ModuleCopyDelta]:
    return {
        path: layer.adapters["default"]
        for path, layer in lk.core.model.adapted_layers(model)
        if "default" in layer.adapters and isinstance(layer.adapters["default"], ModuleCopyDelta)
    }


@pytest.mark.parametrize("tied", [False, True])
def test_copies_start_at_the_base_and_select_by_peft_suffix_rule(tied) -> None:
    make = _make(tied)
    base = make()
    ids = _ids(base.config.vocab_size)
    expected = base(ids).logits
    model = make()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=QKVO, modules_to_save=SAVED))
    assert torch.equal(model(ids).logits, expected)
    paths = set(_copies(model))
    norms = {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert paths == {"model.embed_tokens", "model.norm", *norms} | ({"lm_head"} if tied else set())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n for n in trainable)  # a tied head trains as the embedding's copy
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_norm_copy_is_rmsnorm_with_the_trained_weight() -> None:
    model = _adapted(_make(False))
    layer = model.model.layers[0].input_layernorm
    copy = layer.adapters["default"]
    x = torch.randn(2, 5, 32)
    base = layer.base_layer
    reference = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + base.variance_epsilon) * copy.weight
    torch.testing.assert_close(layer(x), reference, atol=1e-6, rtol=0)
    assert not torch.equal(copy.weight, base.weight)  # the base tensor is untouched


@pytest.mark.parametrize("tied", [False, True])
def test_folder_is_peft_modules_to_save_and_loads_both_ways(tied, tmp_path, peft_logits) -> None:
    make = _make(tied)
    model = _adapted(make)
    ids = _ids(model.config.vocab_size)
    expected = model(ids).logits
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == SAVED and config["ensure_weight_tying"] is tied
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in keys
    assert "base_model.model.model.layers.1.post_attention_layernorm.weight" in keys
    assert ("base_model.model.lm_head.weight" in keys) is tied  # PEFT's loader asks for it when tied
    torch.testing.assert_close(peft_logits(make, tmp_path, ids), expected, atol=1e-5, rtol=0)
    again = make()
    lk.load_adapter(again, tmp_path)
    assert torch.equal(again(ids).logits, expected)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_trained_folder_loads_into_lorakit(tied, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    make = _make(tied)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=QKVO,
        modules_to_save=SAVED,
        init_lora_weights=False,
        ensure_weight_tying=tied,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(make(), config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))
    ids = _ids(reference.config.vocab_size)
    expected = reference(ids).logits
    reference.save_pretrained(tmp_path)
    model = make()
    lk.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_disable_merge_unmerge_delete() -> None:
    make = _make(True)
    base_logits = make()(_ids(make().config.vocab_size)).logits
    model = _adapted(make)
    ids = _ids(model.config.vocab_size)
    trained = model(ids).logits
    with lk.disable_adapters(model):
        assert torch.equal(model(ids).logits, base_logits)
    lk.merge(model)
    torch.testing.assert_close(model(ids).logits, trained, atol=1e-5, rtol=0)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight  # still tied
    lk.unmerge(model)
    with lk.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
    lk.delete_adapter(model, "default")
    assert type(model.model.norm).__name__ == "LlamaRMSNorm" and type(model.lm_head) is torch.nn.Linear
    torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_loss_on_a_copied_head_equals_the_plain_one(tied) -> None:
    make = _make(tied)
    names = SAVED if tied else [*SAVED, "lm_head"]
    grads = []
    for fused in (True, False):
        model = _adapted(make, names).train()
        ids = _ids(model.config.vocab_size)
        if fused:
            assert _row_replacing_head(model.get_output_embeddings()) is not None  # the fused kernel
            total, count = chunked_causal_lm_loss(model, ids, torch.ones_like(ids), ids.clone())
            loss = total / count
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    (fused_loss, fused_grads), (plain_loss, plain_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=0)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    embed = "model.embed_tokens.adapters.default.weight"
    assert fused_grads[embed].abs().sum() > 0  # the copy trains (through the head too, when tied)


def test_a_step_moves_the_copies_and_leaves_the_base() -> None:
    model = _adapted(_make(True)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids(model.config.vocab_size)
    optimizer = torch.optim.AdamW(lk.param_groups(model, 1e-2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name
    roles = {g["role"] for g in lk.param_groups(model, 1e-3)}
    assert {"norm", "full", "A", "B"} <= roles


def test_refusals() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="no module name ends with 'nothing'"):
        lk.apply(model, lk.LoRAConfig(target_modules=QKVO, modules_to_save=["nothing"]))
    assert not lk.core.model.registry(model).configs  # all or nothing
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        lk.apply(model, lk.LoRAConfig(target_modules=QKVO, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="either adapted .* or trained whole"):
        lk.apply(model, lk.LoRAConfig(target_modules=QKVO, modules_to_save=["q_proj"]))
    with pytest.raises(ValueError, match="no submodules"):
        lk.apply(model, lk.LoRAConfig(target_modules=["v_proj"], modules_to_save=["self_attn"]))
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    lk.apply(model, lk.LoRAConfig(target_modules=QKVO, modules_to_save=["norm"]), "a")
    lk.apply(model, lk.LoRAConfig(target_modules=["v_proj"], modules_to_save=["norm"]), "b")
    lk.set_active(model, ["a", "b"])
    with pytest.raises(RuntimeError, match="activate one of them at a time"):
        model(_ids(model.config.vocab_size))


def test_alora_refuses_whole_modules() -> None:
    with pytest.raises(ValueError, match="aLoRA acts only from its invocation"):
        lk.ALoRAConfig(invocation_tokens=[3], modules_to_save=["norm"])
