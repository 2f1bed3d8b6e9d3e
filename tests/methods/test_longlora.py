"""LongLoRA as a method (methods/longlora.py): the trainable set, the positions set before the adapter
and recorded in the folder, S2-Attn in training only, loading back (lorakit and PEFT), refusals."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.core.copies import ModuleCopyDelta
from lorakit.methods.longlora import RECORD, extend_as_trained
from lorakit.models import tiny_llama
from lorakit.options import method_config, split_options
from lorakit.train.s2_attention import RATIO_ATTRIBUTE

WINDOW = 512  # tiny_llama's max_position_embeddings


def _make(tied: bool = True):
    return lambda: tiny_llama(tie_word_embeddings=tied).eval()


def _ids(model, length: int = 16) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


def _trained(make, **kw):
    model = make()
    torch.manual_seed(0)
    lk.apply(model, lk.LongLoRAConfig(**kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_trainable_set_is_lora_qkvo_plus_embedding_and_every_norm() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    lk.apply(model, lk.LongLoRAConfig(context=4 * WINDOW))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert {n.split(".")[-4] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    copied = {n.removesuffix(".adapters.default.weight") for n in trainable if "lora_" not in n}
    layers = model.config.num_hidden_layers
    norms = {
        f"model.layers.{i}.{k}"
        for i in range(layers)
        for k in ("input_layernorm", "post_attention_layernorm")
    }
    assert copied == {"model.embed_tokens", "model.norm", *norms}  # lm_head: tied, moves with the embedding
    d, v, kv = model.config.hidden_size, model.config.vocab_size, 2 * 32 // 4  # 2 kv heads of 8
    r = 8
    expected = layers * r * ((d + d) + (d + kv) + (d + kv) + (d + d)) + v * d + (2 * layers + 1) * d
    assert sum(trainable.values()) == expected  # the formula: LoRA on q/k/v/o + embedding + norms
    assert isinstance(model.lm_head.adapters["default"], ModuleCopyDelta)
    assert model.config.max_position_embeddings == 4 * WINDOW
    assert (
        model.config.rope_parameters["rope_type"] == "linear"
        and model.config.rope_parameters["factor"] == 4.0
    )
    assert (
        getattr(model.config, RATIO_ATTRIBUTE) == 0.25 and model.config._attn_implementation == "lorakit_s2"
    )


def test_s2_in_training_full_attention_in_eval() -> None:
    model = _trained(_make(), context=2 * WINDOW)
    ids = _ids(model, 32)
    eval_logits = model.eval()(ids).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(model(ids).logits, eval_logits, atol=1e-5, rtol=0)  # eval: full attention
    train_sdpa = model.train()(ids).logits
    model.set_attn_implementation("lorakit_s2")
    train_s2 = model.train()(ids).logits
    assert not torch.allclose(train_s2, train_sdpa, atol=1e-4)  # training: grouped attention
    torch.testing.assert_close(
        train_s2[:, :4], train_sdpa[:, :4], atol=1e-5, rtol=0
    )  # inside the first group


def test_folder_records_positions_and_loads_back(tmp_path, peft_logits) -> None:
    make = _make()
    model = _trained(make, context=4 * WINDOW)
    ids = _ids(model)
    expected = model.eval()(ids).logits
    lk.save_adapter(model, tmp_path)
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["rope_parameters"]["factor"] == 4.0 and record["original_window"] == WINDOW
    assert record["max_position_embeddings"] == 4 * WINDOW and record["context"] == 4 * WINDOW
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["embed_tokens", "norm"]

    plain = make()
    with pytest.raises(ValueError, match="position interpolation .* extend it first"):
        lk.load_adapter(plain, tmp_path)
    assert not lk.core.model.registry(plain).configs  # nothing loaded
    lk.load_as_trained(plain, None, tmp_path)
    torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=0)

    def extended_base():  # what the docs tell PEFT users: the recorded positions on the config
        base = make()
        extend_as_trained(base, tmp_path)
        return base

    torch.testing.assert_close(peft_logits(extended_base, tmp_path, ids), expected, atol=1e-5, rtol=0)


def test_merge_keeps_the_extended_model() -> None:
    model = _trained(_make(), context=2 * WINDOW)
    ids = _ids(model)
    expected = model.eval()(ids).logits
    lk.merge_and_unload(model)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    assert model.config.max_position_embeddings == 2 * WINDOW


def test_failed_apply_restores_positions_and_attention() -> None:
    model = tiny_llama()
    before = (
        dict(model.config.rope_parameters),
        model.config.max_position_embeddings,
        model.config._attn_implementation,
    )
    with pytest.raises(ValueError):
        lk.apply(model, lk.LongLoRAConfig(context=2 * WINDOW, target_modules=["nothing_here"]))
    lk.apply(model, lk.LoRAConfig(target_modules=["q_proj"]), "other")  # the name "default" is free
    with pytest.raises(ValueError, match="either adapted"):
        lk.apply(model, lk.LongLoRAConfig(context=2 * WINDOW, modules_to_save=["q_proj"]))
    after = (
        dict(model.config.rope_parameters),
        model.config.max_position_embeddings,
        model.config._attn_implementation,
    )
    assert after == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"context": 256}, "not beyond the model's window of 512"),
        ({"context": 1028}, "multiple of 8"),
        ({"context": 1024, "rope": "ntk"}, "rope must be one of linear, yarn"),
        ({"context": 1024, "s2_ratio": 0.75}, "s2_ratio must be 0"),
    ],
)
def test_bad_context_refused_clearly(options, message) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        lk.apply(model, lk.LongLoRAConfig(**options))
    assert model.config.max_position_embeddings == WINDOW


def test_cli_options_reach_the_config() -> None:
    run, train = split_options({"method": "longlora", "context": 16384, "s2_ratio": 0.125, "rope": "yarn"})
    config = method_config(run)
    assert (config.context, config.s2_ratio, config.rope, config.rank, config.alpha) == (
        16384,
        0.125,
        "yarn",
        8,
        16,
    )
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.modules_to_save == ["embed_tokens", "norm"] and train.gradient_checkpointing
    run, _ = split_options({"method": "longlora", "modules_to_save": "none"})
    assert method_config(run).modules_to_save == []  # the paper's "LoRA only" arm
    run, _ = split_options({"method": "lora", "modules_to_save": "embed_tokens,norm"})
    assert method_config(run).modules_to_save == ["embed_tokens", "norm"]
    with pytest.raises(ValueError, match="--context does not apply to --method lora"):
        split_options({"method": "lora", "context": 4096})
