"""TrainConfig: defaults, help on every field, YAML-style loading and clear refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
        ({"allocator": "tiny"}, "expected one of fast, lean"),
        ({"steps": 0}, "steps=0 must be at least 1"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 must be in \[0, 1\)"),
        ({"lr": "fast"}, "lr='fast' is not a valid float"),
    ],
)
def test_invalid_values_are_refused_with_the_reason(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


def test_the_precision_follows_the_cpu_kind(monkeypatch) -> None:
    """Faked CPUs: bf16 autocast only where bf16 is native, and the first line says why."""
    from lorakit.train import optim

    avx2 = "flags : fpu sse sse2 avx avx2 fma"
    sapphire = avx2 + " avx512f avx512_bf16 amx_bf16 amx_tile"
    cooper = avx2 + " avx512f avx512_bf16"
    assert optim.cpu_bf16_flags(avx2, "AVX2") == []
    assert optim.cpu_bf16_flags(sapphire, "AVX512") == ["amx_bf16", "avx512_bf16"]
    assert optim.cpu_bf16_flags(cooper, "AVX512") == ["avx512_bf16"]
    assert optim.cpu_bf16_flags("", "AMX") == ["amx_bf16"]  # no /proc/cpuinfo: torch's capability
    cpu = torch.device("cpu")
    for text, capability, dtype, says in (
        (avx2, "AVX2", None, "fp32 (this CPU has no AVX512-BF16 or AMX"),
        (cooper, "AVX512", torch.bfloat16, "bf16 autocast (this CPU has avx512_bf16"),
        (sapphire, "AMX", torch.bfloat16, "amx_bf16, avx512_bf16: native bf16"),
    ):
        monkeypatch.setattr(optim, "_cpuinfo", lambda text=text: text)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        chosen, line = optim.precision_choice("auto", cpu)
        assert chosen == dtype and says in line and optim.has_fast_bf16(cpu) == (dtype is not None)
        assert optim.precision_choice("fp32", cpu) == (None, "precision: fp32 (asked for)")
        assert optim.precision_choice("bf16", cpu)[0] == torch.bfloat16
    # oneDNN limited to AVX2 on that AMX CPU (how an AVX2-only machine is emulated): fp32, and why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    chosen, line = optim.precision_choice("auto", cpu)
    assert chosen is None and "ONEDNN_MAX_CPU_ISA=AVX2" in line and "amx_bf16" in line
    for limit, native in (("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True),
                          ("ALL", True), ("AVX2_VNNI_2", False), ("avx10_1_512_amx", True)):  # fmt: skip
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
        assert optim.has_fast_bf16(cpu) == native, limit


def test_the_trainer_says_its_precision_first(tiny, make_config) -> None:
    from lorakit.train import Trainer

    lines: list[str] = []
    model = tiny.llama()
    tiny.freeze_all_but(model, "q_proj")
    Trainer(model, tiny.samples(4), make_config(steps=1), log=lines.append).train()
    assert lines[0] == "precision: fp32 (asked for)"
