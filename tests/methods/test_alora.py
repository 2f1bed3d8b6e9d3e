"""aLoRA against a reference written here and against Hugging Face PEFT, and the per-forward context
on every path (plain forward, chunked loss, gradient checkpointing, compiled layers, cached and
chunked generation). The list of later-methods.md section 1.8, numbered in the test names."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import lorakit as lk
from lorakit.core.context import explicit_values
from lorakit.core.kvcache import cache_argument, output_cache
from lorakit.methods.alora import assistant_header, last_occurrence
from lorakit.models import tiny_llama, tiny_tokenizer
from lorakit.train.loss import chunked_causal_lm_loss

INV = [10, 11, 12]
IDS = torch.tensor(
    [
        [5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23, 24, 25],
        [10, 11, 12, 4, 5, 6, 10, 11, 12, 30, 31, 32, 33, 34],  # two occurrences: the last one counts
    ]
)
STARTS = [5, 6]


def _alora(targets="all-linear", seed: int = 0) -> torch.nn.Module:
    model = lk.apply(
        tiny_llama(), lk.ALoRAConfig(rank=4, alpha=8, invocation_tokens=INV, target_modules=targets)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def _reference(model: torch.nn.Module, ids: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """aLoRA by hand: for each row, the base for t < start, base + s B A x for t >= start, computed
    by running the row twice with the adapter off and on and taking per-position outputs; valid
    because each layer's delta acts per token, so a position's output depends on earlier ones only
    through attention, which we handle by splicing the per-layer activations: here, instead, we use
    the exact equivalence for the *first* adapted layer input, checked across the whole stack by
    running one row at a time with an explicit start (a different code path: explicit_values)."""
    rows = []
    for row, start in zip(ids, starts, strict=True):
        with explicit_values(model, alora_start=torch.tensor([start])):
            rows.append(model(input_ids=row[None]).logits)
    return torch.cat(rows)


def test_last_occurrence_finds_the_last_full_match() -> None:
    assert last_occurrence(IDS, INV).tolist() == STARTS
    assert last_occurrence(torch.tensor([[10, 11, 13, 10, 11]]), INV).tolist() == [
        torch.iinfo(torch.long).max
    ]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "v_proj"], ["down_proj"]])
def test_1_positions_before_the_start_are_the_base_models(targets) -> None:
    model = _alora(targets)
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
        with lk.disable_adapters(model):
            base = model(input_ids=IDS).logits
    for row, start in enumerate(STARTS):
        torch.testing.assert_close(ours[row, :start], base[row, :start], rtol=0, atol=0)
        assert (ours[row, start:] - base[row, start:]).abs().max() > 1e-3


def test_1_the_math_is_lora_from_the_start_on() -> None:
    """One adapted linear on a hand-built input: y = W x + [t >= start] s B A x."""
    model = _alora(["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.adapters["default"]
    captured = {}
    layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0], y=out))
    with torch.no_grad():
        model(input_ids=IDS)
    x, y = captured["x"], captured["y"]
    on = (torch.arange(IDS.shape[1])[None] >= torch.tensor(STARTS)[:, None]).float()[..., None]
    expected = F.linear(x, layer.base_layer.weight) + on * delta.scale * (x @ delta.lora_A.T @ delta.lora_B.T)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_2_a_base_cache_plus_an_adapted_tail_equals_a_full_forward() -> None:
    model = _alora()
    name = cache_argument(model)
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        cache = DynamicCache(config=model.config)
        with lk.disable_adapters(model):  # the conversation so far, on the base weights
            model(input_ids=IDS[:, :5], use_cache=True, **{name: cache})
        tail = model(input_ids=IDS[:, 5:], use_cache=True, **{name: cache}).logits
    torch.testing.assert_close(tail, full[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", range(1, 15))
def test_3_chunked_prefill_of_any_size_equals_one_prefill(chunk) -> None:
    """Even a chunk boundary inside the invocation: the tokens computed before the start was known
    are recomputed within the next call (their cache entries are replaced)."""
    model = _alora()
    name = cache_argument(model)
    nxt = torch.tensor([[40], [41]])
    with torch.no_grad():
        full = model(input_ids=IDS).logits
        continued = model(input_ids=torch.cat([IDS, nxt], 1)).logits[:, -1]
        cache = DynamicCache(config=model.config)
        for s in range(0, IDS.shape[1], chunk):
            last = model(input_ids=IDS[:, s : s + chunk], use_cache=True, **{name: cache}).logits
        step = model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1]
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, continued, rtol=1e-5, atol=1e-5)


def test_3_peft_offsets_from_the_end_differ_under_chunked_prefill(tmp_path) -> None:
    """The documented difference: PEFT counts the start from the end of each call."""
    peft = pytest.importorskip("peft")
    model = _alora()
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    row = IDS[:1]
    with torch.no_grad():
        ours_full = model(input_ids=row).logits[:, -1]
        torch.testing.assert_close(theirs(input_ids=row).logits[:, -1], ours_full, rtol=1e-5, atol=1e-5)
        one = theirs.generate(
            input_ids=row, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        chunked = theirs.generate(
            input_ids=row,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            prefill_chunk_size=4,
        )
    assert (one.logits[0] - chunked.logits[0]).abs().max() > 1e-3  # PEFT: chunking changes the result
    torch.testing.assert_close(one.logits[0], ours_full, rtol=1e-4, atol=1e-4)


def test_4_rolling_back_restores_the_base_cache_exactly() -> None:
    """Base history, an adapter turn, crop back: the base continuation is bit for bit the one of a
    cache the adapter never touched (and close to a full base forward)."""
    model = _alora()
    name = cache_argument(model)
    history, rest = IDS[:, :5], torch.tensor([[50, 51, 52], [53, 54, 55]])
    continuations = []
    with torch.no_grad():
        for invoke in (False, True):
            cache = DynamicCache(config=model.config)
            with lk.disable_adapters(model):
                model(input_ids=history, use_cache=True, **{name: cache})
            if invoke:
                model(input_ids=IDS[:, 5:], use_cache=True, **{name: cache})  # the adapter's turn
                cache.crop(5 - cache.get_seq_length())
            with lk.disable_adapters(model):
                continuations.append(model(input_ids=rest, use_cache=True, **{name: cache}).logits)
            with lk.disable_adapters(model):
                base_full = model(input_ids=torch.cat([history, rest], 1)).logits[:, -3:]
    torch.testing.assert_close(continuations[1], continuations[0], rtol=0, atol=0)
    torch.testing.assert_close(continuations[1], base_full, rtol=1e-5, atol=1e-5)


def test_5_a_row_without_the_invocation_is_the_base_with_one_warning() -> None:
    model = _alora()
    ids = torch.tensor([[5, 6, 7, 8, 9, 13, 14]])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = model(input_ids=ids).logits
        model(input_ids=ids)
        with lk.disable_adapters(model):
            base = model(input_ids=ids).logits
    torch.testing.assert_close(ours, base, rtol=0, atol=0)
    assert sum("hold no aLoRA invocation" in str(w.message) for w in caught) == 1


def test_6_a_left_padded_batch_equals_each_row_alone() -> None:
    model = _alora()
    rows = [IDS[0, 2:], IDS[1]]  # lengths 12 and 14
    width = max(len(r) for r in rows)
    padded = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])
    mask = torch.stack([F.pad(torch.ones(len(r), dtype=torch.long), (width - len(r), 0)) for r in rows])
    with torch.no_grad():
        batch = model(input_ids=padded, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(r) :], alone, rtol=1e-4, atol=1e-5)
        out = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for i, r in enumerate(rows):
            alone = model.generate(input_ids=r[None], max_new_tokens=4, do_sample=False)
            assert out[i, width:].tolist() == alone[0, len(r) :].tolist()


def test_7_a_loss_before_the_start_gives_no_gradient() -> None:
    model = _alora().train()
    labels = IDS.clone()
    labels[0, 5:] = -100
    labels[1, 6:] = -100
    total, count = chunked_causal_lm_loss(model, IDS, torch.ones_like(IDS), labels)
    (total / count).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    labels = IDS.clone()
    total, count = chunked_causal_lm_loss(model, IDS, torch.ones_like(IDS), labels)
    (total / count).backward()
    assert all(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)


def test_8_a_base_cache_covering_the_invocation_and_merging_are_refused() -> None:
    model = _alora()
    name = cache_argument(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with lk.disable_adapters(model):
            model(input_ids=IDS[:, :7], use_cache=True, **{name: cache})  # holds 10, 11 of row 0
        with pytest.raises(ValueError, match="computed without the adapter"):
            model(input_ids=IDS[:, 7:], use_cache=True, **{name: cache})
    with pytest.raises(lk.NotMergeableError, match="aLoRA cannot be merged"):
        lk.merge(model)


def test_8_inputs_embeds_need_an_explicit_start() -> None:
    model = _alora()
    embeds = model.get_input_embeddings()(IDS[:1])
    with torch.no_grad():
        with pytest.raises(ValueError, match="inputs_embeds"):
            model(inputs_embeds=embeds)
        with explicit_values(model, alora_start=torch.tensor([STARTS[0]])):
            via_embeds = model(inputs_embeds=embeds).logits
        torch.testing.assert_close(via_embeds, model(input_ids=IDS[:1]).logits, rtol=1e-5, atol=1e-6)


def test_9_peft_loads_ours_and_we_load_peft_with_the_same_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _alora()
    lk.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=INV,
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    made = peft.get_peft_model(tiny_llama(), config).eval()
    made.save_pretrained(tmp_path / "peft")
    mine = tiny_llama()
    loaded = lk.load_adapter(mine, tmp_path / "peft")
    assert isinstance(loaded, lk.ALoRAConfig) and loaded.invocation_tokens == INV
    with torch.no_grad():
        torch.testing.assert_close(
            mine(input_ids=IDS).logits, made(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )


def test_cached_generation_equals_generation_without_a_cache_and_beam_search_too() -> None:
    model = _alora()
    with torch.no_grad():
        cached = model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False)
        uncached = model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, use_cache=False)
        beams = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, num_beams=3)
        beams_uncached = model.generate(
            input_ids=IDS, max_new_tokens=4, do_sample=False, num_beams=3, use_cache=False
        )
    assert cached.tolist() == uncached.tolist()
    assert beams.tolist() == beams_uncached.tolist()


def test_gradient_checkpointing_recomputes_with_the_same_context(checkpointing_grads) -> None:
    plain, checkpointed = checkpointing_grads(_alora, IDS)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_default_invocation_is_the_assistant_header() -> None:
    tokenizer = tiny_tokenizer()
    assert assistant_header(tokenizer) == "<|im_start|>assistant"
    config = lk.ALoRAConfig(tokenizer=tokenizer)
    assert (
        config.invocation_tokens == tokenizer("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    )
    assert lk.ALoRAConfig(invocation="<|im_start|>check", tokenizer=tokenizer).invocation_tokens[0] == (
        tokenizer.convert_tokens_to_ids("<|im_start|>")
    )
    with pytest.raises(ValueError, match="needs its invocation"):
        lk.ALoRAConfig()


def test_a_recomputation_after_a_newer_forward_is_refused() -> None:
    model = _alora().train()
    total, count = chunked_causal_lm_loss(model, IDS, torch.ones_like(IDS), IDS.clone())
    with torch.no_grad():
        model(input_ids=IDS[:1, :9])  # another call in between
    from lorakit.train.trainer import enable_activation_checkpointing

    enable_activation_checkpointing(model)
    total, count = chunked_causal_lm_loss(model, IDS, torch.ones_like(IDS), IDS.clone())
    model(input_ids=IDS[:1, :9])  # sets a context of another shape before backward recomputes
    with pytest.raises(RuntimeError, match="outside the decoder call"):
        (total / count).backward()


def test_output_cache_helper_sees_the_adapted_cache() -> None:
    model = _alora()
    out = model(input_ids=IDS, use_cache=True)
    assert output_cache(out).get_seq_length() == IDS.shape[1]


def test_compiled_layers_read_the_context() -> None:
    """Compiled decoder layers (lorakit.train.compiled) train aLoRA as eager layers do, on batches
    of two lengths (one compile, dynamic shapes)."""
    from lorakit.train.fast import prepare_for_training

    grads = []
    for compile in ("off", "on"):
        model = _alora().train()
        prepare_for_training(model, None, compile=compile)
        for ids in (IDS[:, :11], IDS):
            model.zero_grad()
            total, count = chunked_causal_lm_loss(model, ids, torch.ones_like(ids), ids.clone())
            (total / count).backward()
        if compile == "on":
            assert model.model.layers[0].forward.state.enabled  # it ran compiled, no fallback
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ---- the conversation API and the command line ----------------------------------------------


def _conversation_model():
    tokenizer = tiny_tokenizer()
    model = lk.apply(tiny_llama(), lk.ALoRAConfig(rank=4, alpha=8, tokenizer=tokenizer), "checker")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(4))
    return model.eval(), tokenizer


def test_a_conversation_reuses_the_base_cache_and_rolls_back() -> None:
    from lorakit.conversation import Conversation

    model, tokenizer = _conversation_model()
    conv = Conversation(model, tokenizer, system="be brief")
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    for turn in range(3):
        conv.add("user", f"turn {turn}: how are you?")
        conv.respond(max_new_tokens=5)
        before = (list(conv.ids), [layer.keys.clone() for layer in conv.cache.layers])
        check = conv.invoke("checker", max_new_tokens=4, min_new_tokens=4)
        assert check.prefilled == header and check.generated == 4  # only the invocation ran
        assert conv.ids == before[0]  # rolled back, bit for bit
        for layer, keys in zip(conv.cache.layers, before[1], strict=True):
            assert torch.equal(layer.keys, keys)
    # the invocation's answer equals aLoRA's without any cache
    text = tokenizer.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    lk.set_active(model, ["checker"])
    out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == check.text


def test_a_failed_invocation_still_rolls_back(monkeypatch) -> None:
    from lorakit import conversation

    model, tokenizer = _conversation_model()
    conv = conversation.Conversation(model, tokenizer)
    conv.add("user", "hello")
    kept = list(conv.ids)

    def broken(*args, **kwargs):
        yield 5
        raise RuntimeError("out of memory")

    monkeypatch.setattr(conversation, "_decode", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        conv.invoke("checker")
    assert conv.ids == kept and conv.cache.get_seq_length() == len(kept)


def test_train_and_chat_on_the_command_line(tmp_path) -> None:
    import json

    from lorakit.cli import main
    from lorakit.conversation import conversation_repl

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}"}) + "\n" for i in range(6)))
    main(["train", "--model", str(folder), "--method", "alora", "--data", str(data), "--steps", "2",
          "--batch-size", "2", "--micro-batch-size", "2", "--rank", "2", "--skip-eval", "--no-progress-bar",
          "--output-dir", str(tmp_path / "run")])  # fmt: skip
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (
        saved["alora_invocation_tokens"]
        == tiny_tokenizer()("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    )
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    lk.load_adapter(model, tmp_path / "run" / "adapter", trainable=False)
    lines, printed = iter(["hi", "and again", "/exit"]), []
    conversation_repl(
        model,
        tokenizer,
        "default",
        input_fn=lambda _: next(lines),
        print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))),
        max_new_tokens=3,
    )
    reports = [p for p in printed if p.startswith("[prefilled")]
    assert len(reports) == 2 and all(" 11 invocation tokens" in r for r in reports)
