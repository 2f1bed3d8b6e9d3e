"""Build the model a case measures: the base, lorakit's or PEFT's LoRA or DoRA, unmerged or merged,
or lorakit's QLoRA (the base in NF4).

Both libraries get the *same* adapter values: A and B are drawn from one seeded generator, layer
by layer in module order. B is non-zero (PEFT's and lorakit's default init make B = 0), so the
adapter path really computes something, and the two libraries must produce the same outputs,
which the report checks. DoRA's magnitude is then set to the base weight's row norms in both
(PEFT computes it at creation from its own random B, lorakit from the base weight alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import lorakit as lk

from .cases import ALPHA, RANK, Case

B_STD = 0.01  # small enough to keep the model sensible, large enough to change its outputs
SEED = 0


def load(
    model: str | None, case: Case | None = None, device: torch.device | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) on `device` (default: the CPU): "tiny" is a two-layer random Llama for
    tests, `RANDOM_LLAMAS` random-weight Llamas of other sizes, None the default model. A case with
    `base="bf16"` gets its base loaded in bf16. PEFT's QLoRA case gets the model through
    transformers' bitsandbytes 4-bit loading."""
    device = device or torch.device("cpu")
    dtype = torch.bfloat16 if case is not None and case.base == "bf16" else torch.float32
    if case is not None and case.library == "peft" and case.method == "qlora":
        return _load_bnb_4bit(model, device)
    if model == "tiny":
        from lorakit.models import tiny_llama, tiny_tokenizer

        return tiny_llama().to(device, dtype), tiny_tokenizer()
    if model in RANDOM_LLAMAS:
        return random_llama(model, device, dtype)
    loaded, tokenizer = lk.load_model(model, dtype=dtype)
    return loaded.to(device), tokenizer


# Llamas of other sizes with random weights (speed and memory only: nothing to download), the
# default model's vocabulary and tokenizer: SmolLM2-360M's shape, and TinyLlama-1.1B's layers.
RANDOM_LLAMAS: dict[str, dict[str, int]] = {
    "random-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                        num_attention_heads=15, num_key_value_heads=5),
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
}  # fmt: skip
DEFAULT_VOCAB = 49152  # SmolLM2's tokenizer (tests check it against the installed one)


def random_llama(
    name: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """One of RANDOM_LLAMAS, seeded, built on `device` in `dtype`, with the default model's
    vocabulary; its tokenizer too where the default model is installed (None elsewhere: the
    synthetic training batches need no text)."""
    from transformers import LlamaForCausalLM

    from lorakit.models import default_model_available, load_tokenizer

    tokenizer = load_tokenizer(None) if default_model_available() else None
    vocab = DEFAULT_VOCAB if tokenizer is None else len(tokenizer)
    torch.manual_seed(SEED)
    with torch.device(device or "cpu"):  # drawn where it runs: a 1B model is drawn in a second on a GPU
        model = LlamaForCausalLM(random_llama_config(name, vocab))
    return model.to(dtype).eval(), tokenizer


def random_llama_config(name: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, **RANDOM_LLAMAS[name],
    )  # fmt: skip


def _load_bnb_4bit(model: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """NF4 with double quantization and bf16 compute, as the QLoRA paper and PEFT's docs set it up,
    loaded from a folder as a user would (the tiny and random Llamas are saved to one first)."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if model == "tiny":  # a folder to load from, as with any real model
            from lorakit.models import tiny_llama, tiny_tokenizer

            tiny_llama().save_pretrained(tmp)
            folder, tokenizer = tmp, tiny_tokenizer()
        elif model in RANDOM_LLAMAS:  # the same seeded weights the other cases draw, in bf16
            built, tokenizer = random_llama(model, device, torch.bfloat16)
            built.save_pretrained(tmp)
            del built
            folder = tmp
        else:
            from lorakit.models import load_tokenizer, model_folder

            folder, tokenizer = str(model_folder(model)), load_tokenizer(model)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, device_map={"": str(device)}, dtype=torch.bfloat16
        )
    return loaded, tokenizer


def bnb_weight_memory(model: nn.Module, reference_bytes: int = 2) -> dict[str, float]:
    """`lorakit.quant.linear.weight_memory` for a bitsandbytes 4-bit model: packed codes plus every
    quantization-state tensor (absmax codes, their scales, code books) of each Linear4bit."""
    import bitsandbytes as bnb

    from lorakit.quant.linear import frozen_bytes, weight_report

    linear_actual = linear_reference = linear_params = packed = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight, state = module.weight, module.weight.quant_state
            n = int(torch.Size(state.shape).numel())
            state_bytes = sum(
                t.nbytes for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor)
            )
            bias = module.bias.numel() if module.bias is not None else 0
            packed += weight.nbytes
            linear_actual += weight.nbytes + state_bytes + bias * reference_bytes
            linear_reference += (n + bias) * reference_bytes
            linear_params += n
            counted.update(t.data_ptr() for t in module.parameters())
    other = frozen_bytes(model, counted, reference_bytes)
    return weight_report(linear_actual, linear_reference, linear_params, packed, other, other)


# the other schools at their CLI defaults (lorakit train --method adapter|prompt|prefix), and the
# adapters measured against LoRA r=16 in docs/methods/quantum.md
SCHOOLS = {
    "adapter_houlsby": lambda: lk.AdapterConfig(placement="houlsby"),
    "adapter_pfeiffer": lambda: lk.AdapterConfig(placement="pfeiffer"),
    "prompt": lambda: lk.PromptTuningConfig(),
    "prefix": lambda: lk.PrefixTuningConfig(),
    "norm": lambda: lk.NormTuningConfig(),
    "full": lambda: lk.FullFinetuneConfig(),
    # issue 19: Quantum-PEFT at `lorakit train --method quantum`'s alpha (1) and LoRA's smallest rank
    "quantum_k8_l2": lambda: lk.QuantumPEFTConfig(rank=8, layers=2),
    "quantum_k16_l2": lambda: lk.QuantumPEFTConfig(rank=16, layers=2),
    "quantum_k8_l4": lambda: lk.QuantumPEFTConfig(rank=8, layers=4),
    "lora_r1": lambda: lk.LoRAConfig(rank=1, alpha=2, target_modules="all-linear"),
    # LongLoRA's LoRA (issue 18's cost bench): r=8 on the attention projections
    "lora_qkvo": lambda: lk.LoRAConfig(
        rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    ),
}


def prepare(model: nn.Module, case: Case) -> tuple[nn.Module, int]:
    """Turn the plain model into what `case` measures: (the module to call, layers adapted)."""
    if case.adapter == "none":
        return model, 0
    if case.method in SCHOOLS:
        lk.apply(model, SCHOOLS[case.method]())
        if case.method in ("norm", "full"):  # they train the model's own weights: nothing to fill
            return model, 0
        generator = torch.Generator().manual_seed(SEED)
        with torch.no_grad():  # adapters start at the base function; make their path compute something
            for p in model.parameters():
                if p.requires_grad and not p.any():
                    p.copy_(torch.randn(p.shape, generator=generator) * B_STD)
        return model, sum(1 for m in model.modules() if isinstance(m, (lk.AdaptedLayer, lk.ModelAdapter)))
    if case.library == "peft":
        return _prepare_peft(model, case)
    config_type = {
        "dora": lk.DoRAConfig,
        "qlora": lk.QLoRAConfig,
        "qlora_emb": lambda **kw: lk.QLoRAConfig(quantize_embeddings=True, **kw),
    }.get(case.method, lk.LoRAConfig)
    lk.apply(model, config_type(rank=RANK, alpha=ALPHA, target_modules="all-linear"))
    layers = _fill(_lorakit_pairs(model))
    if case.method == "dora":
        _set_magnitudes(_lorakit_magnitudes(model))
    if case.adapter in ("merged", "merged_unloaded"):
        lk.merge(model)
    if case.adapter == "merged_unloaded":
        lk.unload(model)
    return model, layers


def _prepare_peft(model: nn.Module, case: Case) -> tuple[nn.Module, int]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
        use_dora=case.method == "dora",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    layers = _fill(_peft_pairs(peft_model))
    if case.method == "dora":
        _set_magnitudes(_peft_magnitudes(peft_model))
    if case.adapter == "merged":
        return peft_model.merge_and_unload(), layers
    return peft_model, layers


def _lorakit_pairs(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every adapted layer, in module order, found by declared role."""
    for module in model.modules():
        if isinstance(module, lk.AdaptedLayer):
            for delta in module.adapters.values():
                roles = delta.role_parameters()
                yield roles[lk.Role.A][0], roles[lk.Role.B][0]


def _peft_pairs(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                yield module.lora_A[name].weight, module.lora_B[name].weight


def _lorakit_magnitudes(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(magnitude, base weight) of every DoRA layer."""
    for module in model.modules():
        if isinstance(module, lk.AdaptedLayer):
            for delta in module.adapters.values():
                yield delta.role_parameters()[lk.Role.MAGNITUDE][0], module.base_layer.weight


def _peft_magnitudes(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_magnitude_vector:
                yield module.lora_magnitude_vector[name].weight, module.get_base_layer().weight


def _set_magnitudes(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for magnitude, weight in pairs:
            magnitude.copy_(weight.float().norm(dim=1).to(magnitude.dtype))


def _fill(pairs: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """A ~ N(0, 1/in) and B ~ N(0, B_STD^2): shapes (r, in) and (out, r) in both libraries."""
    generator = torch.Generator().manual_seed(SEED)
    count = 0
    with torch.no_grad():
        for a, b in pairs:
            a.copy_(torch.randn(a.shape, generator=generator) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=generator) * B_STD)
            count += 1
    if count == 0:
        raise RuntimeError("no LoRA layer was found to initialise; the adapter did not attach")
    return count


def adapter_stats(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (shared tensors once), to show both libraries adapt the same."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": sum(p.numel() for p in seen.values())}
