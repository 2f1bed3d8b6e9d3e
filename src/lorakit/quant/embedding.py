"""An embedding table in NF4, for the opt-in `QLoRAConfig(quantize_embeddings=True)`.

QLoRA leaves the embeddings in full precision, and so does lorakit by default. On a small model
with tied embeddings that is most of what is left: SmolLM2-135M's 49,152 x 576 table is 28.3M of
its 134.5M parameters, so with every linear layer in NF4 the model still weighs 0.41 of its bf16
size. Quantizing the table too brings it to about 0.27, at a cost in quality that
docs/methods/qlora.md measures.

A lookup dequantizes only the rows it reads: with `embedding_dim` a multiple of the block size,
row r is bytes [r * dim / 2, (r + 1) * dim / 2) of the packed codes and blocks
[r * dim / bs, (r + 1) * dim / bs) of the scales, so a batch of ids costs a gather of its rows,
never the whole table. A tied output head becomes a `Linear4bit` over the very same buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear4bit, stored_nf4
from .nf4 import NF4Tensor, _unpack, dequantize_nf4, quantize_nf4


class Embedding4bit(nn.Module):
    """nn.Embedding with its table in NF4 (frozen); lookups return the table's original dtype."""

    is_quantized_embedding = True
    weight_layout = "in_out"  # (num_embeddings, dim), as nn.Embedding

    def __init__(self, q: NF4Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"Embedding4bit needs a 2-D (num, dim) table, got shape {tuple(q.shape)}")
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx, self.blocksize, self.weight_dtype = padding_idx, q.blocksize, q.dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)

    @classmethod
    def from_embedding(
        cls, module: nn.Embedding, blocksize: int = 64, double_quant: bool = True
    ) -> Embedding4bit:
        return cls(quantize_nf4(module.weight.detach(), blocksize, double_quant), module.padding_idx)

    @property
    def weight(self) -> NF4Tensor:
        return stored_nf4(self, (self.num_embeddings, self.embedding_dim))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.weight, dtype)

    def forward(self, ids: Tensor) -> Tensor:
        dim, bs = self.embedding_dim, self.blocksize
        if dim % bs:  # rows do not start on block boundaries: look up in the whole table
            return F.embedding(ids, self.dequantize())
        flat = ids.reshape(-1)
        codes = _unpack(self.packed.view(self.num_embeddings, dim // 2).index_select(0, flat).reshape(-1))
        scales = self.weight.block_scales().view(self.num_embeddings, dim // bs).index_select(0, flat)
        rows = codes.view(-1, dim // bs, bs) * scales.unsqueeze(-1)  # fp32, as dequantize_nf4
        return rows.to(self.weight_dtype).view(*ids.shape, dim)

    def tied_head(self, compute_dtype: torch.dtype | None = torch.bfloat16) -> Linear4bit:
        """A `Linear4bit` (num, dim) over this table's buffers: the tied output head, no second copy."""
        return Linear4bit(self.weight, None, compute_dtype)

    def dequantized_module(self, dtype: torch.dtype = torch.float32) -> nn.Embedding:
        module = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        module.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        return module

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nf4 blocksize={self.blocksize}"


def quantize_embeddings(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
) -> list[str]:
    """Put the input embedding in NF4 and, if the output head is tied to it, make the head a
    Linear4bit over the same buffers; returns the names replaced."""
    embed = model.get_input_embeddings()
    if isinstance(embed, Embedding4bit):
        return []
    if type(embed) is not nn.Embedding:
        raise TypeError(f"quantize_embeddings handles nn.Embedding, got {type(embed).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    names = {m: n for n, m in model.named_modules()}
    quantized = Embedding4bit.from_embedding(embed, blocksize, double_quant)
    model.set_submodule(names[embed], quantized)
    done = [names[embed]]
    if tied:
        model.set_submodule(names[head], quantized.tied_head(compute_dtype))
        done.append(names[head])
    elif type(head) is nn.Linear:  # an untied output head is the other embedding matrix
        model.set_submodule(names[head], Linear4bit.from_linear(head, blocksize, double_quant, compute_dtype))
        done.append(names[head])
    return done
