"""Default fine-tuning tasks, built at run time from installed packages (no data in the repo).

``icd10-chapter``: given an ICD-10-CM diagnosis description, answer the title of its chapter
("Diseases of the nervous system"). A semantic answer that a 135M model learns in a few hundred
steps, scored by exact match. Built from the CDC tabular XML shipped in ``simple-icd-10-cm``:
leaf codes whose description is unique (so the answer is determined by the question), chapters
with too few codes dropped, the same number of examples per chapter.

The held-out split is drawn with its own fixed seed, independent of the training seed and of
``n_train_per_class``, so every run and every method is evaluated on the same examples.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.chat import Conversation

ICD_QUESTION = (
    "Which ICD-10-CM chapter does this diagnosis belong to? Answer with the chapter title only."
    "\n\nDiagnosis: {description}"
)
MIN_CODES_PER_CHAPTER = 100
"""Chapters with fewer usable codes are left out (chapter 22, "Codes for special purposes", has 3)."""

_EVAL_SEED = "lorakit-icd10-chapter-heldout-v1"
_CODE_RANGE = re.compile(r"\s*\([A-Z0-9]{3}(?:-[A-Z0-9]{3})?\)\s*$")


@dataclass(frozen=True)
class EvalItem:
    """A held-out question: the prompt messages (no answer) and the reference answer."""

    messages: Conversation
    reference: str


@dataclass
class Task:
    """A training set of conversations and a held-out set scored with ``score_exact_match``."""

    name: str
    train: list[Conversation]
    eval: list[EvalItem]
    classes: list[str]


def score_exact_match(prediction: str, reference: str) -> bool:
    """Exact match after ignoring case, surrounding whitespace and one trailing period."""
    return _normalise(prediction) == _normalise(reference)


def cannot_match(partial: str, reference: str) -> bool:
    """Whether no continuation of a partly generated answer can exact-match `reference`, so its
    generation may stop (evaluation's early exit; `score_exact_match.decided`). Compared with
    whitespace removed: decoding more tokens can take a space away from earlier text (tokenizers'
    cleanup before punctuation), never add a character, so this never stops a row that could still
    match. A trailing replacement character (a token that ends inside a UTF-8 sequence) waits."""
    text = "".join(partial.rstrip("\ufffd").casefold().split())
    target = "".join(_normalise(reference).split()) + "."
    return not target.startswith(text)


score_exact_match.decided = cannot_match  # type: ignore[attr-defined]  # see lorakit.train.evaluate.exact_match


def _normalise(text: str) -> str:
    text = text.strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def _icd_xml_path() -> Path:
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the icd10-chapter task reads its data from the 'simple-icd-10-cm' package, which is "
            "not installed; run: pip install 'simple-icd-10-cm>=1.5'"
        )
    data_dir = Path(spec.submodule_search_locations[0]) / "data"
    found = sorted(data_dir.glob("*tabular*.xml"))
    if not found:
        raise FileNotFoundError(
            f"no ICD-10-CM tabular XML (*tabular*.xml) in {data_dir}; reinstall simple-icd-10-cm"
        )
    return found[0]


@functools.lru_cache(maxsize=1)
def icd10_chapters() -> dict[str, tuple[str, ...]]:
    """Chapter title -> sorted leaf descriptions unique across the whole code set.

    Parsed once per process (about half a second); every chapter is returned, including small
    ones, so callers decide what to drop.
    """
    root = ET.parse(_icd_xml_path()).getroot()
    leaves: dict[str, list[str]] = {}
    for chapter in root.iter("chapter"):
        title = _CODE_RANGE.sub("", " ".join((chapter.findtext("desc") or "").split()))
        leaves[title] = [
            " ".join((diag.findtext("desc") or "").split())
            for diag in chapter.iter("diag")
            if diag.find("diag") is None
        ]
    counts = Counter(desc for descs in leaves.values() for desc in descs)
    return {title: tuple(sorted(d for d in descs if d and counts[d] == 1)) for title, descs in leaves.items()}


def _question(description: str) -> Conversation:
    return [{"role": "user", "content": ICD_QUESTION.format(description=description)}]


def _icd10_chapter_task(n_train_per_class: int, n_eval_per_class: int, seed: int) -> Task:
    chapters = {t: d for t, d in icd10_chapters().items() if len(d) >= MIN_CODES_PER_CHAPTER}
    smallest = min(len(d) for d in chapters.values())
    if n_train_per_class + n_eval_per_class > smallest:
        raise ValueError(
            f"n_train_per_class + n_eval_per_class = {n_train_per_class + n_eval_per_class}, "
            f"but the smallest chapter has {smallest} usable codes; ask for at most {smallest} "
            "per chapter in total"
        )
    train: list[Conversation] = []
    held_out: list[EvalItem] = []
    for title, descriptions in chapters.items():
        shuffled = list(descriptions)
        random.Random(f"{_EVAL_SEED}:{title}").shuffle(shuffled)
        held = shuffled[:n_eval_per_class]
        pool = shuffled[n_eval_per_class:]
        held_out += [EvalItem(_question(d), title) for d in held]
        picked = random.Random(f"{seed}:{title}").sample(pool, n_train_per_class)
        train += [_question(d) + [{"role": "assistant", "content": title}] for d in picked]
    random.Random(seed).shuffle(train)
    random.Random(_EVAL_SEED).shuffle(held_out)
    return Task("icd10-chapter", train, held_out, list(chapters))


def chatterbot_pairs(language: str, files: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs, one per distinct question (its first answer, so a held-out question
    never appears in training): each conversation's first two turns, from chatterbot-corpus's YAML
    files of `language` (all files, or only `files`)."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "this task reads chatterbot-corpus's data, which is not installed; run: "
            "pip install chatterbot-corpus==1.3.3 (make install does)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "data" / language
    pairs: dict[str, str] = {}
    for path in sorted(folder.glob("*.yml")):
        if files is not None and path.stem not in files:
            continue
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if isinstance(conversation, list) and len(conversation) >= 2:
                question, answer = (" ".join(str(t).split()) for t in conversation[:2])
                if question and answer:
                    pairs.setdefault(question, answer)
    return list(pairs.items())


def chatterbot_english_chat() -> list[Conversation]:
    """chatterbot-corpus's English conversations outside trivia (ai, food, greetings, history, ...),
    each as a question and its first reply: general chat for replay, disjoint from the trivia of
    the general-question probe and from the pydoc text of the perplexity probe."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english" if spec else None
    files = tuple(p.stem for p in sorted(folder.glob("*.yml")) if p.stem != "trivia") if folder else None
    pairs = chatterbot_pairs("english", files)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


def _pairs_task(name: str, pairs: list[tuple[str, str]], n_train: int, n_eval: int, seed: int) -> Task:
    """A held-out split fixed by the task's name, then `n_train` training pairs drawn by `seed`."""
    shuffled = sorted(pairs)
    random.Random(f"{_EVAL_SEED}:{name}").shuffle(shuffled)
    if n_eval + min(n_train, 1) > len(shuffled):
        raise ValueError(f"{name} has {len(shuffled)} pairs; ask for fewer than {len(shuffled)} held out")
    held, pool = shuffled[:n_eval], shuffled[n_eval:]
    picked = random.Random(f"{seed}:{name}").sample(pool, min(n_train, len(pool)))

    def ask(q: str) -> Conversation:
        return [{"role": "user", "content": q}]

    train = [ask(q) + [{"role": "assistant", "content": a}] for q, a in picked]
    return Task(name, train, [EvalItem(ask(q), a) for q, a in held], [])


def _trivia_task(n_train_per_class: int, n_eval_per_class: int, seed: int) -> Task:
    """chatterbot-corpus's English trivia (261 question -> short answer pairs): recall of facts; a
    small model mostly cannot answer held-out questions, so its score is the answer NLL."""
    return _pairs_task("chatterbot-trivia", chatterbot_pairs("english", ("trivia",)), 10**9, 40, seed)


def _chinese_chat_task(n_train_per_class: int, n_eval_per_class: int, seed: int) -> Task:
    """chatterbot-corpus's Chinese conversations, first turn -> reply (one per question): a language and
    register the default model rarely writes; scored by answer NLL."""
    return _pairs_task("chatterbot-zh", chatterbot_pairs("chinese"), 10**9, 60, seed)


CAPITAL_QUESTION = "What is the capital of {country}? Answer with the city name only."
_ANALOGY_SECTIONS = ("capital-common-countries", "capital-world")


def world_capitals() -> list[tuple[str, str]]:
    """(country, capital) pairs from the capital sections of the Google analogy set that gensim ships
    (questions-words.txt: "Athens Greece Baghdad Iraq" gives Greece -> Athens, Iraq -> Baghdad)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the world-capitals task reads gensim's test data, which is not installed; run: "
            "pip install --no-deps gensim==4.4.0 (make install does)"
        )
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "questions-words.txt"
    pairs: dict[str, str] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section in _ANALOGY_SECTIONS:
            capital_a, country_a, capital_b, country_b = line.split()
            pairs.setdefault(country_a, capital_a)
            pairs.setdefault(country_b, capital_b)
    return sorted(pairs.items())


def _capitals_task(n_train_per_class: int, n_eval_per_class: int, seed: int) -> Task:
    """World capitals (116 countries): recall a fact in a fixed format, scored by exact match; the
    held-out countries' capitals come from what the base model knows, the format from training."""
    pairs = [(CAPITAL_QUESTION.format(country=country), city) for country, city in world_capitals()]
    return _pairs_task("world-capitals", pairs, 10**9, 36, seed)


TASKS: dict[str, Callable[[int, int, int], Task]] = {
    "icd10-chapter": _icd10_chapter_task,
    "world-capitals": _capitals_task,
    "chatterbot-trivia": _trivia_task,
    "chatterbot-zh": _chinese_chat_task,
}
"""Task name (as written in configs and on the command line) -> builder. "a+b" mixes tasks."""


def load_task(
    name: str = "icd10-chapter",
    n_train_per_class: int = 72,
    n_eval_per_class: int = 10,
    seed: int = 0,
) -> Task:
    """Build a task by name; ``seed`` picks the training examples, never the held-out ones.
    "a+b+c" is the tasks mixed: their training sets shuffled together, their held-out sets joined
    (score each task alone with its own name)."""
    names = name.split("+")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; available tasks: {', '.join(sorted(TASKS))} (or a+b)")
    if n_train_per_class < 0 or n_eval_per_class < 0:
        raise ValueError(
            f"n_train_per_class ({n_train_per_class}) and n_eval_per_class ({n_eval_per_class}) "
            "must be non-negative"
        )
    parts = [TASKS[n](n_train_per_class, n_eval_per_class, seed) for n in names]
    if len(parts) == 1:
        return parts[0]
    train = [c for part in parts for c in part.train]
    random.Random(seed).shuffle(train)
    return Task(
        name, train, [item for part in parts for item in part.eval], [c for p in parts for c in p.classes]
    )
