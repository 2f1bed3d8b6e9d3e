"""Read chat training data from JSONL files.

Two record shapes are accepted, the ones TRL and the OpenAI fine-tuning API use:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a (multi-turn) conversation;
- ``{"prompt": ..., "completion": ...}``: a single exchange. Each side is either a string (it
  becomes a user turn and an assistant turn) or a list of messages (TRL's conversational
  prompt-completion), which are concatenated.

Every record is validated on read, so a bad line fails with its file and line number before any
tokenisation or training starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.data.chat import Conversation, validate_messages


class DataFormatError(ValueError):
    """A training-data record does not have an accepted shape."""


def read_examples(path: str | Path) -> list[Conversation]:
    """Read every non-blank line of a JSONL file as a conversation; a file without one is an error."""
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(f"{path} is a folder; pass a JSONL file (one conversation per line)")
    conversations: list[Conversation] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {line_number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                    f"column {err.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                conversations.append(_parse_line(line))
            except (ValueError, TypeError) as err:
                raise DataFormatError(f"{path}, line {line_number}: {err}") from err
    if not conversations:
        raise DataFormatError(f"{path} holds no examples (it is empty or has only blank lines)")
    return conversations


def _parse_line(line: str) -> Conversation:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"not valid JSON ({err.msg} at column {err.colno})") from err
    return record_to_conversation(record)


def record_to_conversation(record: Any) -> Conversation:
    """Turn one decoded record (either accepted shape) into a validated conversation."""
    if not isinstance(record, dict):
        raise DataFormatError(
            f"expected a JSON object, got {type(record).__name__}; write "
            '{"messages": [...]} or {"prompt": ..., "completion": ...}'
        )
    if "messages" in record:
        return validate_messages(record["messages"])
    if "prompt" in record and "completion" in record:
        prompt = _side(record["prompt"], "user", "prompt")
        completion = _side(record["completion"], "assistant", "completion")
        return validate_messages(prompt + completion)
    raise DataFormatError(
        f"the object has keys {sorted(record)}; expected either 'messages' (a list of "
        "{'role', 'content'} dicts) or both 'prompt' and 'completion'"
    )


def _side(value: Any, role: str, key: str) -> list[Any]:
    """A prompt or completion as a list of messages; a bare string becomes one ``role`` turn."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataFormatError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")
