"""Adapter folders cross between lorakit and Hugging Face PEFT in both directions, same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.models import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

MODELS = {
    "llama": (lambda: tiny_llama(bias=True), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
}


def _ids(model: torch.nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _peft_model(make, targets, **kw):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it switches fan_in_fan_out on for Conv1D
        return peft.get_peft_model(make(), config).eval()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2, "c_fc": 2}, "alpha_pattern": {"v_proj": 3}}],
)
def test_peft_folder_loads_into_lorakit_with_peft_logits(arch, extra, tmp_path) -> None:
    make, targets = MODELS[arch]
    reference = _peft_model(make, targets, **extra)
    ids = _ids(reference)
    expected = reference(ids).logits
    reference.save_pretrained(tmp_path)
    model = make().eval()
    lk.load_adapter(model, tmp_path)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def _perturbed_lorakit(make, config):
    model = make().eval()
    lk.apply(model, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "pissa"])
def test_lorakit_folder_loads_in_peft_without_warnings(arch, init, tmp_path, peft_logits) -> None:
    make, targets = MODELS[arch]
    model = _perturbed_lorakit(
        make, lk.LoRAConfig(rank=4, alpha=6, target_modules=targets, init=init, use_rslora=init == "gaussian")
    )
    ids = _ids(model)
    expected = model(ids).logits
    lk.save_adapter(model, tmp_path)
    torch.testing.assert_close(peft_logits(make, tmp_path, ids), expected, atol=1e-5, rtol=0)


def test_saved_config_is_peft_shaped(tmp_path) -> None:
    model = _perturbed_lorakit(
        lambda: tiny_llama(), lk.LoRAConfig(rank=4, alpha=8, target_modules="all-linear")
    )
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    keys = set(peft.utils.load_peft_weights(str(tmp_path)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any("lm_head" in k or "default" in k for k in keys)


def test_pissa_saved_as_plain_rank_2r_lora(tmp_path) -> None:
    model = _perturbed_lorakit(
        lambda: tiny_llama(), lk.LoRAConfig(rank=4, alpha=8, init="pissa", target_modules=["q_proj"])
    )
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)


def test_peft_multi_adapter_folder_layout(tmp_path) -> None:
    model = _perturbed_lorakit(lambda: tiny_llama(), lk.LoRAConfig(rank=2, target_modules=["q_proj"]))
    lk.apply(model, lk.LoRAConfig(rank=3, target_modules=["v_proj"]), adapter_name="second")
    lk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    peft_model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert set(peft_model.peft_config) == {"default", "second"}
