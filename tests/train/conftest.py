"""Tiny models and samples for the trainer tests: every step takes milliseconds on a CPU.

pytest runs with --import-mode=importlib, so test modules cannot import a helper module; the
helpers reach them through the `tiny` fixture instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lorakit import models
from lorakit.train import TrainConfig

VOCAB = 61


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return models.tiny_llama(seed, vocab_size=VOCAB)


def tiny_gpt2(seed: int = 0, dropout: float = 0.1, n_embd: int = 32) -> GPT2LMHeadModel:
    return models.tiny_gpt2(seed, vocab_size=VOCAB, n_embd=n_embd, dropout=dropout)


def make_samples(n: int, seed: int = 0, min_len: int = 5, max_len: int = 16) -> list[dict]:
    """Prompt tokens carry label -100, answers 1..8 tokens: loss-token counts differ a lot."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        answer = rng.randint(1, min(8, length - 1))
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        labels = [-100] * (length - answer) + ids[length - answer :]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def freeze_all_but(model: torch.nn.Module, *fragments: str) -> None:
    """A LoRA-free stand-in for an adapter: only some of the model's own weights train."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(f in name for f in fragments))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Interrupt:
    """A training hook that stops a run the way Ctrl-C would, after optimizer step `after` (1-based)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_step_end(self, model, step, total_steps):
        if step + 1 == self.after:
            raise KeyboardInterrupt


@pytest.fixture
def tiny() -> SimpleNamespace:
    return SimpleNamespace(
        VOCAB=VOCAB,
        llama=tiny_llama,
        gpt2=tiny_gpt2,
        samples=make_samples,
        freeze_all_but=freeze_all_but,
        params_of=params_of,
        Interrupt=Interrupt,
    )


@pytest.fixture
def make_config(tmp_path) -> Callable[..., TrainConfig]:
    def build(**overrides) -> TrainConfig:
        values = dict(
            steps=4,
            batch_size=4,
            micro_batch_size=2,
            lr=1e-2,
            warmup_ratio=0.25,
            precision="fp32",
            checkpoint_every=0,
            progress_bar=False,
            output_dir=str(tmp_path / "run"),
        )
        values.update(overrides)
        return TrainConfig(**values)

    return build
