"""The round trip through llama.cpp itself (opt-in: `make test-clients` builds llama-cpp-python and
runs these; the default suite skips them). A LoRA and an rsLoRA adapter with random factors on the
default model, exported to GGUF, served by llama.cpp: the adapter changes llama.cpp's logits as it
changes lorakit's, and the merged GGUF gives lorakit's greedy answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.bench.clients import roundtrip
from lorakit.models import default_model_available, load_model

pytest.importorskip("llama_cpp")
pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(not default_model_available(), reason="the default model is not installed"),
]


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_llama_cpp_serves_the_exported_adapter(tmp_path: Path, rslora: bool) -> None:
    model, _ = load_model()
    torch.manual_seed(0)
    lk.apply(model, lk.LoRAConfig(rank=16, alpha=4 if rslora else 16, use_rslora=rslora, init="gaussian"))
    with torch.no_grad():  # a change large enough to move the logits, small enough to keep sense
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02 if "lora_A" in name else 0.05)
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    result = roundtrip(str(folder), tmp_path / "out", prompts=6, max_new_tokens=12)
    runs = result["runs"]
    # the adapter's effect on an f32 base, llama.cpp's against lorakit's: a sqrt(r) scale error would
    # leave 75% of it, a wrong q/k row order more
    effect = result["adapter_effect_relative_error"]["f32"]
    assert effect["max"] < 0.05, result["adapter_effect_relative_error"]
    assert runs["f32 base + adapter GGUF"]["identical_answers"] == 6
    # f32 weights: only llama.cpp's own arithmetic differs from lorakit's
    assert runs["merged GGUF f32"]["first_token_logits_max_abs_diff"]["max"] < 0.05
    assert runs["merged GGUF f32"]["identical_answers"] == 6
    assert runs["merged GGUF f16"]["identical_answers"] >= 5
