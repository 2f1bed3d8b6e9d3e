"""The default ICD-10-CM chapter task: balanced, deterministic, with a fixed held-out split."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from lorakit.data import encode_chat, load_task, score_exact_match
from lorakit.data.tasks import ICD_QUESTION, MIN_CODES_PER_CHAPTER, icd10_chapters


def diagnosis(messages: list[dict[str, str]]) -> str:
    return messages[0]["content"].split("Diagnosis: ", 1)[1]


def test_parsing_reads_all_chapters() -> None:
    icd10_chapters.cache_clear()
    chapters = icd10_chapters()
    assert len(chapters) == 22
    assert "Diseases of the nervous system" in chapters
    assert len(chapters["Codes for special purposes"]) < MIN_CODES_PER_CHAPTER


def test_default_sizes_and_balance() -> None:
    task = load_task()
    assert task.name == "icd10-chapter"
    assert len(task.classes) == 21
    assert "Codes for special purposes" not in task.classes
    assert len(task.train) == 72 * 21
    assert len(task.eval) == 10 * 21
    train_counts = Counter(conversation[1]["content"] for conversation in task.train)
    assert set(train_counts.values()) == {72}
    assert set(Counter(item.reference for item in task.eval).values()) == {10}


def test_answers_are_chapter_titles_without_code_ranges() -> None:
    task = load_task()
    for conversation in task.train:
        user, assistant = conversation
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"] == ICD_QUESTION.format(description=diagnosis(conversation))
        assert assistant["content"] in task.classes
    for title in task.classes:
        assert "(" not in title and title == title.strip()
    assert {item.reference for item in task.eval} == set(task.classes)
    assert all(len(item.messages) == 1 and item.messages[0]["role"] == "user" for item in task.eval)


def test_heldout_is_disjoint_from_train_and_fixed_across_seeds_and_sizes() -> None:
    base = load_task()
    assert base.train == load_task().train
    other = load_task(seed=1)
    smaller = load_task(n_train_per_class=5)
    held = {diagnosis(item.messages) for item in base.eval}
    assert len(held) == len(base.eval)
    for task in (base, other, smaller):
        assert task.eval == base.eval
        assert not held & {diagnosis(c) for c in task.train}
    assert other.train != base.train
    assert len(smaller.train) == 5 * 21


def test_diagnoses_determine_their_chapter() -> None:
    chapter_of: dict[str, set[str]] = {}
    for title, descriptions in icd10_chapters().items():
        for description in descriptions:
            chapter_of.setdefault(description, set()).add(title)
    assert all(len(titles) == 1 for titles in chapter_of.values())


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown task 'icd9'; available tasks: "):
        load_task("icd9")
    with pytest.raises(ValueError, match="smallest chapter has"):
        load_task(n_train_per_class=10_000)
    with pytest.raises(ValueError, match="non-negative"):
        load_task(n_eval_per_class=-1)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Diseases of the nervous system", True),
        ("  diseases of the Nervous System.\n", True),
        ("Diseases of the nervous system..", False),
        ("Diseases of the nervous", False),
        ("The answer is Diseases of the nervous system", False),
    ],
)
def test_score_exact_match(prediction: str, expected: bool) -> None:
    assert score_exact_match(prediction, "Diseases of the nervous system") is expected


def test_examples_are_short_for_the_default_tokenizer(smol_tokenizer: Any) -> None:
    task = load_task(n_train_per_class=4)
    lengths = [len(encode_chat(smol_tokenizer, c, max_length=512).input_ids) for c in task.train]
    assert 50 < sum(lengths) / len(lengths) < 100


@pytest.mark.parametrize(
    ("name", "held"), [("chatterbot-trivia", 40), ("chatterbot-zh", 60), ("world-capitals", 36)]
)
def test_pair_tasks_hold_out_a_fixed_disjoint_split(name: str, held: int) -> None:
    a, b = load_task(name, seed=0), load_task(name, seed=1)
    assert len(a.eval) == held and [i.reference for i in a.eval] == [i.reference for i in b.eval]
    asked = {i.messages[0]["content"] for i in a.eval}
    assert asked.isdisjoint(c[0]["content"] for c in a.train)
    assert all(c[1]["role"] == "assistant" and c[1]["content"] for c in a.train)
    assert [c[0]["content"] for c in a.train] != [c[0]["content"] for c in b.train]  # seed shuffles


def test_world_capitals_come_from_the_analogy_set() -> None:
    from lorakit.data.tasks import world_capitals

    pairs = dict(world_capitals())
    assert len(pairs) == 116 and pairs["Greece"] == "Athens" and pairs["Japan"] == "Tokyo"
    task = load_task("world-capitals")
    assert len(task.train) == 80 and all(
        c[0]["content"].startswith("What is the capital of") for c in task.train
    )
    asked = {i.messages[0]["content"]: i.reference for i in task.eval}
    assert all(pairs[q.removeprefix("What is the capital of ").split("?")[0]] == a for q, a in asked.items())


def test_tasks_mix_with_plus() -> None:
    parts = [load_task(n) for n in ("icd10-chapter", "chatterbot-zh")]
    mixed = load_task("icd10-chapter+chatterbot-zh")
    assert len(mixed.train) == sum(len(p.train) for p in parts)
    assert [i.reference for i in mixed.eval] == [i.reference for p in parts for i in p.eval]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("icd10-chapter+nope")
