"""The llama.cpp adapter GGUF: metadata, tensor names and shapes, and the served change equal to
s * B @ A (rsLoRA and per-module alpha folded into B, Llama's q/k row permutation), read back with
the gguf package's reader; refusals with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_deltas
from lorakit.export_gguf import export_gguf_adapter
from lorakit.models import tiny_llama

gguf = pytest.importorskip("gguf")


def _with_lora(model: torch.nn.Module, std: float, **config: object) -> torch.nn.Module:
    """LoRA (gaussian init) with every trainable tensor drawn again from N(0, std): a trained-looking
    change, seeded."""
    torch.manual_seed(0)
    lk.apply(model, lk.LoRAConfig(**{"rank": 4, "init": "gaussian", **config}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return model


def _adapter(tmp: Path, **config: object) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    _with_lora(model, 0.2, **{"alpha": 8, **config})
    return lk.save_adapter(model, tmp / "adapter")[0], model


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        value = field.contents() if hasattr(field, "contents") else None
        fields[name] = value
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


def _unpermute_reference(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's GGUF q/k row order written out: new row h*d + 2i + c is old row h*d + c*(d/2) + i."""
    out = weight.shape[0]
    d = out // heads
    new = torch.empty_like(weight)
    for h in range(heads):
        for i in range(d // 2):
            for c in range(2):
                new[h * d + 2 * i + c] = weight[h * d + c * (d // 2) + i]
    return new


@pytest.mark.parametrize(
    "config",
    [{}, {"use_rslora": True}, {"alpha_pattern": {"v_proj": 3.0}, "rank_pattern": {"down_proj": 2}}],
    ids=["lora", "rslora", "patterns"],
)
def test_the_served_change_is_s_b_a(tmp_path: Path, config: dict) -> None:
    folder, model = _adapter(tmp_path, **config)
    out = export_gguf_adapter(folder, tmp_path / "a.gguf", model.config)
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = float(fields["adapter.lora.alpha"])
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    seen = 0
    for path, _, delta in adapter_deltas(model, "default"):
        block, kind = path.split(".")[2], path.rsplit(".", 1)[1]
        name = {
            "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
        }[kind]  # fmt: skip
        a = torch.from_numpy(tensors[f"blk.{block}.{name}.weight.lora_a"]).double()
        b = torch.from_numpy(tensors[f"blk.{block}.{name}.weight.lora_b"]).double()
        served = alpha / a.shape[0] * b @ a  # what llama.cpp adds
        expected = delta.delta_weight().double()
        if kind in ("q_proj", "k_proj"):
            expected = _unpermute_reference(expected, heads if kind == "q_proj" else kv)
        torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == len(tensors) // 2 == 14


def test_alora_invocation_tokens_and_the_outtypes(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    lk.apply(model, lk.ALoRAConfig(rank=4, alpha=8, invocation_tokens=[5, 7, 9]))
    folder = lk.save_adapter(model, tmp_path / "al")[0]
    fields, _ = _read(export_gguf_adapter(folder, tmp_path / "al.gguf", model.config))
    assert list(fields["adapter.alora.invocation_tokens"]) == [5, 7, 9]
    folder, model = _adapter(tmp_path / "q")
    sizes = {}
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        sizes[outtype] = (
            export_gguf_adapter(folder, tmp_path / f"{outtype}.gguf", model.config, outtype).stat().st_size
        )
    assert sizes["f16"] < sizes["f32"] and sizes["bf16"] < sizes["f32"]


def test_refusals_say_why(tmp_path: Path) -> None:
    folder, model = _adapter(tmp_path)
    gpt = type("C", (), {"architectures": ["GPT2LMHeadModel"]})()
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*merged folder"):
        export_gguf_adapter(folder, tmp_path / "x.gguf", gpt)
    dora = tiny_llama()
    lk.apply(dora, lk.DoRAConfig(rank=2, alpha=2))
    dora_folder = lk.save_adapter(dora, tmp_path / "dora")[0]
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf_adapter(dora_folder, tmp_path / "d.gguf", model.config)
    with pytest.raises(ValueError, match="outtype"):
        export_gguf_adapter(folder, tmp_path / "x.gguf", model.config, "q4_0")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "d.gguf").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_the_command_writes_lora_and_quantum_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorakit.cli import main
    from lorakit.models import tiny_tokenizer

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    folder, _ = _adapter(tmp_path)
    main(
        [
            "export",
            "--adapter",
            str(folder),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "l.gguf"),
            "--model",
            str(base),
        ]
    )
    assert "llama.cpp adapter GGUF" in capsys.readouterr().out
    quantum = tiny_llama()
    lk.apply(quantum, lk.QuantumPEFTConfig(rank=2, layers=1))
    with torch.no_grad():
        for p in quantum.parameters():
            if p.requires_grad:
                p.uniform_(-1, 1)
    qfolder = lk.save_adapter(quantum, tmp_path / "quantum")[0]
    main(
        [
            "export",
            "--adapter",
            str(qfolder),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "q.gguf"),
            "--model",
            str(base),
        ]
    )
    _, tensors = _read(tmp_path / "q.gguf")
    a, b = tensors["blk.0.attn_v.weight.lora_a"], tensors["blk.0.attn_v.weight.lora_b"]
    delta = quantum.model.layers[0].self_attn.v_proj.adapters["default"].delta_weight()
    torch.testing.assert_close(torch.from_numpy(b @ a).double(), delta, rtol=1e-4, atol=1e-6)  # alpha / r = 1


def _tiny_base_gguf(path: Path, model: torch.nn.Module) -> Path:
    """A llama base GGUF for `model` as llama.cpp's converter writes one: q/k rows in rotary order
    (by the index-by-index reference), hyperparameters and a chat template to be copied."""
    from lorakit.export_gguf import gguf_tensor_names

    config = model.config
    names = gguf_tensor_names("llama", config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_file_type(3)
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        name = names.get_name(module)
        if name is None or (name == "output" and config.tie_word_embeddings):
            continue
        kind = module.rsplit(".", 1)[-1]
        if kind in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads
            value = _unpermute_reference(value, heads)
        writer.add_tensor(f"{name}.{leaf}", value.float().numpy())
    writer.add_tensor("rope_freqs.weight", np.arange(4, dtype=np.float32))  # no counterpart: copied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _merged_tiny(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    base = _tiny_base_gguf(tmp_path / "base.gguf", model)
    _with_lora(model, 0.3, alpha=8, use_rslora=True)
    return lk.merge_and_unload(model), base


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_gguf_holds_the_merged_weights(tmp_path: Path, outtype: str) -> None:
    from lorakit.export_gguf import export_merged_gguf

    merged, base = _merged_tiny(tmp_path)
    out = export_merged_gguf(merged, base, tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert reader.fields["general.file_type"].contents() == {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    assert reader.fields["llama.block_count"].contents() == merged.config.num_hidden_layers
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {t.name for t in gguf.GGUFReader(str(base)).tensors}
    np.testing.assert_array_equal(np.array(tensors["rope_freqs.weight"].data), np.arange(4))
    layer = merged.model.layers[1]
    expected = {
        "blk.1.attn_q.weight": _unpermute_reference(layer.self_attn.q_proj.weight, 4),
        "blk.1.attn_k.weight": _unpermute_reference(layer.self_attn.k_proj.weight, 2),
        "blk.1.ffn_down.weight": layer.mlp.down_proj.weight,
        "blk.1.attn_norm.weight": layer.input_layernorm.weight,
    }
    for name, weight in expected.items():
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        tolerance = {"f32": 0, "f16": 2e-3, "q8_0": 2e-2}[outtype] if weight.dim() == 2 else 0
        if weight.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
        scale = float(weight.abs().max())
        np.testing.assert_allclose(data, weight.detach().numpy(), atol=tolerance * scale, rtol=0)


def test_merged_gguf_refusals(tmp_path: Path) -> None:
    from lorakit.export_gguf import export_merged_gguf

    merged, base = _merged_tiny(tmp_path)
    wrapped = tiny_llama()
    wrapped.config.architectures = ["LlamaForCausalLM"]
    lk.apply(wrapped, lk.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="merge and unload"):
        export_merged_gguf(wrapped, base, tmp_path / "x.gguf")
    merged.config.architectures = ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="llama GGUF"):
        export_merged_gguf(merged, base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_ollama_modelfile() -> None:
    from lorakit.export_gguf import ollama_modelfile
    from lorakit.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # ChatML without a default system prompt
    text = ollama_modelfile(tokenizer, "/models/base.gguf", "./adapter.gguf")
    lines = text.splitlines()
    assert lines[1:3] == ["FROM /models/base.gguf", "ADAPTER ./adapter.gguf"]
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    text = ollama_modelfile(tokenizer, "./merged.gguf")
    assert "TEMPLATE" not in text and "not ChatML" in text and "ADAPTER" not in text


@pytest.mark.slow
def test_merged_export_of_the_default_model_loads_back_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole command on the real model: the f32 merged GGUF, read by transformers' own GGUF
    loader, is lorakit's merged model tensor for tensor; the Modelfile carries SmolLM2's default
    system prompt."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.models import default_model_available, load_model

    if not default_model_available():
        pytest.skip("the default model is not installed")
    model, _ = load_model()
    _with_lora(model, 0.05, target_modules=["q_proj", "k_proj", "down_proj"])
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    expected = lk.merge_and_unload(model).state_dict()
    out = tmp_path / "merged.gguf"
    main(
        [
            "export",
            "--adapter",
            str(folder),
            "--format",
            "gguf",
            "--merged",
            "--outtype",
            "f32",
            "--out",
            str(out),
        ]
    )
    assert f"wrote {tmp_path / 'merged.Modelfile'}" in capsys.readouterr().out
    modelfile = (tmp_path / "merged.Modelfile").read_text()
    assert (
        "FROM ./merged.gguf" in modelfile
        and 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    )
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, dtype=torch.float32
    ).state_dict()
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
        changed += "q_proj" in key or "k_proj" in key or "down_proj" in key
    assert changed == 3 * model.config.num_hidden_layers
