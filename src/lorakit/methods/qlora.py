"""QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, NeurIPS 2023, arXiv 2305.14314): LoRA on a
frozen base stored in NF4 with double quantization, computing in bf16.

    y = x dequant(W_nf4)^T + s (x A^T) B^T        A: (r, in), B: (out, r), s = alpha / r

Only the frozen base is 4-bit; the matmuls run in the compute dtype (bf16) and A, B are ordinary
LoRA factors (fp32 master weights, bf16 under autocast). `apply` quantizes every linear layer
except the output head (embeddings and norms are not linear) and puts LoRA on the targets.

The saved adapter is an ordinary LoRA folder (PEFT reads it; it loads on the full-precision base)
plus `quantization.json`, a record of the 4-bit base it was trained on, which `lorakit merge` uses
to merge onto that same base. Merging writes full precision: `lorakit.merge` swaps the layer for
its dequantized weight plus the delta (unmerge restores the 4-bit original exactly); putting the
merged weight back into NF4 costs accuracy (measured in docs/methods/qlora.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import check_new_name, inject
from ..core.target import find_targets
from ..quant.linear import KERNELS, quantize_model
from ..quant.nf4 import BLOCKSIZES
from .lora import LoRAConfig

QUANT_FILE = "quantization.json"
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA's options plus the 4-bit storage of the base (NF4, `blocksize` values per scale)."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    kernel: str = "torch"  # "bitsandbytes": bitsandbytes' matmul_4bit on the same packed bytes
    skip_modules: list[str] = field(default_factory=list)  # linear layers to keep in full precision
    # opt-in: the embedding table (and the output head, tied or not) in NF4 too; see quant/embedding.py
    quantize_embeddings: bool = False

    fsdp_problem: ClassVar[str | None] = (
        "its 4-bit weights are buffers, which FSDP2 does not shard: every rank would keep the whole base "
        "and gain nothing over DDP; QLoRA trains with DDP (leave out --fsdp)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "pissa":
            raise ValueError(
                "init='pissa' rewrites the base weight, which QLoRA stores in 4 bits; QPiSSA (quantize "
                "the PiSSA residual) is a different recipe. Use init='kaiming' or 'gaussian'"
            )
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    def quantize(self, model: nn.Module) -> list[str]:
        """Put the model's linear layers in NF4 (layers already in 4 bits are kept as they are)."""
        names = quantize_model(
            model,
            self.skip_modules,
            self.blocksize,
            self.double_quant,
            COMPUTE_DTYPES[self.compute_dtype],
            self.kernel,
        )
        if self.quantize_embeddings:
            from lorakit.quant.embedding import quantize_embeddings

            names += quantize_embeddings(
                model, self.blocksize, self.double_quant, COMPUTE_DTYPES[self.compute_dtype]
            )
        return names

    def apply_to(self, model: nn.Module, adapter_name: str) -> None:
        """Quantize, then inject; all or nothing: a bad name or target fails before any layer is
        quantized, and a failure after puts the original full-precision layers back."""
        check_new_name(model, adapter_name)
        find_targets(model, self.target_modules, self.exclude_modules)
        originals = dict(model.named_modules())
        replaced = self.quantize(model)
        try:
            inject(model, self, adapter_name)
        except BaseException:
            for name in replaced:
                model.set_submodule(name, originals[name])
            raise

    def quantization_record(self) -> dict[str, Any]:
        return {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "skip_modules": list(self.skip_modules),
            "quantize_embeddings": self.quantize_embeddings,
        }

    def extra_files(self) -> dict[str, str]:
        return {QUANT_FILE: json.dumps(self.quantization_record(), indent=2, sort_keys=True) + "\n"}


def quantize_as_trained(model: nn.Module, adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """If the adapter folder was trained on a 4-bit base, quantize `model` the same way (NF4 is
    deterministic, so this rebuilds that very base) and return the record; else None."""
    path = Path(adapter_dir) / QUANT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("quant_type") != "nf4":
        raise ValueError(f"{path}: quant_type={record.get('quant_type')!r}; this lorakit reads nf4")
    QLoRAConfig(
        blocksize=int(record["blocksize"]),
        double_quant=bool(record["double_quant"]),
        compute_dtype=str(record.get("compute_dtype", "bfloat16")),
        skip_modules=list(record.get("skip_modules", [])),
        quantize_embeddings=bool(record.get("quantize_embeddings", False)),
    ).quantize(model)
    return record
