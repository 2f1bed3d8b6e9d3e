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

import contextlib
import logging
import os
from collections.abc import Iterator
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

    arch, permuted = _checked_arch(base_config, outtype, "GGUF adapters")
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
        _finish(writer)

    return _write_quietly(Path(out), write)


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


FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType (general.file_type)


def export_merged_gguf(
    model: Any, base_gguf: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16"
) -> Path:
    """Write the merged (plain, adapter-free) transformers `model` as one llama.cpp model GGUF at
    `out`: the metadata of `base_gguf` (the GGUF the base was converted from: hyperparameters,
    tokenizer, chat template) with every weight taken from `model` in `outtype` (norms and other
    1-D tensors stay f32, as llama.cpp's converter writes them; q8_0 where rows split into blocks
    of 32). Tensors of the base file with no counterpart in the model (rope_freqs, say) are copied
    as they are."""
    import gguf

    leftover = [n for n, _ in model.named_modules() if n.endswith(".base_layer")]
    if leftover:
        raise ValueError(
            f"the model still holds adapter wrappers (e.g. {leftover[0]}); merge and unload first"
        )
    config = model.config
    arch, permuted = _checked_arch(config, outtype, "merged GGUF files")
    reader = gguf.GGUFReader(str(base_gguf))
    base_arch = reader.fields["general.architecture"].contents()
    if base_arch != arch:
        raise ValueError(
            f"{base_gguf} is a {base_arch} GGUF but the model is {config.architectures[0]} ({arch})"
        )
    names = gguf_tensor_names(arch, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    weights: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        name = names.get_name(module)
        if name is not None:
            weights[f"{name}.{leaf}"] = (module, value)
    base_names = {t.name for t in reader.tensors}
    changed = [k for k in weights if k not in base_names and k != "output.weight"]
    if changed:
        raise ValueError(
            f"the model has tensors the base GGUF lacks (e.g. {changed[0]}); is it the right base?"
        )
    if "output.weight" in weights and "output.weight" not in base_names:
        head, embed = weights["output.weight"][1], weights["token_embd.weight"][1]
        if not torch.equal(head, embed):
            raise ValueError(
                "the merged lm_head differs from the embeddings it is tied to in the base GGUF; "
                "llama.cpp would use the embeddings for both"
            )

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(FILE_TYPES[outtype])
        for tensor in reader.tensors:
            if tensor.name not in weights:  # no counterpart in the model: the base's bytes as they are
                writer.add_tensor(
                    tensor.name, np.array(tensor.data), raw_shape=list(reversed([int(d) for d in tensor.shape])),
                    raw_dtype=tensor.tensor_type,
                )  # fmt: skip
                continue
            module, value = weights[tensor.name]
            value = value.detach().float()
            leaf = module.rsplit(".", 1)[-1]
            if permuted and leaf in ("q_proj", "k_proj") and value.dim() == 2:
                value = permute_rows(value, heads if leaf == "q_proj" else kv_heads)
            data = value.numpy()
            if data.ndim < 2:
                writer.add_tensor(tensor.name, data.astype(np.float32))
                continue
            stored, qtype = _encode(data, outtype)
            writer.add_tensor(tensor.name, stored, raw_dtype=qtype)
        _finish(writer)

    return _write_quietly(Path(out), write)


def ollama_modelfile(tokenizer: Any, model_file: str, adapter_file: str | None = None) -> str:
    """An Ollama Modelfile for `model_file` (+ `adapter_file`): FROM, ADAPTER, the chat template as
    a Go template with the default system prompt as SYSTEM, and the turn-end stop token. The Go
    template is written only where the tokenizer's own chat template is ChatML, checked by
    rendering both on three conversations (`_chatml_system`); otherwise Ollama's own detection
    from the GGUF's tokenizer.chat_template applies, and the file says so."""
    lines = ["# lorakit export: ollama create NAME -f THIS_FILE", f"FROM {model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    system = _chatml_system(tokenizer)
    if system is None:
        lines.append(
            "# the chat template is not ChatML: Ollama takes it from the GGUF (check `ollama show --template`)"
        )
    else:
        lines.append(f'TEMPLATE """{GO_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    if tokenizer.eos_token and tokenizer.eos_token != "<|im_end|>":
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


# Ollama's Go template for ChatML; with SYSTEM set, Ollama puts the system message first when the
# conversation has none, which is what SmolLM2's and Qwen2's Jinja templates do with their default.
GO_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def _render_go_chatml(messages: list[dict[str, str]], system: str) -> str:
    """What Ollama renders from GO_CHATML and SYSTEM for `messages` (with the generation prompt)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _chatml_system(tokenizer: Any) -> str | None:
    """The default system prompt ("" for none) if the tokenizer's template is ChatML, else None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "Q1"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs more than plain messages
        return None
    system = ""
    head = "<|im_start|>system\n"
    if rendered.startswith(head):
        system = rendered[len(head) : rendered.find("<|im_end|>")]
    conversations = [
        probe,
        [{"role": "system", "content": "S"}, *probe],
        [*probe, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    ]
    for messages in conversations:
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if theirs != _render_go_chatml(messages, system):
            return None
    return system


def _checked_arch(config: Any, outtype: str, what: str) -> tuple[str, bool]:
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{what} are written for {', '.join(ARCHITECTURES)}; this base is {architecture}. Write the "
            "merged folder (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[architecture]


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_quietly(out: Path, write: Any) -> Path:
    with _quiet_gguf():
        atomic_write(out, write)
    return out


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """gguf's writer logs the temporary file's name and size at INFO; lorakit says what it wrote."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
