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


def _adapter(tmp: Path, **config: object) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    lk.apply(model, lk.LoRAConfig(**{"rank": 4, "alpha": 8, "init": "gaussian", **config}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
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
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*merged model"):
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
