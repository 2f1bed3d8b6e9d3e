"""The data of a run: training conversations and held-out items, read and checked before any model
loads, then tokenised with the model's chat template."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import EvalItem, build_sft_dataset, general_prompts, general_texts, load_task, read_examples
from .data.general import general_questions
from .options import RunConfig, column_map
from .train.batching import Replay

log = logging.getLogger("lorakit")


@dataclass
class EvalData:
    items: list[EvalItem]
    answer_samples: list[Any]
    texts: list[str]
    prompts: list[str]
    questions: list[EvalItem] = field(default_factory=list)  # the general-question probe


# With --data and no --eval-data, this share of the user's conversations is held out for the task
# scores (seeded, at most MAX_HELD_OUT); below MIN_FOR_HOLD_OUT conversations the task is not scored.
HOLD_OUT_FRACTION, MAX_HELD_OUT, MIN_FOR_HOLD_OUT = 0.1, 200, 20


def read_data(cfg: RunConfig, seed: int, say: Any = log.info) -> tuple[list[Any], list[EvalItem]]:
    """Training conversations and held-out items; read (and validated) before any model loads,
    so a malformed data line fails in milliseconds, not after the model load.

    Held-out items come from --eval-data, else from the built-in task when it is what trains, else
    from a seeded 10% of --data: never from another task than the one trained."""
    columns = column_map(cfg.columns)
    if cfg.data is None:
        task = load_task(cfg.task, seed=seed)
        train_convs = task.train
        items = _eval_items(cfg.eval_data, columns) if cfg.eval_data else task.eval
    else:
        train_convs = read_examples(cfg.data, columns)
        if cfg.eval_data:
            items = _eval_items(cfg.eval_data, columns)
        else:
            train_convs, items = hold_out(train_convs, seed, cfg.data, say)
    return train_convs, items[: cfg.eval_limit] if cfg.eval_limit else items


def hold_out(conversations: list[Any], seed: int, path: str, say: Any) -> tuple[list[Any], list[EvalItem]]:
    """Split a seeded share of `conversations` off as held-out items (each up to its last answer)."""
    if len(conversations) < MIN_FOR_HOLD_OUT:
        say(
            f"no --eval-data and only {len(conversations)} conversations in {path}: the task scores "
            f"(exact match, answer NLL) are skipped; forgetting is still measured. Pass --eval-data "
            f"or {MIN_FOR_HOLD_OUT}+ conversations to score the task"
        )
        return conversations, []
    count = min(MAX_HELD_OUT, max(1, round(HOLD_OUT_FRACTION * len(conversations))))
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    say(
        f"no --eval-data: holding out {count} of the {len(conversations)} conversations in {path} "
        f"(seed {seed}) for the task scores; training on the other {len(conversations) - count}"
    )
    items = []
    for i in sorted(held):
        conv = conversations[i]
        last = max(j for j, m in enumerate(conv) if m["role"] == "assistant")
        items.append(EvalItem(messages=conv[:last], reference=conv[last]["content"]))
    return [c for i, c in enumerate(conversations) if i not in held], items


def build_data(
    cfg: RunConfig, tokenizer: Any, conversations: tuple[list[Any], list[EvalItem]]
) -> tuple[Any, EvalData]:
    train_convs, items = conversations
    train = build_sft_dataset(tokenizer, train_convs, cfg.max_length, cfg.last_turn_only)
    answers = build_sft_dataset(
        tokenizer,
        [[*it.messages, {"role": "assistant", "content": it.reference}] for it in items],
        cfg.max_length,
    )
    if not train.samples:
        raise ValueError(
            f"no training sample is left: all {train.skipped} had their answer truncated away by "
            f"--max-length {cfg.max_length}; raise --max-length or shorten the prompts"
        )
    if train.skipped:
        log.warning(
            "skipped %d training sample(s) whose answer was truncated away (max_length=%d)",
            train.skipped,
            cfg.max_length,
        )
    texts = general_texts(path=cfg.forgetting_data)
    prompts = general_prompts(cfg.kl_prompts, path=cfg.forgetting_data)
    return train, EvalData(items, answers.samples, texts, prompts, general_questions(cfg.general_questions))


def _eval_items(path: str, columns: dict[str, str] | None) -> list[EvalItem]:
    items = []
    for conv in read_examples(path, columns):
        if conv[-1]["role"] != "assistant":
            raise ValueError(
                f"{path}: every held-out conversation must end with the reference assistant turn"
            )
        items.append(EvalItem(messages=conv[:-1], reference=conv[-1]["content"]))
    return items


REPLAY_SOURCES = ("chatterbot",)


def parse_replay(spec: str) -> tuple[str, float]:
    """`SOURCE:RATIO` -> (source, ratio); the source is a built-in name or a data file."""
    source, sep, ratio_text = spec.rpartition(":")
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = math.nan
    if not sep or not source or not math.isfinite(ratio):
        raise ValueError(
            f"--replay {spec!r}: expected SOURCE:RATIO, e.g. chatterbot:0.25 or general.jsonl:0.3"
        )
    if not 0 <= ratio < 1:
        raise ValueError(
            f"--replay {spec!r}: the ratio is the share of each batch replayed, in [0, 1); got {ratio}"
        )
    if source not in REPLAY_SOURCES and not Path(source).exists():
        raise ValueError(
            f"--replay {spec!r}: {source!r} is neither a built-in source ({', '.join(REPLAY_SOURCES)}) nor an "
            "existing data file"
        )
    return source, ratio


def replay_on(cfg: RunConfig) -> bool:
    """Whether the run replays general data (the default, `chatterbot:0.125`; `--replay none` is off)."""
    return bool(cfg.replay) and cfg.replay.strip().lower() not in ("none", "off")


def read_replay(cfg: RunConfig) -> tuple[list[Any], float] | None:
    """The replay conversations and ratio of `--replay`, read before any model loads."""
    if not replay_on(cfg):
        return None
    source, ratio = parse_replay(cfg.replay)
    if source == "chatterbot":
        from .data.tasks import chatterbot_english_chat

        conversations = chatterbot_english_chat()
    else:
        conversations = read_examples(source, column_map(cfg.columns))
    return conversations, ratio


def build_replay(cfg: RunConfig, tokenizer: Any, replay: tuple[list[Any], float] | None) -> Replay | None:
    if replay is None or replay[1] == 0:
        return None
    conversations, ratio = replay
    data = build_sft_dataset(tokenizer, conversations, cfg.max_length, cfg.last_turn_only)
    if not data.samples:
        raise ValueError(
            f"--replay {cfg.replay}: no sample is left after tokenising (all answers truncated?)"
        )
    return Replay(data.samples, ratio)
