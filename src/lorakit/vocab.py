"""Vocabulary extension: propose domain tokens from training text, add them to the tokenizer and
the model, and train only their rows (plus any method), in PEFT's `trainable_token_indices` form.

    proposals = propose_tokens(tokenizer, texts, max_new=500)   # `lorakit vocab --data FILE`
    extension = extend_tokenizer(tokenizer, [p.string for p in proposals])
    extend_model(model, extension, init="mean")                 # embedding (and untied head) grow
    lorakit.apply(model, LoRAConfig()); train_new_tokens(model, extension)

The new tokens are ordinary (not special) added tokens: the tokenizer matches them in the raw text
before its own pre-tokenisation, so text that contains none of them tokenises exactly as before,
and the model (whose old rows are untouched) gives exactly the base's outputs on it. Each new row
starts as the mean of the rows of the pieces it replaces (`init="mean"`); `"random"` draws it from
a normal with the embedding's own spread, `"average"` takes the mean of all old rows.

A saved adapter folder holds the new rows (and the method's tensors), the extended tokenizer's files
and `vocabulary.json` (the base vocabulary size, the added strings, the init), so eval, chat and
merge rebuild the same model (`prepare_for_adapter`), and PEFT loads it after
`model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(folder)))`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch
from torch import nn

from .core.model import registry
from .core.tokens import add_token_rows, grow_embeddings, heads_tied, refuse_adapted_embeddings, token_layers

RECORD = "vocabulary.json"
INITS = ("mean", "random", "average")
_HAN = regex.compile(r"\p{Han}+")
_WORD = regex.compile(r"(?: ?)[\p{L}][\p{L}\p{M}\p{N}'\-]*")
MAX_NGRAM = 4  # Chinese candidates: character n-grams up to this length
MIN_WORD_CHARS = 4  # shorter words are rarely split, and an added short token matches inside words


@dataclass
class Proposal:
    string: str
    count: int  # occurrences in the text
    pieces: int  # tokens it takes now (with the strings proposed before it)
    saved: int  # tokens saved over the text, estimated: count x (pieces - 1)


def candidate_counts(texts: Iterable[str], chosen: set[str] | frozenset[str] = frozenset()) -> Counter[str]:
    """Strings that could become tokens: words of letters (with the space before them, as the
    byte-level tokenizer sees them) and, in runs of Chinese characters, every n-gram up to 4.
    Occurrences of `chosen` strings are cut out first, as the extended tokenizer will match them
    (longest first), so what they cover is not counted again."""
    counts: Counter[str] = Counter()
    for text in texts:
        for run in _HAN.findall(text):
            for piece in _split_run(run, chosen):
                for n in range(1, MAX_NGRAM + 1):
                    counts.update(piece[i : i + n] for i in range(len(piece) - n + 1))
        for word in _WORD.findall(_HAN.sub(" ", text)):
            if len(word.strip()) >= MIN_WORD_CHARS and word not in chosen:
                counts[word] += 1
    return counts


def _split_run(run: str, chosen: set[str] | frozenset[str]) -> list[str]:
    """The parts of a run of Chinese characters between the chosen strings in it (leftmost, longest)."""
    if not chosen:
        return [run]
    parts, start, i = [], 0, 0
    while i < len(run):
        size = next((n for n in range(MAX_NGRAM, 0, -1) if run[i : i + n] in chosen), 0)
        if size:
            parts.append(run[start:i])
            i = start = i + size
        else:
            i += 1
    parts.append(run[start:])
    return [p for p in parts if p]


def propose_tokens(
    tokenizer: Any, texts: Sequence[str], max_new: int = 500, min_count: int = 5, per_round: int = 50
) -> list[Proposal]:
    """The strings that would save the most tokens on `texts`, best first.

    Ranked by count x (pieces - 1). Overlapping candidates are resolved in rounds of at most
    `per_round`: within a round a candidate that overlaps one chosen in it (contains it, lies inside
    it, or shares an end with its start) waits; between rounds the candidates are counted again on
    the text with the chosen strings cut out (as the extended tokenizer will match them, longest
    first), so a bigram whose occurrences all lie inside a chosen trigram drops out."""
    if max_new < 1:
        raise ValueError(f"max_new must be at least 1, got {max_new}")
    texts = list(texts)
    pieces: dict[str, int] = {}
    chosen: list[Proposal] = []
    while len(chosen) < max_new:
        taken = {p.string for p in chosen}
        counts = {s: c for s, c in candidate_counts(texts, taken).items() if c >= min_count}
        new = [s for s in counts if s not in pieces]
        pieces.update(zip(new, _lengths(tokenizer, new), strict=True))
        scored = sorted(
            (Proposal(s, c, pieces[s], c * (pieces[s] - 1)) for s, c in counts.items() if pieces[s] > 1),
            key=lambda p: (-p.saved, -p.count, p.string),
        )
        batch: list[Proposal] = []
        for proposal in scored:
            if len(batch) >= min(per_round, max_new - len(chosen)):
                break
            if not any(_overlap(proposal.string, p.string) for p in batch):
                batch.append(proposal)
        if not batch:
            break
        chosen.extend(batch)
    return chosen


def _overlap(a: str, b: str) -> bool:
    """Would the two strings compete for the same characters of some text?"""
    if a in b or b in a:
        return True
    if not (_HAN.fullmatch(a) and _HAN.fullmatch(b)):  # words: separated by spaces, never overlapping
        return False
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def _lengths(tokenizer: Any, strings: list[str]) -> list[int]:
    if not strings:
        return []
    return [len(ids) for ids in tokenizer(strings, add_special_tokens=False)["input_ids"]]


def _add(tokenizer: Any, strings: list[str]) -> int:
    from tokenizers import AddedToken

    return tokenizer.add_tokens([AddedToken(s, normalized=False, special=False) for s in strings])


def token_count(tokenizer: Any, texts: Sequence[str]) -> int:
    return sum(_lengths(tokenizer, list(texts)))


def read_token_file(path: str | os.PathLike) -> list[str]:
    """One token per line: a JSON string (keeps leading spaces: `" hypertension"`) or the bare line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist (one token per line; or use 'auto')")
    strings = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith('"'):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON string ({err.msg}): {line[:60]}") from None
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number}: a line that starts with '\"' must be one JSON string")
            strings.append(value)
        else:
            strings.append(line)
    if not strings:
        raise ValueError(f"token file {path} holds no tokens")
    return strings


def write_token_file(path: str | os.PathLike, strings: Sequence[str]) -> None:
    from .core.io import atomic_write

    text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in strings)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


@dataclass
class VocabularyExtension:
    """Added strings on top of a base tokenizer: what the model needs to grow, and what a saved
    adapter folder records (`files()`)."""

    base_size: int  # the base tokenizer's size: the new tokens' ids follow it
    strings: list[str]
    pieces: list[list[int]]  # each string's ids under the base tokenizer
    tokenizer: Any  # the extended tokenizer
    init: str = "mean"
    seed: int = 0
    token_ids: list[int] = field(default_factory=list)
    base_rows: int = 0  # the base model's embedding rows (padded models have more than base_size)

    def record(self) -> dict[str, Any]:
        return {
            "base_vocab_size": self.base_size,
            "base_embedding_rows": self.base_rows,
            "added": self.strings,
            "init": self.init,
            "seed": self.seed,
            "token_ids": self.token_ids,
        }

    def files(self) -> dict[str, str | bytes]:
        """The extended tokenizer's files and `vocabulary.json`, for an adapter folder."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            files: dict[str, str | bytes] = {
                p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()
            }
        files[RECORD] = json.dumps(self.record(), indent=1, ensure_ascii=False) + "\n"
        return files


def extend_tokenizer(tokenizer: Any, strings: Sequence[str]) -> VocabularyExtension:
    """A copy of `tokenizer` with `strings` added as ordinary tokens. Refuses duplicates, empty
    strings and strings that already are one token (they would add a second id for the same text)."""
    strings = list(strings)
    if not strings:
        raise ValueError("no tokens to add")
    problems = []
    if len(set(strings)) != len(strings):
        repeated = next(s for s in strings if strings.count(s) > 1)
        problems.append(f"{repeated!r} is listed twice")
    if any(not s for s in strings):
        problems.append("an empty string")
    pieces = tokenizer(strings, add_special_tokens=False)["input_ids"]
    single = [s for s, p in zip(strings, pieces, strict=True) if len(p) == 1]
    if single:
        problems.append(f"{len(single)} already one token, e.g. {single[0]!r}")
    if problems:
        raise ValueError("cannot add these tokens: " + "; ".join(problems))
    extended = copy.deepcopy(tokenizer)
    base_size = len(tokenizer)
    added = _add(extended, strings)
    if added != len(strings) or len(extended) != base_size + len(strings):
        raise ValueError(
            f"the tokenizer took {added} of {len(strings)} new tokens (some clash with its added tokens)"
        )
    return VocabularyExtension(base_size, strings, [list(p) for p in pieces], extended)


def new_rows(
    weight: torch.Tensor, pieces: list[list[int]], init: str, generator: torch.Generator
) -> torch.Tensor:
    """Initial rows for the new tokens from an (V, d) embedding or head weight."""
    w = weight.detach().float()
    if init == "mean":
        return torch.stack([w[ids].mean(0) for ids in pieces])
    if init == "average":
        return w.mean(0).expand(len(pieces), -1).clone()
    if init == "random":
        return torch.randn(len(pieces), w.shape[1], generator=generator) * w.std() + w.mean(0)
    raise ValueError(f"token init must be one of {', '.join(INITS)}, got {init!r}")


def extend_model(
    model: nn.Module, extension: VocabularyExtension, init: str = "mean", seed: int = 0
) -> list[int]:
    """Give the model rows for the extension's tokens (growing the embedding and an untied head),
    each initialised by `init`; the model records the extension, so saved adapters carry the
    tokenizer. Returns the new token ids. Call before adding adapters."""
    refuse_adapted_embeddings(model)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < extension.base_size:
        raise ValueError(
            f"the model has {rows} embedding rows and the tokenizer {extension.base_size} tokens; "
            "extend the model the tokenizer belongs to"
        )
    generator = torch.Generator().manual_seed(seed)
    embed = new_rows(model.get_input_embeddings().weight, extension.pieces, init, generator)
    head = None
    if not heads_tied(model) and model.get_output_embeddings() is not None:
        head = new_rows(model.get_output_embeddings().weight, extension.pieces, init, generator)
    ids = grow_embeddings(model, extension.base_size, embed, head)
    extension.init, extension.seed, extension.token_ids, extension.base_rows = init, seed, ids, rows
    registry(model).vocabulary = extension
    return ids


def train_new_tokens(model: nn.Module, extension: VocabularyExtension, adapter_name: str = "default") -> None:
    """Make the new tokens' rows trainable as part of adapter `adapter_name` (saved with it)."""
    if not extension.token_ids:
        raise ValueError("extend the model first (extend_model)")
    add_token_rows(model, adapter_name, token_layers(model, extension.token_ids))


def prepare_for_adapter(model: nn.Module, tokenizer: Any, folder: str | os.PathLike) -> Any:
    """If the adapter folder extends the vocabulary, grow `model` as its training did and return the
    folder's tokenizer; otherwise return `tokenizer` unchanged. Refuses (changing nothing) a folder
    whose tokenizer does not extend this one."""
    folder = Path(folder)
    record_path = folder / RECORD
    if not record_path.is_file():
        return tokenizer
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        base_size, strings = int(record["base_vocab_size"]), list(record["added"])
        base_rows = int(record.get("base_embedding_rows") or base_size)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record_path} is not a lorakit vocabulary record: {err}") from None
    extended = _folder_tokenizer(folder, tokenizer, base_size, len(strings))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows == max(base_rows, base_size + len(strings)) and len(tokenizer) == len(extended):
        return extended  # the model and tokenizer already have the tokens (a merged model)
    if rows != base_rows:
        raise ValueError(
            f"{folder} extends a model with {base_rows} embedding rows and this one has {rows}: load "
            "it on the base model it was trained on"
        )
    pieces = tokenizer(strings, add_special_tokens=False)["input_ids"]
    extension = VocabularyExtension(base_size, strings, [list(p) for p in pieces], extended)
    extend_model(model, extension, record.get("init", "mean"), int(record.get("seed", 0)))
    return extended


def _folder_tokenizer(folder: Path, tokenizer: Any, base_size: int, added: int) -> Any:
    from transformers import AutoTokenizer

    from .models import ensure_pad_token

    try:
        extended = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # a missing or unreadable tokenizer file
        raise ValueError(f"{folder} records added tokens but its tokenizer cannot be read: {err}") from None
    ensure_pad_token(extended)
    if len(tokenizer) != base_size and len(tokenizer) != base_size + added:
        raise ValueError(
            f"{folder} was trained on a tokenizer of {base_size} tokens; this model's has {len(tokenizer)}"
        )
    ours, theirs = tokenizer.get_vocab(), extended.get_vocab()
    differ = next((t for t, i in ours.items() if theirs.get(t) != i), None)
    if differ is not None or len(extended) != base_size + added:
        where = (
            f"token {differ!r} is id {ours[differ]} here and {theirs.get(differ)} there"
            if differ
            else (f"it has {len(extended)} tokens, not {base_size} + {added}")
        )
        raise ValueError(
            f"{folder}'s tokenizer is not this model's tokenizer plus the added tokens ({where}); load "
            "the adapter on the base model it was trained on"
        )
    return extended


def conversation_texts(conversations: Iterable[Any]) -> list[str]:
    """Every message's text in chat conversations (lists of {"role", "content"} messages)."""
    return [m["content"] for c in conversations for m in c if isinstance(m.get("content"), str)]


def for_run(
    cfg: Any, tokenizer: Any, conversations: Sequence[Any], in_place: bool, say: Any
) -> VocabularyExtension | None:
    """`lorakit train --add-tokens FILE|auto`: the extended tokenizer for the run, or None. Checked
    before the model loads."""
    if cfg.token_init not in INITS:
        raise ValueError(f"--token-init must be one of {', '.join(INITS)}, got {cfg.token_init!r}")
    if cfg.add_tokens is None:
        return None
    if in_place:
        raise ValueError(
            f"--add-tokens trains the new tokens' rows next to an adapter; --method {cfg.method} trains "
            "base weights in place (full fine-tuning trains the whole embedding): use an adapter method"
        )
    texts = conversation_texts(conversations)
    if cfg.add_tokens == "auto":
        proposals = propose_tokens(tokenizer, texts, cfg.vocab_max_new, cfg.vocab_min_count)
        if not proposals:
            raise ValueError(
                f"--add-tokens auto found no string in the training data that occurs {cfg.vocab_min_count}+ "
                "times and takes more than one token; lower --vocab-min-count or give a file"
            )
        strings = [p.string for p in proposals]
    else:
        strings = read_token_file(cfg.add_tokens)
    extension = extend_tokenizer(tokenizer, strings)
    before, after = token_count(tokenizer, texts), token_count(extension.tokenizer, texts)
    say(
        f"vocabulary: {len(strings)} tokens added ({cfg.add_tokens}); the training text takes {after:,} "
        f"tokens instead of {before:,} ({after / max(before, 1) - 1:+.1%}); rows initialised by {cfg.token_init}"
    )
    say(
        "note: vLLM, SGLang and llama.cpp serve no trainable token rows in an adapter; serve the merged "
        "model (lorakit merge writes it with the extended tokenizer)"
    )
    return extension
