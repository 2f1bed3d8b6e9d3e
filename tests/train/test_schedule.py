"""The learning-rate schedule as a function of the step, and what the trainer actually used."""

from __future__ import annotations

import json
import math

import pytest

from lorakit.train import Trainer
from lorakit.train.optim import lr_factor, warmup_steps


def test_warmup_rounds_up() -> None:
    assert warmup_steps(150, 0.05) == 8  # 7.5 steps
    assert warmup_steps(10, 0.0) == 0
    assert warmup_steps(10, 0.01) == 1


def test_warmup_is_linear_from_one_step_and_reaches_the_peak() -> None:
    assert [lr_factor(s, 20, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, 4, "cosine") == 1.0  # first decay step starts at the peak


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("cosine", 12, 0.5),  # halfway through the 16 decay steps
        ("cosine", 19, 0.5 * (1 + math.cos(math.pi * 15 / 16))),
        ("linear", 12, 0.5),
        ("linear", 19, 1 / 16),
        ("constant", 19, 1.0),
    ],
)
def test_decay_values(schedule: str, step: int, expected: float) -> None:
    assert lr_factor(step, 20, 4, schedule) == pytest.approx(expected)


def test_no_warmup_starts_at_the_peak() -> None:
    assert lr_factor(0, 10, 0, "linear") == 1.0


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of cosine, linear, constant"):
        lr_factor(0, 10, 1, "exp")


def test_trainer_uses_the_schedule_per_step(tiny, make_config) -> None:
    config = make_config(steps=8, warmup_ratio=0.25, lr=0.1, schedule="linear")
    result = Trainer(tiny.llama(), tiny.samples(12), config).train()
    lrs = [json.loads(line)["lr"] for line in result.log_path.read_text().splitlines()]
    expected = [0.1 * lr_factor(s, 8, 2, "linear") for s in range(8)]
    assert lrs == pytest.approx(expected)
