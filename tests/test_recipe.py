"""The default run's recipe per machine (lorakit.recipe): the choice with faked CPUs, and a whole
`lorakit train` on a faked AVX2-only CPU that trains the light recipe and says so first."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.recipe import LIGHT, choose_recipe


def test_the_light_recipe_only_where_training_runs_in_fp32_and_nothing_it_sets_was_given() -> None:
    values, line = choose_recipe({}, fp32=True)
    assert values == LIGHT and line.startswith("recipe: light (steps 100, lr 0.002 instead of 150")
    assert "fp32" in line and "--recipe standard" in line
    values, line = choose_recipe({"data": "x.jsonl"}, fp32=False)
    assert values == {"data": "x.jsonl"} and line.startswith("recipe: standard (training runs in bf16")
    values, line = choose_recipe({"steps": 300}, fp32=True)  # the light values go together
    assert values == {"steps": 300} and line == (
        "recipe: standard (--steps given: the light recipe's steps 100, lr 0.002 go together)"
    )
    assert choose_recipe({"recipe": "standard"}, fp32=True) == (
        {"recipe": "standard"},
        "recipe: standard (asked for)",
    )
    values, line = choose_recipe({"recipe": "light"}, fp32=False)
    assert values == {"recipe": "light", **LIGHT} and line.endswith("asked for)")
    # methods with their own learning rates, and long-document runs, have no light recipe
    assert choose_recipe({"method": "dora"}, fp32=True) == ({"method": "dora"}, None)
    assert choose_recipe({"task": "wiki"}, fp32=True) == ({"task": "wiki"}, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"recipe": "fast"}, "--recipe 'fast': expected one of auto, standard, light"),
        ({"recipe": "light", "lr": 1e-4}, "--recipe light sets steps 100, lr 0.002; drop --lr"),
        ({"recipe": "light", "method": "prompt"}, "measured for --method lora only, not prompt"),
    ],
)
def test_a_recipe_that_cannot_be_honoured_is_refused(values, message) -> None:
    with pytest.raises(ValueError, match=message):
        choose_recipe(values, fp32=True)


def test_lorakit_train_on_an_avx2_only_cpu_trains_the_light_recipe_and_says_so_first(
    tiny_run_files, tmp_path, monkeypatch, capsys
) -> None:
    from lorakit.train import optim

    monkeypatch.setattr(optim, "_cpuinfo", lambda: "flags : fpu sse sse2 avx avx2 fma")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_run_files / "base"), "--data", str(tiny_run_files / "train.jsonl"),
            "--batch-size", "2", "--micro-batch-size", "2", "--eval-limit", "2", "--general-tokens", "256",
            "--kl-prompts", "1", "--general-questions", "0", "--replay", "none", "--no-progress-bar",
            "--no-base-eval-cache", "--output-dir", str(out)]  # fmt: skip
    main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: light (steps 100, lr 0.002")
    assert any(line.startswith("precision: fp32 (this CPU has no AVX512-BF16 or AMX") for line in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 100 and metrics["train_config"]["lr"] == 2e-3
    assert metrics["run"]["recipe"] == "auto"
