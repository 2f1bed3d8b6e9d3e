"""Streamed chat, the REPL (scripted input) and the merged-model export round trip."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lorakit.generate import chat_repl, export_merged, stream_chat
from lorakit.models import TINY_VOCAB, load_model, tiny_gpt2, tiny_llama, tiny_tokenizer
from lorakit.train.evaluate import generate_answers

TOK = tiny_tokenizer()
HELLO = [{"role": "user", "content": "hello"}]


class Scripted(nn.Module):
    """A fake causal LM that says ``reply`` (then eos) whatever it is asked; records its prompts."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.script = TOK(reply)["input_ids"] + [TOK.eos_token_id]
        self.prompts: list[str] = []
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, past_key_values: int | None = None, **kw) -> SimpleNamespace:
        step = 0 if past_key_values is None else past_key_values + 1
        if step == 0:
            self.prompts.append(TOK.decode(input_ids[0]))
        logits = torch.zeros(1, input_ids.shape[1], TINY_VOCAB)
        logits[0, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step)


def test_stream_equals_greedy_generation() -> None:
    model = tiny_llama(bias=True)
    pieces = list(stream_chat(model, TOK, HELLO, max_new_tokens=20))
    assert pieces and all(pieces)
    assert "".join(pieces).strip() == generate_answers(model, TOK, [HELLO], max_new_tokens=20)[0]


def test_stream_respects_max_new_tokens_and_stops_at_eos() -> None:
    assert "".join(stream_chat(Scripted("abcdef"), TOK, HELLO, max_new_tokens=3)) == "abc"
    assert "".join(stream_chat(Scripted("ab"), TOK, HELLO, max_new_tokens=50)) == "ab"


def test_stream_never_splits_a_multibyte_character() -> None:
    pieces = list(stream_chat(Scripted("héllo ✓"), TOK, HELLO))
    assert pieces == ["h", "é", "l", "l", "o", " ", "✓"]


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = tiny_gpt2()

    def sample(seed: int) -> str:
        gen = torch.Generator().manual_seed(seed)
        return "".join(stream_chat(model, TOK, HELLO, 12, temperature=1.0, generator=gen))

    assert sample(0) == sample(0)


def test_repl_keeps_history_resets_and_exits() -> None:
    model = Scripted("ok")
    lines = iter(["first", "  ", "second", "/oops", "/reset", "third", "/exit", "never read"])
    printed: list[str] = []
    chat_repl(model, TOK, input_fn=lambda _: next(lines), print_fn=lambda *a, **k: printed.append("".join(a)))
    first, second, third = model.prompts
    assert "first" in first and "second" not in first
    assert "first" in second and "ok" in second and "second" in second  # the whole history
    assert "first" not in third and "third" in third  # after /reset
    assert any("unknown command '/oops'" in p for p in printed)
    assert any("new conversation" in p for p in printed)
    assert next(lines) == "never read"


def test_repl_exits_on_ctrl_d() -> None:
    def eof(_: str) -> str:
        raise EOFError

    chat_repl(Scripted("x"), TOK, input_fn=eof, print_fn=lambda *a, **k: None)  # returns


IDS = torch.tensor([[257, 10, 20, 30, 40, 258, 5], [1, 2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_llama(bias=True),
        lambda: tiny_llama(tie_word_embeddings=True),
        tiny_gpt2,
    ],
)
def test_export_round_trip_gives_the_same_logits(make, tmp_path: Path) -> None:
    model = make()
    export_merged(model, TOK, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    via_lorakit, tok = load_model(tmp_path)
    assert torch.equal(via_lorakit(IDS).logits, model(IDS).logits)
    assert tok.apply_chat_template(HELLO, tokenize=False) == TOK.apply_chat_template(HELLO, tokenize=False)


def test_export_saves_both_matrices_when_training_untied_them(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + 0.1)  # e.g. full fine-tuning
    export_merged(model, TOK, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert model.config.tie_word_embeddings  # the live model's config is left as it was


def test_export_refuses_unmerged_adapters(tmp_path: Path) -> None:
    model = tiny_llama()

    class Wrapper(nn.Module):  # the shape of an adapter wrapper: the original under .base_layer
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base_layer = base

    model.model.layers[0].self_attn.q_proj = Wrapper(model.model.layers[0].self_attn.q_proj)
    with pytest.raises(ValueError, match="merge and unload the adapters"):
        export_merged(model, TOK, tmp_path)
