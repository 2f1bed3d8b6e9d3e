"""Read chat training data in the formats users already have.

Files: JSONL (one record per line), a JSON array of records (LLaMA-Factory's and Alpaca's `.json`),
CSV (a header row; every value a string), Parquet, and a Hugging Face `datasets` folder written by
`save_to_disk` (its Arrow files; `pyarrow` reads those and Parquet, and is asked for by name when
missing). Records, detected by their keys:

- ``{"messages": [{"role", "content"}, ...]}``: OpenAI's and TRL's conversation;
- ``{"prompt": ..., "completion": ...}``: one exchange; each side a string (a user turn, an
  assistant turn) or a list of messages (TRL's conversational prompt-completion);
- ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system": ...}``:
  ShareGPT, LLaMA-Factory's default;
- ``{"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}``:
  Alpaca (the prompt is the instruction, then the input on a new line when there is one).

`columns` renames a file's own columns first (``{"prompt": "question", "completion": "answer"}``:
the `prompt` is read from the column `question`). Each record's own keys decide its format; a record
whose keys fit two formats, or none, is an error naming the record and what to do.
Every record is validated on read, so a bad one fails with its file and line (or row) before any
tokenisation or training starts.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.chat import Conversation, validate_messages


class DataFormatError(ValueError):
    """A training-data record does not have an accepted shape."""


FORMATS = {  # name -> the keys that identify it
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Examples:
    """What a data file held: its conversations, the record format and the file kind."""

    conversations: list[Conversation]
    format: str
    kind: str


def read_examples(path: str | Path, columns: dict[str, str] | None = None) -> list[Conversation]:
    """Every record of a data file as a validated conversation; a file without one is an error."""
    return read_data_file(path, columns).conversations


def read_data_file(path: str | Path, columns: dict[str, str] | None = None) -> Examples:
    """`read_examples` with the detected record format and file kind (for `lorakit data`)."""
    path = Path(path)
    kind, records = _records(path)
    conversations: list[Conversation] = []
    found: dict[str, int] = {}
    for where, record in records:
        try:
            record = _renamed(record, columns)
            shape = detect_format(record)
            found[shape] = found.get(shape, 0) + 1
            conversations.append(_convert(record, shape))
        except (ValueError, TypeError) as err:
            raise DataFormatError(f"{path}, {where}: {err}") from err
    if not conversations:
        raise DataFormatError(f"{path} holds no examples (it is empty or has only blank lines)")
    shapes = " + ".join(f"{n} ({c})" for n, c in found.items()) if len(found) > 1 else next(iter(found))
    return Examples(conversations, shapes, kind)


def _records(path: Path) -> tuple[str, Iterator[tuple[str, Any]]]:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "Hugging Face datasets folder", _arrow_folder(path)
        raise DataFormatError(
            f"{path} is a folder but not a Hugging Face datasets folder (no state.json); pass a "
            "JSONL, JSON, CSV or Parquet file, or a folder written by Dataset.save_to_disk"
        )
    if not path.is_file():
        raise DataFormatError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "CSV", _csv(path)
    if suffix == ".parquet":
        return "Parquet", _parquet(path)
    if suffix == ".json" and _starts_with(path, b"["):
        return "JSON array", _json_array(path)
    return "JSONL", _jsonl(path)


def _starts_with(path: Path, char: bytes) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(char)


def _text(raw: bytes, path: Path, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}, {where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "save the file as UTF-8"
        ) from None


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _text(raw, path, f"line {number}")
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    text = _text(path.read_bytes(), path, "the file")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    for index, record in enumerate(records):
        yield f"record {index}", record


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    text = _text(path.read_bytes(), path, "the file").lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
    for row in reader:
        yield (
            f"line {reader.line_num}",
            {k: v for k, v in row.items() if k is not None and v not in (None, "")},
        )


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise DataFormatError(
            "reading Parquet files and datasets folders needs pyarrow: pip install pyarrow "
            "(make install does)"
        ) from None
    return pyarrow


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    _pyarrow()
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's own error types
        raise DataFormatError(f"{path} is not a readable Parquet file: {err}") from None
    for index, row in enumerate(rows):
        yield f"row {index}", row


def _arrow_folder(path: Path) -> Iterator[tuple[str, Any]]:
    pa = _pyarrow()
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataFormatError(
            f"{path} holds several splits ({', '.join(splits)}); pass one of them, e.g. {path / (splits or ['train'])[0]}"
        )
    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    index = 0
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                rows = pa.ipc.open_stream(source).read_all().to_pylist()
        except Exception as err:  # pyarrow's own error types
            raise DataFormatError(
                f"{file} is not a readable Arrow file of a datasets folder: {err}"
            ) from None
        for row in rows:
            yield f"row {index}", row
            index += 1


def _renamed(record: Any, columns: dict[str, str] | None) -> Any:
    if not columns or not isinstance(record, dict):
        return record
    missing = [source for source in columns.values() if source not in record]
    if missing:
        raise DataFormatError(f"no column {missing[0]!r} (--columns); the record has {sorted(record)}")
    renamed = {k: v for k, v in record.items() if k not in columns.values()}
    renamed.update({name: record[source] for name, source in columns.items()})
    return renamed


def detect_format(record: Any) -> str:
    """The record's format by its keys; none or two are errors that say what was expected."""
    if not isinstance(record, dict):
        raise DataFormatError(
            f"expected a JSON object, got {type(record).__name__}; write "
            '{"messages": [...]} or {"prompt": ..., "completion": ...}'
        )
    fits = [name for name, keys in FORMATS.items() if all(k in record for k in keys)]
    if len(fits) > 1:
        raise DataFormatError(
            f"the record's keys {sorted(record)} fit both {fits[0]} and {fits[1]}; rename or drop "
            "columns (--columns NAME=COLUMN) so one format remains"
        )
    if not fits:
        raise DataFormatError(
            f"the object has keys {sorted(record)}; expected 'messages' (OpenAI: a list of "
            "{'role', 'content'}), 'prompt' and 'completion', 'conversations' (ShareGPT), or "
            "'instruction' and 'output' (Alpaca); --columns NAME=COLUMN maps other names"
        )
    return fits[0]


def record_to_conversation(record: Any) -> Conversation:
    """Turn one decoded record (any accepted shape) into a validated conversation."""
    return _convert(record, detect_format(record))


def _convert(record: dict[str, Any], shape: str) -> Conversation:
    if shape == "messages":
        return validate_messages(record["messages"])
    if shape == "prompt-completion":
        prompt = _side(record["prompt"], "user", "prompt")
        completion = _side(record["completion"], "assistant", "completion")
        return validate_messages(prompt + completion)
    if shape == "sharegpt":
        return validate_messages(_system(record) + _sharegpt(record["conversations"]))
    return validate_messages(_system(record) + _alpaca(record))


def _side(value: Any, role: str, key: str) -> list[Any]:
    """A prompt or completion as a list of messages; a bare string becomes one ``role`` turn."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataFormatError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")


def _system(record: dict[str, Any]) -> list[dict[str, str]]:
    system = record.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise DataFormatError(f"'system' must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}]


def _sharegpt(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataFormatError(
            f"'conversations' must be a list of {{'from', 'value'}} turns, got {type(turns).__name__}"
        )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(
                f"ShareGPT turn {i} must be a dict with 'from' and 'value', got {turn!r:.80}"
            )
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataFormatError(
                f"ShareGPT turn {i} is from {turn['from']!r}; lorakit reads human/user, gpt/assistant and "
                "system turns (tool turns: write OpenAI messages with tool_calls)"
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
        raise DataFormatError("Alpaca 'history' must be a list of [question, answer] pairs")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    instruction, extra = record["instruction"], record.get("input")
    if not isinstance(instruction, str) or (extra is not None and not isinstance(extra, str)):
        raise DataFormatError("Alpaca 'instruction' and 'input' must be strings")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return messages + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": record["output"]},
    ]
