"""The data of a run: training conversations and held-out items, read and checked before any model
loads, then tokenised with the model's chat template."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .data import EvalItem, build_sft_dataset, general_prompts, general_texts, load_task, read_examples
from .options import RunConfig

log = logging.getLogger("lorakit")

@dataclass
class EvalData:
    items: list[EvalItem]
    answer_samples: list[Any]
    texts: list[str]
    prompts: list[str]


def read_data(cfg: RunConfig, seed: int) -> tuple[list[Any], list[EvalItem]]:
    """Training conversations and held-out items; read (and validated) before any model loads,
    so a malformed data line fails in milliseconds, not after the model load."""
    task = load_task(cfg.task, seed=seed) if cfg.data is None or cfg.eval_data is None else None
    train_convs = read_examples(cfg.data) if cfg.data else task.train
    items = _eval_items(cfg.eval_data) if cfg.eval_data else task.eval
    return train_convs, items[: cfg.eval_limit] if cfg.eval_limit else items


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
    if train.skipped:
        log.warning(
            "skipped %d training sample(s) whose answer was truncated away (max_length=%d)",
            train.skipped,
            cfg.max_length,
        )
    return train, EvalData(items, answers.samples, general_texts(), general_prompts(cfg.kl_prompts))


def _eval_items(path: str) -> list[EvalItem]:
    items = []
    for conv in read_examples(path):
        if conv[-1]["role"] != "assistant":
            raise ValueError(
                f"{path}: every held-out conversation must end with the reference assistant turn"
            )
        items.append(EvalItem(messages=conv[:-1], reference=conv[-1]["content"]))
    return items
