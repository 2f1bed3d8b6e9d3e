"""The data formats users have: ShareGPT, Alpaca, JSON arrays, CSV with a column mapping, Parquet
and Hugging Face datasets folders, all read into the same conversations as OpenAI messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.data import DataFormatError, read_examples
from lorakit.data.jsonl import read_data_file

EXPECTED = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris"},
        ],
        "system": "Be brief.",
    },
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]
ALPACA = [
    {"instruction": "Capital of France?", "input": "", "output": "Paris", "system": "Be brief."},
    {"instruction": "2+2?", "output": "4"},
]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("records", "shape"), [(SHAREGPT, "sharegpt"), (ALPACA, "alpaca")])
def test_sharegpt_and_alpaca_in_jsonl_and_json_arrays(tmp_path: Path, records: list, shape: str) -> None:
    lines = read_data_file(_jsonl(tmp_path / "d.jsonl", records))
    assert lines.conversations == EXPECTED and lines.format == shape and lines.kind == "JSONL"
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    array = read_data_file(tmp_path / "d.json")
    assert array.conversations == EXPECTED and array.kind == "JSON array"


def test_alpaca_input_and_history() -> None:
    from lorakit.data import record_to_conversation

    record = {"instruction": "Translate", "input": "chat", "output": "cat", "history": [["hi", "hello"]]}
    assert record_to_conversation(record) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\nchat"},
        {"role": "assistant", "content": "cat"},
    ]


def test_csv_with_a_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text('question,answer,notes\n"Capital of France?",Paris,x\n2+2?,4,\n', encoding="utf-8")
    got = read_examples(path, {"prompt": "question", "completion": "answer"})
    assert got == [[m for m in c if m["role"] != "system"] for c in EXPECTED]
    with pytest.raises(
        DataFormatError, match=r"qa.csv, line 2: the object has keys \['answer', 'notes', 'question'\]"
    ):
        read_examples(path)
    with pytest.raises(DataFormatError, match="no column 'query'"):
        read_examples(path, {"prompt": "query", "completion": "answer"})


def test_parquet_and_a_datasets_folder(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": m[-2]["content"], "completion": m[-1]["content"]} for m in EXPECTED]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    plain = [c[-2:] for c in EXPECTED]
    assert read_examples(tmp_path / "d.parquet") == plain
    folder = tmp_path / "saved"  # the layout Dataset.save_to_disk writes
    folder.mkdir()
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (folder / "dataset_info.json").write_text("{}")
    found = read_data_file(folder)
    assert found.conversations == plain and found.kind == "Hugging Face datasets folder"
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataFormatError, match="several splits .*train, test.*pass one of them"):
        read_examples(tmp_path / "dict")


def test_mixed_records_are_read_and_reported(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": EXPECTED[1]}, ALPACA[1], SHAREGPT[1]])
    found = read_data_file(path)
    assert found.conversations == [EXPECTED[1]] * 3
    assert found.format == "messages (1) + alpaca (1) + sharegpt (1)"


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"messages": EXPECTED[1], "conversations": []}, "fit both messages and sharegpt"),
        ({"conversations": [{"from": "observation", "value": "x"}]}, "is from 'observation'"),
        ({"conversations": [{"role": "user", "content": "x"}]}, "must be a dict with 'from' and 'value'"),
        ({"instruction": "x", "output": "y", "history": [["only one"]]}, "history"),
        ({"question": "x"}, "--columns NAME=COLUMN maps other names"),
    ],
)
def test_bad_records_name_their_line(tmp_path: Path, record: dict, says: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [SHAREGPT[1], record])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl, line 2: .*{says}"):
        read_examples(path)


def test_a_folder_that_is_not_a_dataset_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="not a Hugging Face datasets folder"):
        read_examples(tmp_path)
    with pytest.raises(DataFormatError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


def test_lorakit_data_says_the_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main
    from lorakit.models import tiny_llama, tiny_tokenizer

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    path = _jsonl(tmp_path / "s.jsonl", SHAREGPT)
    main(["data", "--data", str(path), "--model", str(base), "--show", "1"])
    assert f"{path}: JSONL, sharegpt records, 2 conversations" in capsys.readouterr().out


def test_a_csv_field_may_span_lines(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('prompt,completion\n"Two lines:\nfirst and second",ok\n3+3?,6\n', encoding="utf-8")
    got = read_examples(path)
    assert got[0][0]["content"] == "Two lines:\nfirst and second" and got[1][1]["content"] == "6"
    path.write_text('prompt,completion\n"a\nb",ok\n"broken\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"multi.csv, line 4"):
        read_examples(path)
