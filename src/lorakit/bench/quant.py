"""NF4 micro-benchmark: quantize one fp32 matrix (blocks of 64, double quantization) and dequantize
it to bf16, QLoRA's compute dtype, with lorakit or with bitsandbytes, on the same seeded matrix.

Besides the two timings, a case records what it stored (bytes) and how far the dequantized matrix
is from the original, plus a fingerprint of the dequantized values (a head and a sum), so the
report can show that both libraries decode the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .cases import Case
from .timing import measure

HEAD = 256  # dequantized values kept in the fingerprint
W_STD = 0.02  # a typical weight scale; NF4 is scale-free, so only the rounding of c1 sees it


def run_quant(case: Case, warmup: int, steps: int, shape: tuple[int, int]) -> dict[str, Any]:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * W_STD
    quantize, dequantize, stored_bytes = _bitsandbytes() if case.library == "bitsandbytes" else _lorakit()
    state = quantize(weight)
    result = {
        "quantize": measure(lambda: quantize(weight), warmup, steps),
        "dequantize": measure(lambda: dequantize(state), warmup, steps),
        "shape": list(shape),
        "stored_bytes": stored_bytes(state),
    }
    back = dequantize(state).float()
    result["relative_error"] = float((back - weight).norm() / weight.norm())
    result["fingerprint"] = {"head": back.view(-1)[:HEAD].tolist(), "sum": float(back.double().sum())}
    return result


Codec = tuple[Callable[[Tensor], Any], Callable[[Any], Tensor], Callable[[Any], int]]


def _lorakit() -> Codec:
    from lorakit.quant import dequantize_nf4, quantize_nf4

    def quantize(w: Tensor) -> Any:
        return quantize_nf4(w, blocksize=64, double_quant=True)

    return quantize, lambda q: dequantize_nf4(q, torch.bfloat16), lambda q: q.nbytes


def _bitsandbytes() -> Codec:
    import bitsandbytes.functional as F

    def quantize(w: Tensor) -> Any:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        state.dtype = torch.bfloat16  # dequantize_4bit writes the state's dtype
        return packed, state

    def stored_bytes(q: Any) -> int:
        packed, state = q
        parts = [packed, state.absmax, state.state2.absmax, state.offset]
        return sum(t.numel() * t.element_size() for t in parts)

    return quantize, lambda q: F.dequantize_4bit(q[0], q[1]), stored_bytes
