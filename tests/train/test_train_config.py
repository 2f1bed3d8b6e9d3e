"""TrainConfig: defaults, help on every field, YAML-style loading and clear refusals."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.train import TrainConfig


def test_defaults_match_the_documented_run() -> None:
    c = TrainConfig()
    assert (c.steps, c.batch_size, c.micro_batch_size, c.accumulation_steps) == (150, 16, 8, 2)
    assert (c.lr, c.weight_decay, c.warmup_ratio, c.schedule) == (1e-3, 0.0, 0.05, "cosine")
    assert (c.max_grad_norm, c.seed, c.precision) == (1.0, 0, "auto")
    assert (c.checkpoint_every, c.log_every, c.output_dir, c.resume) == (50, 1, "runs/lorakit", False)
    assert c.gradient_checkpointing is False


def test_every_field_has_help_for_the_cli() -> None:
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_from_dict_converts_yaml_strings() -> None:
    c = TrainConfig.from_dict({"lr": "1e-3", "steps": "20", "resume": "true", "warmup_ratio": 0})
    assert c.lr == 1e-3 and c.steps == 20 and c.resume is True
    assert isinstance(c.warmup_ratio, float)


def test_from_dict_rejects_unknown_keys_and_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown TrainConfig option\(s\): learning_rate.*lr"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_from_dict_round_trips() -> None:
    c = TrainConfig(steps=7, schedule="linear")
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_size": 10, "micro_batch_size": 4}, "not a multiple of micro_batch_size"),
        ({"schedule": "step"}, "expected one of cosine, linear, constant"),
        ({"precision": "fp16"}, "expected one of auto, bf16, fp32"),
        ({"steps": 0}, "steps=0 must be at least 1"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 must be in \[0, 1\)"),
        ({"lr": "fast"}, "lr='fast' is not a valid float"),
    ],
)
def test_invalid_values_are_refused_with_the_reason(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)
