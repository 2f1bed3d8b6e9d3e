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


def run_quant(
    case: Case,
    warmup: int,
    steps: int,
    shape: tuple[int, int],
    device: torch.device | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Quantize and dequantize one seeded matrix on `device`; the `matmul` cases also time QLoRA's
    frozen 4-bit matmul, forward and input gradient (x of MATMUL_ROWS rows, bf16)."""
    device = device or torch.device("cpu")
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * W_STD).to(device)
    quantize, dequantize, stored_bytes, matmul = (
        _bitsandbytes() if case.library == "bitsandbytes" else _lorakit()
    )
    state = quantize(weight)
    result = {
        "quantize": measure(lambda: quantize(weight), warmup, steps, sync),
        "dequantize": measure(lambda: dequantize(state), warmup, steps, sync),
        "shape": list(shape),
        "stored_bytes": stored_bytes(state),
    }
    back = dequantize(state).float()
    result["relative_error"] = float((back - weight).norm() / weight.norm())
    result["fingerprint"] = {"head": back.view(-1)[:HEAD].tolist(), "sum": float(back.double().sum())}
    if case.method == "matmul":
        result.update(_matmul(matmul, state, shape, device, warmup, steps, sync))
    return result


MATMUL_ROWS = 1024  # TRAIN_BATCH x TRAIN_SEQ tokens


def _matmul(matmul, state, shape, device, warmup, steps, sync) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """y = x W^T and dL/dx = g W through the library's 4-bit matmul; the output's fingerprint."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(MATMUL_ROWS, shape[1], generator=generator).to(device, torch.bfloat16)
    grad = torch.randn(MATMUL_ROWS, shape[0], generator=generator).to(device, torch.bfloat16)
    x.requires_grad_(True)

    def step() -> None:
        x.grad = None
        matmul(x, state).backward(grad)

    timing = measure(step, warmup, steps, sync)
    timing["tokens_per_s"] = MATMUL_ROWS / timing["median_s"]
    out = matmul(x, state).float()
    return {
        "matmul": timing,
        "matmul_fingerprint": {"head": out.view(-1)[:HEAD].tolist(), "sum": float(out.double().sum())},
    }


Codec = tuple[
    Callable[[Tensor], Any], Callable[[Any], Tensor], Callable[[Any], int], Callable[[Tensor, Any], Tensor]
]


def _lorakit() -> Codec:
    from lorakit.quant import dequantize_nf4, quantize_nf4
    from lorakit.quant.linear import NF4Matmul

    def quantize(w: Tensor) -> Any:
        return quantize_nf4(w, blocksize=64, double_quant=True)

    def matmul(x: Tensor, q: Any) -> Tensor:  # what a QLoRA layer's forward calls
        return NF4Matmul.apply(x, q, torch.bfloat16)

    return quantize, lambda q: dequantize_nf4(q, torch.bfloat16), lambda q: q.nbytes, matmul


def _bitsandbytes() -> Codec:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    def quantize(w: Tensor) -> Any:
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        state.dtype = torch.bfloat16  # dequantize_4bit writes the state's dtype
        return packed, state

    def stored_bytes(q: Any) -> int:
        packed, state = q
        parts = [packed, state.absmax, state.state2.absmax, state.offset]
        return sum(t.numel() * t.element_size() for t in parts)

    def matmul(x: Tensor, q: Any) -> Tensor:  # what bitsandbytes' Linear4bit calls in training
        return bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])

    return quantize, lambda q: F.dequantize_4bit(q[0], q[1]), stored_bytes, matmul
