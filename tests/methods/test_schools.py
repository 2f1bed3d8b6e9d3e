"""Bottleneck adapters, prompt and prefix tuning, BitFit, norm tuning and full fine-tuning: each
against a reference written here, and prompt/prefix folders against Hugging Face PEFT both ways."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.models import tiny_gpt2, tiny_llama
from lorakit.train.loss import chunked_causal_lm_loss

N = 4  # virtual tokens


def _ids(model: torch.nn.Module, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)


def _perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


# ---- bottleneck adapters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "placement", "expected"),
    [
        (tiny_llama, "houlsby", {"self_attn.o_proj", "mlp.down_proj"}),
        (tiny_llama, "pfeiffer", {"mlp.down_proj"}),
        (tiny_gpt2, "houlsby", {"attn.c_proj", "mlp.c_proj"}),
        (tiny_gpt2, "pfeiffer", {"mlp.c_proj"}),
    ],
)
def test_adapter_placement(make, placement, expected) -> None:
    model = lk.apply(make(), lk.AdapterConfig(size=4, placement=placement))
    paths = {p for p, m in model.named_modules() if isinstance(m, lk.AdaptedLayer)}
    layers = model.config.num_hidden_layers
    assert len(paths) == layers * len(expected)
    assert {".".join(p.split(".")[-2:]) for p in paths} == expected


def test_adapter_is_the_bottleneck_formula_on_the_layer_output() -> None:
    model = tiny_llama(bias=True)
    lk.apply(model, lk.AdapterConfig(size=5, activation="gelu"))
    _perturb(model)
    layer = model.model.layers[0].mlp.down_proj
    delta = layer.adapters["default"]
    x = torch.randn(3, 64)
    h = layer.base_layer(x)  # the sublayer output, before the residual add
    expected = h + F.linear(
        F.gelu(F.linear(h, delta.adapter_down, delta.adapter_down_bias)),
        delta.adapter_up,
        delta.adapter_up_bias,
    )
    torch.testing.assert_close(layer(x), expected)
    assert delta.adapter_down.shape == (5, 32) and delta.adapter_up.shape == (32, 5)


def test_adapter_refuses_to_share_a_layer_and_explains_merge() -> None:
    model = lk.apply(tiny_llama(), lk.LoRAConfig(rank=2, target_modules=["o_proj"]), "lora")
    with pytest.raises(ValueError, match="must be the only adapter"):
        lk.apply(model, lk.AdapterConfig(size=4), "bottleneck")
    assert lk.adapter_names(model) == ["lora"]  # the failed add left nothing behind
    model = lk.apply(tiny_llama(), lk.AdapterConfig(size=4))
    with pytest.raises(lk.NotMergeableError, match="nonlinear layer"):
        lk.merge(model)


# ---- prompt tuning ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_prompt_equals_prepending_embeddings(make) -> None:
    """The reference: the base model on [P; E(x)] with n leading mask ones, outputs cut after n."""
    model = lk.apply(make(), lk.PromptTuningConfig(num_virtual_tokens=N, init_from="random"))
    ids = _ids(model)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a right-padded row
    prompt = model.lorakit_adapters["default"].prompt_embeddings
    with lk.disable_adapters(model), torch.no_grad():
        embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
        reference = model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, N:]
    out = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(out[keep], reference[keep], atol=1e-5, rtol=0)


def test_prompt_init_from_text_and_vocab() -> None:
    from lorakit.models import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama()
    config = lk.PromptTuningConfig(num_virtual_tokens=5, init_from="text", init_text="ab", tokenizer=tok)
    lk.apply(model, config)
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    expected = table[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(model.lorakit_adapters["default"].prompt_embeddings.detach(), expected)
    with pytest.raises(ValueError, match="needs init_text"):
        lk.PromptTuningConfig(init_from="text")
    with pytest.raises(ValueError, match="init_from must be one of"):
        lk.PromptTuningConfig(init_from="xavier")


@pytest.mark.parametrize(
    "config",
    [
        lk.PromptTuningConfig(num_virtual_tokens=N),
        lk.PrefixTuningConfig(num_virtual_tokens=N, projection_size=8),
    ],
    ids=["prompt", "prefix-mlp"],
)
def test_generate_equals_greedy_full_forward(config) -> None:
    """generate() (KV cache, mask and positions moved by n) picks what full forwards pick."""
    model = lk.apply(tiny_llama(), config)
    _perturb(model, 0.3)
    ids = _ids(model, length=5)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
    with lk.disable_adapters(model):
        base = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert not torch.equal(base, out)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batch_generates_what_each_row_generates_alone(make) -> None:
    """The widened mask keeps pads out and every row sees the prefix (lorakit eval's batches)."""
    model = lk.apply(make().eval(), lk.PrefixTuningConfig(num_virtual_tokens=N))
    short, long = _ids(model, 1, 4, seed=1), _ids(model, 1, 7, seed=2)
    pad = model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], dim=1), long])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    for row, ids in enumerate((short, long)):
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert torch.equal(out[row, -5:], alone[0, -5:])


def test_prompt_trains_through_the_chunked_loss_and_refuses_checkpointing() -> None:
    model = lk.apply(tiny_llama(), lk.PromptTuningConfig(num_virtual_tokens=N)).train()
    ids = _ids(model)
    labels = ids.clone()
    labels[:, :4] = -100
    loss_sum, count = chunked_causal_lm_loss(model, ids, torch.ones_like(ids), labels)
    torch.testing.assert_close(loss_sum / count, model(ids, labels=labels).loss)
    loss_sum.backward()
    (prompt,) = [p for p in model.parameters() if p.requires_grad]
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids)


def test_one_prompt_or_prefix_per_model_and_no_silent_unload() -> None:
    model = lk.apply(tiny_llama(), lk.PromptTuningConfig(num_virtual_tokens=N), "p")
    with pytest.raises(ValueError, match="already holds the prompt/prefix adapter 'p'"):
        lk.apply(model, lk.PrefixTuningConfig(num_virtual_tokens=N), "q")
    assert lk.adapter_names(model) == ["p"]
    with pytest.raises(lk.NotMergeableError, match="cannot be merged"):
        lk.merge_and_unload(model)
    ids = _ids(model)
    base = tiny_llama()(ids).logits
    lk.delete_adapter(model, "p")
    torch.testing.assert_close(model(ids).logits, base)  # the hook is gone with the adapter
    assert not hasattr(model, "lorakit_adapters")


# ---- PEFT interop -------------------------------------------------------------------------------

peft_configs = {
    "prompt": lambda: __import__("peft").PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix": lambda: __import__("peft").PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix-mlp": lambda: __import__("peft").PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16
    ),
}


def _peft_model(make, kind):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make(), peft_configs[kind]()).eval()
    _perturb(model, 0.5)
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("kind", list(peft_configs))
def test_peft_folder_loads_into_lorakit(make, kind, tmp_path) -> None:
    reference = _peft_model(make, kind)
    ids = _ids(reference)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=labels)
    reference.save_pretrained(tmp_path)
    model = make().eval()
    lk.load_adapter(model, tmp_path)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    offset = N if kind == "prompt" else 0  # PEFT returns the virtual positions' logits too
    torch.testing.assert_close(out.logits, expected.logits[:, offset:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize(
    "config",
    [
        lambda: lk.PromptTuningConfig(num_virtual_tokens=N),
        lambda: lk.PrefixTuningConfig(num_virtual_tokens=N),
        lambda: lk.PrefixTuningConfig(num_virtual_tokens=N, projection_size=8),
    ],
    ids=["prompt", "prefix", "prefix-mlp"],
)
def test_lorakit_folder_loads_in_peft(make, config, tmp_path, peft_logits) -> None:
    model = lk.apply(make().eval(), config())
    _perturb(model)
    ids = _ids(model)
    expected = model(ids).logits
    lk.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["num_virtual_tokens"] == N and saved["num_layers"] == 2
    logits = peft_logits(make, tmp_path, ids)
    torch.testing.assert_close(logits[:, logits.shape[1] - ids.shape[1] :], expected, atol=1e-5, rtol=0)


# ---- BitFit, norm tuning, full fine-tuning -------------------------------------------------------


def test_bitfit_trains_exactly_the_biases_and_llama_is_refused_with_the_alternative() -> None:
    model = lk.apply(tiny_gpt2(), lk.BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tiny_gpt2().named_parameters() if n.endswith(".bias")}
    with pytest.raises(ValueError, match="has none.*--method norm"):
        lk.apply(tiny_llama(), lk.BitFitConfig())
    model = lk.apply(tiny_llama(), lk.NormTuningConfig())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    }


def test_in_place_methods_are_the_weights() -> None:
    model = lk.apply(tiny_gpt2(), lk.BitFitConfig())
    _perturb(model)
    ids = _ids(model)
    tuned = model(ids).logits
    with pytest.raises(lk.NotMergeableError, match="already in the weights"):
        lk.merge(model)
    plain = lk.merge_and_unload(model)  # unload keeps the change: it is the weights
    torch.testing.assert_close(plain(ids).logits, tuned)
    assert not any(p.requires_grad for p in plain.parameters())


def test_full_fine_tuning_trains_everything_once_and_keeps_no_copy(tmp_path) -> None:
    make = lambda: tiny_gpt2(dropout=0.0)  # noqa: E731
    model = lk.apply(make(), lk.FullFinetuneConfig())
    assert lk.trainable_parameters(model)[0] == lk.trainable_parameters(model)[1]
    groups = lk.param_groups(model, lr=1e-5)
    assert [g["role"] for g in groups] == ["full"]
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in make().parameters())
    _perturb(model, 0.01)
    with pytest.raises(RuntimeError, match="keeps no copy"), lk.disable_adapters(model):
        pass
    ids = _ids(model)
    lk.save_adapter(model, tmp_path)
    fresh = make()
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_unknown_peft_type_lists_what_lorakit_reads(tmp_path) -> None:
    from lorakit.methods import config_from_peft

    with pytest.raises(ValueError, match="PROMPT_TUNING.*PREFIX_TUNING.*BITFIT"):
        config_from_peft({"peft_type": "IA3"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="encoder-decoder"):
            config_from_peft(
                {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "task_type": "SEQ_2_SEQ_LM"}
            )
