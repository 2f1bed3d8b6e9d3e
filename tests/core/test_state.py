"""Bad adapter folders are refused with a clear error and leave the model exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.core.contract import AdaptedLayer
from lorakit.models import tiny_llama


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, tmp_path)
    return tmp_path


def _assert_untouched(model, before) -> None:
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert lk.adapter_names(model) == []
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _load_fails(folder, match: str) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.AdapterLoadError, match=match):
        lk.load_adapter(model, folder)
    _assert_untouched(model, before)


def test_pickle_files_are_refused(saved) -> None:
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    _load_fails(saved, "pickle.*safetensors only")
    with pytest.raises(lk.AdapterLoadError, match="pickle"):
        lk.load_adapter(tiny_llama(), saved / "adapter_model.bin")


def test_shape_mismatch_names_module_and_shapes(saved) -> None:
    tensors = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 7)
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(saved, r"model\.layers\.1\.self_attn\.v_proj.*\(4, 7\).*\(4, 32\)")


def test_missing_and_unexpected_keys_are_named(saved) -> None:
    tensors = load_file(saved / "adapter_model.safetensors")
    missing = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[missing]
    tensors["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(1)
    save_file(tensors, saved / "adapter_model.safetensors")
    _load_fails(saved, "1 missing key.*q_proj.lora_B.*1 unexpected key.*nope")


def test_corrupt_safetensors_gives_a_clear_error(saved) -> None:
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _load_fails(saved, "not a readable safetensors file")


def test_bad_config_json_and_missing_files(saved, tmp_path) -> None:
    (saved / "adapter_config.json").write_text("{not json")
    _load_fails(saved, "not valid JSON")
    _load_fails(tmp_path / "nowhere", "does not exist")


def test_wrong_targets_for_this_model_leave_it_untouched(saved) -> None:
    config = json.loads((saved / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "c_attn"]
    (saved / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'c_attn' matched no module"):
        lk.load_adapter(model, saved)
    _assert_untouched(model, before)


def test_failed_load_keeps_existing_adapters(saved) -> None:
    model = tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=2, target_modules=["q_proj"]), "mine")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors.popitem()
    save_file(tensors, saved / "adapter_model.safetensors")
    with pytest.raises(lk.AdapterLoadError):
        lk.load_adapter(model, saved, adapter_name="other")
    assert lk.adapter_names(model) == ["mine"] and lk.active_adapters(model) == ["mine"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_loaded_adapter_is_trainable_unless_asked(saved) -> None:
    model = tiny_llama()
    lk.load_adapter(model, saved)
    assert lk.trainable_parameters(model)[0] > 0
    frozen = tiny_llama()
    lk.load_adapter(frozen, saved, trainable=False)
    assert lk.trainable_parameters(frozen)[0] == 0
