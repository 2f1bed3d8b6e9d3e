"""Inference measurements: forward latency of one long sequence, and greedy generation.

Besides timings, a case records a small fingerprint of its outputs (a slice of the last-position
logits and the generated token ids), so the report can check that merged equals unmerged and
that lorakit and PEFT compute the same function: a fast wrong answer is not a result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cases import FORWARD_TOKENS, NEW_TOKENS
from .timing import measure

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LOGITS_HEAD = 16  # how many last-position logits the fingerprint keeps


def run_infer(
    model: nn.Module,
    tokenizer: Any,
    warmup: int,
    steps: int,
    forward_steps: int,
    batch: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time `forward_steps` forwards and `steps` generations, all under `inference_mode`.

    The forward gets more samples than generation: one forward is ~0.5 s on the default model, so
    extra samples are cheap, and the forward ratio (merged/base) is the figure that must be tight.
    """
    device = next(model.parameters()).device
    ids = _forward_ids(model).to(device)
    prompt = {k: v.expand(batch, -1).to(device) for k, v in _prompt(tokenizer).items()}  # (batch, T)
    generated: list[torch.Tensor] = []

    def forward() -> None:
        model(input_ids=ids, use_cache=False)

    def generate() -> None:
        out = model.generate(**prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        generated.append(out[0, prompt["input_ids"].shape[1] :])

    with torch.inference_mode():
        forward_timing = measure(forward, warmup, forward_steps, sync)
        last = model(input_ids=ids, use_cache=False).logits[0, -1].float()  # (vocab,)
        generate_timing = measure(generate, warmup, steps, sync)
    new_tokens = generated[-1].tolist()
    generate_timing["tokens_per_s"] = len(new_tokens) / generate_timing["median_s"]
    return {
        "forward": forward_timing,
        "generate": generate_timing,
        "fingerprint": {
            "logits_head": last[:LOGITS_HEAD].tolist(),
            "argmax": int(last.argmax()),
            "generated_ids": new_tokens,
        },
        "prompt_tokens": int(prompt["input_ids"].shape[1]),
        "batch": batch,
    }


def _forward_ids(model: nn.Module) -> torch.Tensor:
    """A fixed pseudo-random (1, FORWARD_TOKENS) sequence: the same in every case's process."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (1, FORWARD_TOKENS), generator=generator)


def _prompt(tokenizer: Any) -> dict[str, torch.Tensor]:
    """The chat-formatted prompt where the tokenizer has a template, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": PROMPT}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = PROMPT
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
