"""What a model answers to passkey prompts (docs/methods/longlora.md, section 3): the keys and the
greedy answers, so a 0/3 can be told apart from a model that no longer answers at all.

    .venv/bin/python docs/methods/longlora_passkey.py [ADAPTER] [--length 4096]

ADAPTER: a run's adapter folder (a LongLoRA one is loaded with its positions); none: the base model."""

from __future__ import annotations

import argparse

import torch

import lorakit as lk
from lorakit.long.evaluate import PASSKEY_ROOM
from lorakit.long.passkey import passkey_items
from lorakit.run import api_load
from lorakit.train.evaluate import generate_answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter", nargs="?", default=None)
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    model, tokenizer = api_load(None)
    if args.adapter:
        tokenizer, _ = lk.load_as_trained(model, tokenizer, args.adapter)
    model.eval()
    items = passkey_items(tokenizer, args.length - PASSKEY_ROOM, [0.1, 0.5, 0.9], 1, 0)  # as the run's
    answers = generate_answers(
        model, tokenizer, [it.messages for it in items], max_new_tokens=24, batch_size=1,
        autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    for depth, item, answer in zip((0.1, 0.5, 0.9), items, answers, strict=True):
        print(f"depth {depth:.0%}: key {item.reference}, answer {answer!r}")


if __name__ == "__main__":
    main()
