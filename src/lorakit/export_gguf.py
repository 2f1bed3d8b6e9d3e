"""A LoRA adapter as a llama.cpp adapter GGUF (`lorakit export --format gguf`), served unchanged by
llama.cpp (`--lora FILE`) and Ollama (`ADAPTER FILE`).

What llama.cpp reads (its own converter, convert_lora_to_gguf.py, writes the same): `general.type`
= adapter, `adapter.type` = lora, `adapter.lora.alpha`, the base model's `general.architecture`, and
per adapted weight two tensors named after the base tensor in GGUF's naming
(`blk.{i}.attn_q.weight.lora_a`: A, (r, in); `.lora_b`: B, (out, r)); aLoRA adapters add
`adapter.alora.invocation_tokens`. llama.cpp scales every module by alpha / r, with one alpha for
the whole file, so what it cannot express is folded into B here: rsLoRA's alpha / sqrt(r) and
per-module `alpha_pattern` / `rank_pattern` become B * (s / (alpha / r)), the file's alpha being the
first module's rank. The served change is exactly s * B @ A (tested, reference math in the test).

Llama-family GGUF files store q_proj and k_proj with their rows permuted for llama.cpp's rotary
layout (convert_hf_to_gguf's `LlamaModel.permute`): the same row permutation is applied to the B of
those modules, or the adapter would land on the wrong rows. Qwen2 files are not permuted.

Supported bases: the Llama family (LlamaForCausalLM, MistralForCausalLM; GGUF arch "llama") and
Qwen2. Refused with the reason: DoRA (a magnitude per output row is not a low-rank change; export the
merged model instead), modules_to_save or trainable tokens, a tied `lm_head` target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .combine import read_source
from .core.io import atomic_write

ARCHITECTURES = {  # transformers class -> (GGUF arch, q/k rows permuted)
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's Llama q/k row order: within each head, the two rotary halves interleaved."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_names(arch: str, blocks: int) -> Any:
    """gguf's map from transformers module names to llama.cpp tensor names, for `arch`."""
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_enum, blocks)


def export_gguf_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, base_config: Any, outtype: str = "f32"
) -> Path:
    """Write the LoRA folder `adapter` as a llama.cpp adapter GGUF at `out` for the base model whose
    transformers config is `base_config`."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    architecture = (getattr(base_config, "architectures", None) or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"GGUF adapters are written for {', '.join(ARCHITECTURES)}; this base is {architecture}. "
            "Export the merged model instead (lorakit merge, then llama.cpp's convert_hf_to_gguf.py)"
        )
    arch, permuted = ARCHITECTURES[architecture]
    source = read_source(adapter, allow_alora=True)
    if getattr(base_config, "tie_word_embeddings", False) and "lm_head" in source.factors:
        raise ValueError(
            "the adapter changes lm_head, which this base ties to the embeddings; llama.cpp ignores it"
        )
    heads = int(base_config.num_attention_heads)
    kv_heads = int(getattr(base_config, "num_key_value_heads", None) or heads)
    names = gguf_tensor_names(arch, int(base_config.num_hidden_layers))
    first_rank = next(iter(source.factors.values()))[1].shape[0]
    alpha = float(first_rank)  # with alpha = r, a plain LoRA module's B is written as it is scaled by s
    tensors: list[tuple[str, np.ndarray]] = []
    for module, (b, a, scale) in source.factors.items():
        rank = a.shape[0]
        b = b * (scale / (alpha / rank))  # llama.cpp multiplies by alpha / r
        leaf = module.rsplit(".", 1)[-1]
        if permuted and leaf in ("q_proj", "k_proj"):
            b = permute_rows(b, heads if leaf == "q_proj" else kv_heads)
        name = names.get_name(module)
        if name is None:
            raise ValueError(
                f"{module} has no tensor in llama.cpp's {arch} GGUF layout; it cannot be exported"
            )
        name += ".weight"
        if module in source.embedding:  # llama.cpp reads token_embd's lora_a transposed
            a = a.T
        tensors += [(name + ".lora_a", a.float().numpy()), (name + ".lora_b", b.float().numpy())]
    invocation = source.config.get("alora_invocation_tokens")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if invocation:
            writer.add_key_value(
                gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
                [int(t) for t in invocation],
                gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.UINT32,
            )
        for name, data in tensors:
            stored, qtype = _encode(data, outtype)
            writer.add_tensor(name, stored, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(out)
    atomic_write(out, write)
    return out


def _encode(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """The tensor in `outtype`; q8_0 only where rows split into its blocks of 32 (else f16: B's rows
    are r long)."""
    import gguf

    kind = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]  # fmt: skip
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), None
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), kind), kind
