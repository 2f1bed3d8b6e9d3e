"""Chat formatting with assistant-only loss masks.

The conversation is rendered with the tokenizer's own chat template, so training sees exactly the
text the model sees at inference. Which tokens carry loss is found from text, not from template
markers: few templates ship ``{% generation %}`` blocks, and without them Hugging Face's
``return_assistant_tokens_mask`` silently returns all zeros (zero loss). Instead we render each
conversation prefix, check it is a string prefix of the full rendering, take every assistant
turn's character span (content plus the end-of-turn token) and map those spans onto the tokens of
one tokenisation of the full text through the offset mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""Label value for positions without loss (PyTorch ``CrossEntropyLoss``'s default ignore_index)."""

ALLOWED_ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]  # role and content (str), plus the tool-call fields below where present
Conversation = list[Message]
# OpenAI's tool-calling fields, passed to the chat template as they are: an assistant turn's
# `tool_calls` (its content may then be empty or null), a tool turn's `tool_call_id` and `name`.
TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")

_ANSI_TRAINED = "\x1b[1;32m"
_ANSI_MASKED = "\x1b[2m"
_ANSI_RESET = "\x1b[0m"


@dataclass
class Encoded:
    """One tokenised training sample; ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``.

    Labels are not shifted: causal-LM heads shift them internally.
    """

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids has {len(self.input_ids)} tokens but labels has {len(self.labels)}; "
                "they must be the same length (one label per token)"
            )

    @property
    def num_loss_tokens(self) -> int:
        """How many positions carry loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def validate_messages(messages: Any) -> Conversation:
    """Check the shape of a conversation and return it as a list of plain dicts.

    Errors are raised here, before any template runs, so they name the offending turn instead of
    surfacing as a Jinja failure deep inside ``apply_chat_template``.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least a user and an assistant turn")
    checked: Conversation = []
    for i, message in enumerate(messages):
        checked.append(_validate_message(message, i))
    if not any(m["role"] == "assistant" for m in checked):
        raise ValueError(
            "the conversation has no assistant turn, so nothing would be trained; "
            "add at least one {'role': 'assistant', 'content': ...} message"
        )
    if checked[0]["role"] == "assistant":
        raise ValueError(
            "the conversation starts with an assistant turn; start it with a user (or system) "
            "message so the answer has something to answer"
        )
    return checked


def _validate_message(message: Any, index: int) -> Message:
    """Check one ``{"role", "content"}`` message; ``index`` is 0-based, for the error text."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(
            f"message {index} is missing {', '.join(repr(k) for k in missing)}; every message "
            "needs {'role': ..., 'content': ...}"
        )
    role, content = message["role"], message["content"]
    if role not in ALLOWED_ROLES:
        raise ValueError(
            f"message {index} has unknown role {role!r}; allowed roles are {', '.join(ALLOWED_ROLES)}"
        )
    if content is None and role == "assistant" and message.get("tool_calls"):
        content = ""  # an assistant turn that only calls tools
    if not isinstance(content, str):
        raise TypeError(
            f"message {index} ({role}) has content of type {type(content).__name__}; content must be a string"
        )
    checked: Message = {"role": role, "content": content}
    for key in TOOL_FIELDS:
        if message.get(key) is not None:
            checked[key] = _tool_field(message[key], key, index)
    return checked


def _tool_field(value: Any, key: str, index: int) -> Any:
    if key == "tool_calls":
        if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
            raise TypeError(
                f"message {index}: tool_calls must be a list of objects, got {type(value).__name__}"
            )
        return [dict(c) for c in value]
    if not isinstance(value, str):
        raise TypeError(f"message {index}: {key} must be a string, got {type(value).__name__}")
    return value


def _render(tokenizer: Any, messages: Conversation, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _require_prefix(prefix: str, full: str, what: str) -> None:
    if not full.startswith(prefix):
        raise ValueError(
            f"the chat template renders {what} as text that is not a prefix of the whole "
            "conversation, so assistant spans cannot be located; this happens with templates "
            "that rewrite earlier turns (e.g. strip reasoning from past answers). Use a template "
            "that renders each turn the same way regardless of what follows."
        )


def _turn_end(turn: str, content: str, eos: str | None) -> int:
    """Where the trained part of one rendered assistant turn ends, relative to the turn start.

    It ends just after the end-of-turn token when the template emits one after the content (the
    model must learn to stop); otherwise after the turn's text minus trailing whitespace.
    """
    found = turn.find(content) if content else 0
    search_from = found + len(content) if found >= 0 else 0
    if eos:
        eos_at = turn.find(eos, search_from)
        if eos_at >= 0:
            return eos_at + len(eos)
    return len(turn.rstrip())


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text and each assistant turn's ``[start, end)`` chars.

    A span starts after the assistant header (``<|im_start|>assistant\\n``), i.e. where the
    generation prompt ends, and ends after the end-of-turn token.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template (tokenizer.chat_template is None); lorakit formats "
            "chats with the model's own template. Use the instruct/chat variant's tokenizer, or "
            "set tokenizer.chat_template to the Jinja template the model was trained with."
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    eos = getattr(tokenizer, "eos_token", None)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        _require_prefix(prompt, full, f"the prompt before message {i} (with generation prompt)")
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _require_prefix(upto, full, f"messages 0..{i}")
        turn = upto[len(prompt) :]
        spans.append((len(prompt), len(prompt) + _turn_end(turn, message["content"], eos)))
    return full, spans


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    max_length: int,
    last_turn_only: bool = False,
) -> Encoded | None:
    """Tokenise a conversation with labels only on assistant tokens (and their end-of-turn token).

    Returns None when right truncation to ``max_length`` leaves no loss token: such a sample would
    add nothing but a zero to the loss, so the caller skips it and counts it.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    conversation = validate_messages(messages)
    text, spans = assistant_spans(tokenizer, conversation)
    if last_turn_only:
        spans = spans[-1:]
    input_ids, offsets = _tokenize_with_offsets(tokenizer, text)
    labels = [
        token if _overlaps(offset, spans) else IGNORE_INDEX
        for token, offset in zip(input_ids, offsets, strict=True)
    ]
    encoded = Encoded(input_ids[:max_length], labels[:max_length])
    return encoded if encoded.num_loss_tokens > 0 else None


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenise the rendered text once; the template already wrote every special token."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise TypeError(
            f"{type(tokenizer).__name__} cannot return offset mappings, which the loss mask "
            "needs; load a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))"
        ) from err
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _overlaps(offset: Sequence[int], spans: list[tuple[int, int]]) -> bool:
    """True when the token's characters intersect an assistant span.

    Intersection (not containment) keeps a token that merges the last header character with the
    first content character trained rather than silently dropping answer text.
    """
    start, end = offset
    if end <= start:  # tokens with no characters in the text
        return False
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def render_mask(tokenizer: Any, encoded: Encoded, color: bool = False) -> str:
    """Show a sample as text with the trained tokens marked, for eyeballing the loss mask.

    Trained runs are wrapped in ``[[...]]`` or, with ``color=True``, shown in bold green while
    masked text is dimmed.
    """
    pieces: list[str] = []
    run: list[int] = []
    run_trained = False
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_mark(tokenizer.decode(run, skip_special_tokens=False), run_trained, color))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_mark(tokenizer.decode(run, skip_special_tokens=False), run_trained, color))
    return "".join(pieces)


def _mark(text: str, trained: bool, color: bool) -> str:
    if color:
        return f"{_ANSI_TRAINED if trained else _ANSI_MASKED}{text}{_ANSI_RESET}"
    return f"[[{text}]]" if trained else text
