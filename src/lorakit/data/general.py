"""General English text for measuring forgetting.

The source is the Python documentation's topic help that ships in the standard library
(``pydoc_data.topics``: 79 topics, about 460k characters), so it is always available offline and
identical for everyone using the same Python. None of it is in any lorakit training set (the
default task is medical classification), so it is held out from every run: a rise in its
negative log-likelihood, or a next-token KL from the base model on its prompts, measures what
fine-tuning forgot. Users who train on Python documentation pick another held-out text with
``--forgetting-data FILE`` (their own prose, paragraphs separated by blank lines).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def _paragraphs(path: str | None = None) -> list[str]:
    """Every paragraph of every topic, topics in sorted order, RST heading rules removed; or of the
    user's own text file `path` (paragraphs separated by blank lines)."""
    paragraphs: list[str] = []
    for text in [_read_text(path)] if path else [topics[key] for key in sorted(topics)]:
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.splitlines() if not _HEADING_RULE.match(line.strip())]
            text = "\n".join(lines).strip("\n")
            if text.strip():
                paragraphs.append(text)
    return paragraphs


def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--forgetting-data {path} does not exist (a UTF-8 text file of general prose)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--forgetting-data {path} is not UTF-8 text (byte at offset {err.start}); save it as UTF-8"
        ) from None
    if not text.strip():
        raise ValueError(f"--forgetting-data {path} is empty")
    return text


def general_texts(chunk_chars: int = 2000, path: str | None = None) -> list[str]:
    """Deterministic chunks of the held-out text, each at most about ``chunk_chars`` characters.

    Chunks are whole paragraphs joined by blank lines (a longer paragraph is split between
    lines), so every chunk starts at a natural boundary rather than mid-word.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for piece in _pieces(chunk_chars, path):
        if current and size + len(piece) > chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _pieces(chunk_chars: int, path: str | None) -> list[str]:
    """Paragraphs, with any paragraph longer than ``chunk_chars`` cut into runs of whole lines."""
    pieces: list[str] = []
    for paragraph in _paragraphs(path):
        if len(paragraph) <= chunk_chars:
            pieces.append(paragraph)
            continue
        run: list[str] = []
        for line in paragraph.splitlines():
            if run and sum(len(x) + 1 for x in run) + len(line) > chunk_chars:
                pieces.append("\n".join(run))
                run = []
            run.append(line)
        pieces.append("\n".join(run))
    return pieces


def _is_prose(paragraph: str) -> bool:
    """A plain-English paragraph: not indented code or grammar, long enough to be a context."""
    return (
        len(paragraph) >= 120
        and not paragraph[0].isspace()
        and "::=" not in paragraph
        and ">>>" not in paragraph
    )


def general_prompts(n: int, max_chars: int = 200, path: str | None = None) -> list[str]:
    """``n`` short prose prompts spread evenly over all topics (or the file `path`), for a
    next-token KL measure. Each is the start of a prose paragraph, cut at a word boundary to at most
    ``max_chars``."""
    prose = [" ".join(p.split()) for p in _paragraphs(path) if _is_prose(p)]
    if not 0 < n <= len(prose):
        where = f" in {path}" if path else ""
        raise ValueError(
            f"--kl-prompts must be between 1 and {len(prose)} (prose paragraphs of 120+ characters{where}), got {n}"
        )
    step = len(prose) / n
    picked = [prose[int(i * step)] for i in range(n)]
    return [_cut_at_word(p, max_chars) for p in picked]


def _cut_at_word(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def general_questions(n: int) -> list[Any]:
    """The first `n` of chatterbot-corpus's 260 English trivia questions (a fixed order), as held-out
    items with their reference answers: a forgetting probe that is not perplexity. The base model
    answers some of them (about one in eight, by `answer_contains`); fine-tuning that forgets loses
    them. Disjoint from the built-in replay data (chatterbot's other English files)."""
    from .tasks import EvalItem, chatterbot_pairs

    if n <= 0:
        return []
    pairs = sorted(chatterbot_pairs("english", ("trivia",)))
    random.Random("general-questions").shuffle(pairs)
    return [EvalItem([{"role": "user", "content": q}], a) for q, a in pairs[:n]]


def answer_contains(prediction: str, reference: str) -> bool:
    """The reference answer appears in the prediction, both lower-cased with punctuation turned to
    spaces ("The Andromeda Galaxy." in "...is the Andromeda galaxy, which..."): a chat model answers
    trivia in a sentence, so exact match would score the base model at zero."""
    return _words(reference) in _words(prediction) if _words(reference).strip() else False


def _words(text: str) -> str:
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) + " "
