"""Loss masks checked token by token against a reference written here, on real conversations."""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any

import pytest
import yaml

from lorakit.data import IGNORE_INDEX, Encoded, encode_chat, render_mask, validate_messages

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatterbot_conversations(language: str, min_turns: int = 3) -> list[list[dict[str, str]]]:
    """Unique multi-turn conversations of chatterbot-corpus, alternating user / assistant.

    Conversations with a blank utterance are left out: they are noise in the corpus, and a
    whitespace-only answer merges with the header's newline into one token (covered below).
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("chatterbot-corpus is not installed (pip install chatterbot-corpus)")
    folder = os.path.join(spec.submodule_search_locations[0], "data", language)
    seen: set[tuple[str, ...]] = set()
    conversations = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        with open(path, encoding="utf-8") as handle:
            corpus = yaml.safe_load(handle)
        for utterances in corpus.get("conversations") or []:
            key = tuple(str(u) for u in utterances)
            usable = all(u.strip() for u in key)
            if len(key) >= min_turns and usable and key not in seen:
                seen.add(key)
                roles = ("user", "assistant")
                conversations.append([{"role": roles[i % 2], "content": c} for i, c in enumerate(key)])
    return conversations


def expected_char_mask(text: str, messages: list[dict[str, str]], last_only: bool) -> list[bool]:
    """Reference: per character, is it assistant content or that turn's <|im_end|>?

    Written from SmolLM2's ChatML layout, independently of the library's prefix rendering.
    """
    trained = [False] * len(text)
    cursor = 0
    assistant_turns = [m for m in messages if m["role"] == "assistant"]
    for n, message in enumerate(assistant_turns):
        block = f"{IM_START}assistant\n{message['content']}{IM_END}"
        at = text.index(block, cursor)
        start = at + len(f"{IM_START}assistant\n")
        end = at + len(block)
        if not last_only or n == len(assistant_turns) - 1:
            trained[start:end] = [True] * (end - start)
        cursor = end
    return trained


def check_mask(tok: Any, messages: list[dict[str, str]], last_only: bool = False) -> None:
    encoded = encode_chat(tok, messages, max_length=4096, last_turn_only=last_only)
    assert encoded is not None
    text = tok.apply_chat_template(messages, tokenize=False)
    reference = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded.input_ids == reference["input_ids"]
    char_mask = expected_char_mask(text, messages, last_only)
    for i, (token, (start, end)) in enumerate(
        zip(encoded.input_ids, reference["offset_mapping"], strict=True)
    ):
        inside = any(char_mask[start:end])
        assert all(char_mask[start:end]) == inside, f"token {i} straddles a span boundary"
        assert encoded.labels[i] == (token if inside else IGNORE_INDEX), (
            f"token {i} {tok.convert_ids_to_tokens(token)!r} at chars {start}:{end}"
        )
    # Second, coarser reference: the trained tokens decode to the answers plus end-of-turn.
    answers = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    trained_ids = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
    expected = answers[-1:] if last_only else answers
    assert tok.decode(trained_ids, skip_special_tokens=False) == "".join(expected)


@pytest.mark.parametrize("language", ["english", "chinese"])
def test_mask_matches_assistant_turns_token_by_token(smol_tokenizer: Any, language: str) -> None:
    conversations = chatterbot_conversations(language)
    assert len(conversations) >= 10
    assert any(len(c) >= 5 for c in conversations)
    for messages in conversations:
        check_mask(smol_tokenizer, messages)


@pytest.mark.parametrize("language", ["english", "chinese"])
def test_last_turn_only_trains_only_the_last_answer(smol_tokenizer: Any, language: str) -> None:
    for messages in chatterbot_conversations(language, min_turns=4)[:20]:
        check_mask(smol_tokenizer, messages, last_only=True)


def test_end_of_turn_token_is_trained_but_not_the_newline_after_it(smol_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    encoded = encode_chat(smol_tokenizer, messages, max_length=256)
    assert encoded is not None
    eos = smol_tokenizer.eos_token_id
    assert encoded.input_ids[-2:] == [eos, smol_tokenizer.convert_tokens_to_ids("\u010a")]
    assert encoded.labels[-2:] == [eos, IGNORE_INDEX]
    header = smol_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first_answer = encoded.labels.index(next(t for t in encoded.labels if t != IGNORE_INDEX))
    assert encoded.input_ids[first_answer - len(header) : first_answer] == header
    assert set(encoded.labels[:first_answer]) == {IGNORE_INDEX}


def test_token_merging_header_and_answer_is_trained(smol_tokenizer: Any) -> None:
    """An answer starting with newlines shares a token with the header's newline: train it.

    Dropping it instead would silently remove answer text from the loss.
    """
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhello"}]
    encoded = encode_chat(smol_tokenizer, messages, max_length=256)
    assert encoded is not None
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained, skip_special_tokens=False) == f"\n\n\nhello{IM_END}"


def test_system_message_absent_gets_the_default_one_masked(smol_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    encoded = encode_chat(smol_tokenizer, messages, max_length=256)
    assert encoded is not None
    text = smol_tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.startswith(f"{IM_START}system\nYou are a helpful AI assistant")
    check_mask(smol_tokenizer, messages)


def test_system_message_present_is_used_and_masked(smol_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green"},
    ]
    encoded = encode_chat(smol_tokenizer, messages, max_length=256)
    assert encoded is not None
    text = smol_tokenizer.decode(encoded.input_ids, skip_special_tokens=False)
    assert text.startswith(f"{IM_START}system\nYou answer in one word.{IM_END}")
    assert "SmolLM" not in text
    check_mask(smol_tokenizer, messages)


def test_right_truncation_keeps_a_partial_answer(smol_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one two three"}]
    full = encode_chat(smol_tokenizer, messages, max_length=4096)
    assert full is not None
    cut = encode_chat(smol_tokenizer, messages, max_length=len(full.input_ids) - 3)
    assert cut is not None
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.labels == full.labels[: len(cut.labels)]
    assert 0 < cut.num_loss_tokens < full.num_loss_tokens


def test_truncation_that_drops_every_answer_returns_none(smol_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "ok"}]
    assert encode_chat(smol_tokenizer, messages, max_length=30) is None


def test_unknown_role_names_the_role_and_the_allowed_ones(smol_tokenizer: Any) -> None:
    messages = [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"message 0 has unknown role 'human'.*system, user, assistant"):
        encode_chat(smol_tokenizer, messages, max_length=64)


@pytest.mark.parametrize(
    ("messages", "error", "pattern"),
    [
        ([], ValueError, "empty"),
        ("hello", TypeError, "list of"),
        ([{"role": "user", "content": "hi"}], ValueError, "no assistant turn"),
        ([{"role": "assistant", "content": "hi"}], ValueError, "starts with an assistant"),
        ([{"role": "user"}, {"role": "assistant", "content": "x"}], ValueError, "missing 'content'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], TypeError, "string"),
        (["hi", {"role": "assistant", "content": "x"}], TypeError, "message 0 must be a dict"),
    ],
)
def test_malformed_conversations_are_rejected(messages: Any, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        validate_messages(messages)


class _PlainTemplateTokenizer:
    """The real tokenizer's vocabulary with a Python-side template, to exercise other layouts."""

    def __init__(self, tok: Any, rewrite_past_answers: bool = False) -> None:
        self._tok = tok
        self.chat_template = "python-side"
        self.eos_token = tok.eos_token
        self.rewrite = rewrite_past_answers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, messages: Any, tokenize: bool, add_generation_prompt: bool) -> str:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        parts = []
        for i, m in enumerate(messages):
            # Like reasoning templates that drop the thinking of answers before the last question.
            past = self.rewrite and m["role"] == "assistant" and i < last_user
            parts.append(f"{m['role'].title()}:\n{'(earlier answer)' if past else m['content']}\n")
        return "".join(parts) + ("Assistant:\n" if add_generation_prompt else "")


def test_template_without_end_of_turn_token_trains_the_answer_text(smol_tokenizer: Any) -> None:
    tok = _PlainTemplateTokenizer(smol_tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    encoded = encode_chat(tok, messages, max_length=64)
    assert encoded is not None
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == "hello there"


def test_template_that_rewrites_earlier_turns_is_a_clear_error(smol_tokenizer: Any) -> None:
    tok = _PlainTemplateTokenizer(smol_tokenizer, rewrite_past_answers=True)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(ValueError, match="not a prefix of the whole conversation"):
        encode_chat(tok, messages, max_length=64)


def test_tokenizer_without_chat_template_is_a_clear_error() -> None:
    class NoTemplate:
        chat_template = None

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(NoTemplate(), messages, max_length=64)


def test_render_mask_marks_trained_text(smol_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    encoded = encode_chat(smol_tokenizer, messages, max_length=256)
    assert encoded is not None
    shown = render_mask(smol_tokenizer, encoded)
    assert shown.endswith(f"{IM_START}assistant\n[[hello there{IM_END}]]\n")
    assert shown.count("[[") == 1
    coloured = render_mask(smol_tokenizer, encoded, color=True)
    assert f"\x1b[1;32mhello there{IM_END}\x1b[0m" in coloured


def test_encoded_rejects_labels_of_another_length() -> None:
    with pytest.raises(ValueError, match="same length"):
        Encoded([1, 2, 3], [1, 2])
