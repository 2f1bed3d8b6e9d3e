"""`lorakit check`'s rules per server, the portable LoRA form that fixes what a conversion can fix
(the same logits in PEFT, and every server's answer 'yes' afterwards), AdaLoRA's LoRA form, and the
warning `lorakit train` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.combine import portable_lora
from lorakit.core.model import adapter_deltas
from lorakit.core.state import read_adapter_folder
from lorakit.models import tiny_llama
from lorakit.serving import Features, check_folder, train_warnings, verdicts

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def _answers(config: dict, tensors: tuple[str, ...] = ()) -> dict[str, str]:
    return {v.server: v.answer for v in verdicts(Features.of_config(config, tensors))}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, {"vllm": "yes", "sglang": "yes", "llama.cpp": "convert", "ollama": "yes"}),
        (
            {"use_rslora": True},
            {"vllm": "yes", "sglang": "convert", "llama.cpp": "convert", "ollama": "convert"},
        ),
        ({"alpha_pattern": {"v_proj": 4}}, {"vllm": "convert", "sglang": "convert", "ollama": "convert"}),
        ({"rank_pattern": {"v_proj": 8}}, {"vllm": "yes"}),  # the same rank as r: no pattern in effect
        ({"r": 32}, {"vllm": "convert", "sglang": "yes"}),
        ({"r": 600}, {"vllm": "no"}),
        ({"lora_alpha": 16.5}, {"vllm": "yes", "ollama": "convert"}),
        ({"use_dora": True}, dict.fromkeys(("vllm", "sglang", "llama.cpp", "ollama"), "no")),
        ({"modules_to_save": ["lm_head"]}, dict.fromkeys(("vllm", "sglang", "llama.cpp", "ollama"), "no")),
        (
            {"alora_invocation_tokens": [5, 6]},
            {"vllm": "no", "sglang": "no", "llama.cpp": "convert", "ollama": "no"},
        ),
        ({"target_modules": ["q_proj", "input_layernorm"]}, {"vllm": "no", "llama.cpp": "convert"}),
        ({"peft_type": "PROMPT_TUNING"}, dict.fromkeys(("vllm", "sglang", "llama.cpp", "ollama"), "no")),
        ({"peft_type": "QUANTUM_PEFT"}, dict.fromkeys(("vllm", "sglang", "llama.cpp", "ollama"), "convert")),
    ],
    ids=[
        "lora",
        "rslora",
        "alpha-pattern",
        "same-rank-pattern",
        "r32",
        "r600",
        "float-alpha",
        "dora",
        "modules-to-save",
        "alora",
        "odd-target",
        "prompt",
        "quantum",
    ],  # fmt: skip
)
def test_rules(change: dict, expected: dict) -> None:
    answers = _answers({**LORA, **change})
    assert {k: answers[k] for k in expected} == expected


def test_vllm_rank_flag_and_bias_tensor() -> None:
    (vllm,) = [v for v in verdicts(Features.of_config({**LORA, "r": 24})) if v.server == "vllm"]
    assert vllm.todo == ["start vLLM with --max-lora-rank 32"]
    answers = _answers(LORA, ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",))
    assert answers["vllm"] == "no" and answers["sglang"] == "no"


def _tiny_base() -> torch.nn.Module:
    torch.manual_seed(1)
    return tiny_llama().eval()


def _trained(model: torch.nn.Module, config: object) -> None:
    lk.apply(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)


def test_portable_form_serves_the_same_change(tmp_path: Path, peft_logits) -> None:
    model = _tiny_base()
    config = lk.LoRAConfig(
        rank=4, alpha=6.5, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}
    )
    _trained(model, config)
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    before = {v.server: v.answer for v in check_folder(folder)[1]}
    assert before["vllm"] == before["sglang"] == before["ollama"] == "convert"
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    out = portable_lora(folder, tmp_path / "portable")
    config_out, tensors = read_adapter_folder(out)
    assert config_out["r"] == config_out["lora_alpha"] == 4 and not config_out["use_rslora"]
    assert not config_out["rank_pattern"] and not config_out["alpha_pattern"]
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {4}  # down_proj zero-padded
    after = {v.server: v.answer for v in check_folder(out)[1]}
    assert after == {"vllm": "yes", "sglang": "yes", "llama.cpp": "convert", "ollama": "yes"}
    with torch.no_grad():
        served = peft_logits(_tiny_base, out, ids)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)
    reloaded = _tiny_base()  # and lorakit reads it back to the same model
    lk.load_adapter(reloaded, out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_alora_keeps_its_invocation(tmp_path: Path) -> None:
    model = _tiny_base()
    _trained(model, lk.ALoRAConfig(rank=4, invocation_tokens=[3, 4]))
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    config, _ = read_adapter_folder(portable_lora(folder, tmp_path / "portable"))
    assert config["alora_invocation_tokens"] == [3, 4]


def test_adalora_exports_as_lora(tmp_path: Path, peft_logits) -> None:
    model = _tiny_base()
    _trained(model, lk.AdaLoRAConfig(target_rank=2, init_rank=4, target_modules=["q_proj", "up_proj"]))
    for _, _, delta in adapter_deltas(model, "default"):  # uneven ranks after a reallocation
        delta.mask[: torch.randint(1, 4, ()).item()] = False
        delta.apply_mask()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    out = lk.export_lora(model, tmp_path / "lora")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(_tiny_base, out, ids), expected, atol=1e-5, rtol=1e-5)


def test_train_warnings() -> None:
    assert train_warnings(lk.LoRAConfig()) == []
    (line,) = train_warnings(lk.DoRAConfig())
    assert line.startswith("serving: DoRA: not served as trained by vllm, sglang, llama.cpp, ollama")
    assert train_warnings(lk.FullFinetuneConfig()) == []
    assert "PREFIX_TUNING" in train_warnings(lk.PrefixTuningConfig())[0]


def test_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_base()
    _trained(model, lk.LoRAConfig(rank=4, use_rslora=True))
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    main(["check", str(folder)])
    text = capsys.readouterr().out
    assert "sglang     convert" in text and "sglang#40835" in text and "lorakit export --format peft" in text
    main(["check", str(folder), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert {s["server"]: s["answer"] for s in result["servers"]}["vllm"] == "yes"
