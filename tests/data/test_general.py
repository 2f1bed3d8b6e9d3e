"""Held-out general text for forgetting measurements."""

from __future__ import annotations

import pytest

from lorakit.data import general_prompts, general_texts, load_task


def test_general_texts_are_deterministic_chunks_of_the_whole_source() -> None:
    chunks = general_texts()
    assert chunks == general_texts()
    assert len(chunks) > 100
    assert sum(map(len, chunks)) > 300_000
    assert all(chunk.strip() for chunk in chunks)
    assert max(len(c) for c in chunks) <= 2000
    small = general_texts(chunk_chars=500)
    assert len(small) > len(chunks)
    assert sum(len(c) > 500 for c in small) <= 3  # only single lines longer than a chunk


def test_general_prompts_are_short_distinct_prose() -> None:
    prompts = general_prompts(32)
    assert prompts == general_prompts(32)
    assert len(set(prompts)) == 32
    assert all(20 <= len(p) <= 200 and not p[0].isspace() for p in prompts)


def test_general_prompts_reject_impossible_counts() -> None:
    with pytest.raises(ValueError, match="--kl-prompts must be between 1 and"):
        general_prompts(0)
    with pytest.raises(ValueError, match="--kl-prompts must be between 1 and"):
        general_prompts(100_000)


def test_general_text_is_not_in_the_default_task() -> None:
    task = load_task()
    questions = {m["content"] for conversation in task.train for m in conversation}
    prompts = set(general_prompts(50))
    assert not questions & prompts


def test_the_users_own_forgetting_text(tmp_path) -> None:
    paragraphs = [
        f"Paragraph {i}: " + "plain English prose about gardens and rivers. " * 4 for i in range(12)
    ]
    path = tmp_path / "mine.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    chunks = general_texts(chunk_chars=400, path=str(path))
    assert "\n\n".join(chunks) == "\n\n".join(paragraphs)  # all of it, in order, split at paragraphs
    prompts = general_prompts(4, path=str(path))
    assert len(prompts) == 4 and all(p.startswith("Paragraph") for p in prompts)
    with pytest.raises(ValueError, match=r"between 1 and 12 \(prose paragraphs of 120\+ characters in"):
        general_prompts(13, path=str(path))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        general_texts(path=str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        general_texts(path=str(tmp_path / "none.txt"))
