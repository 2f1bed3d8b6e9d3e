"""Passkey retrieval (Mohtashami and Jaggi 2023; the test LongLoRA reports): a random number hidden
at a chosen depth of long filler text, asked for at the end, scored by exact match. A model that
cannot attend across the distance from the key to the question cannot answer, so accuracy against
length and depth shows the context a model really uses.

The filler is the repeated, information-free text of the original test; the prompt is one user turn
(the model's chat template adds its own tokens), built to a target length in tokens of the given
tokenizer, with the key sentence starting at `depth` (0 = the start, 1 = just before the question).
"""

from __future__ import annotations

import random
from typing import Any

from lorakit.data.tasks import EvalItem

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? Answer with the number only."


def key_sentence(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> str:
    """A user message of about `length` tokens (the chat template's own few come on top) with the key
    sentence at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is a fraction of the text, in [0, 1]; got {depth}")
    fixed = len(tokenizer(key_sentence(key) + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER * 8, add_special_tokens=False)["input_ids"]) / 8
    repeats = max(0, round((length - fixed) / per_filler))
    if repeats == 0:
        raise ValueError(f"{length} tokens do not leave room for any filler; ask for at least {fixed + 30}")
    before = round(repeats * depth)
    return FILLER * before + key_sentence(key) + FILLER * (repeats - before) + QUESTION


def passkey_items(
    tokenizer: Any, length: int, depths: list[float], per_depth: int, seed: int = 0
) -> list[EvalItem]:
    """`per_depth` items at each depth, keys drawn from `seed` (5 digits), as held-out items."""
    rng = random.Random(f"passkey:{seed}:{length}")
    items = []
    for depth in depths:
        for _ in range(per_depth):
            key = rng.randrange(10_000, 100_000)
            prompt = passkey_prompt(tokenizer, length, depth, key)
            items.append(EvalItem([{"role": "user", "content": prompt}], str(key)))
    return items
