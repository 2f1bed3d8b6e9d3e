"""JSONL reading: both record shapes, and errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data import DataFormatError, read_examples


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_messages_records_are_read_as_conversations(tmp_path: Path) -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
    ]
    path = write_lines(tmp_path, [json.dumps({"messages": turns}, ensure_ascii=False)])
    assert read_examples(path) == [turns]


def test_prompt_completion_strings_become_a_user_and_an_assistant_turn(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps({"prompt": "2+2?", "completion": "4"})])
    assert read_examples(str(path)) == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ]


def test_conversational_prompt_completion_concatenates_the_message_lists(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    completion = [{"role": "assistant", "content": "A"}]
    path = write_lines(tmp_path, [json.dumps({"prompt": prompt, "completion": completion})])
    assert read_examples(path) == [prompt + completion]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    record = json.dumps({"prompt": "p", "completion": "c"})
    path = write_lines(tmp_path, ["", record, "   ", record, ""])
    assert len(read_examples(path)) == 2


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ('{"prompt": "p", "completion": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"question": "q", "answer": "a"}', r"keys \['answer', 'question'\]"),
        ('{"prompt": "p"}', "'prompt' and 'completion', 'conversations'"),
        ('{"prompt": 3, "completion": "c"}', "'prompt' must be a string or a list"),
        ('{"messages": [{"role": "bot", "content": "c"}]}', "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
        ('{"messages": [{"role": "user", "content": ["q"]}]}', "content must be a string"),
        ('{"messages": "hi"}', "list of"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path: Path, bad_line: str, pattern: str) -> None:
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = write_lines(tmp_path, [good, "", bad_line, good])
    with pytest.raises(DataFormatError, match=pattern) as caught:
        read_examples(path)
    assert str(caught.value).startswith(f"{path}, line 3: ")
