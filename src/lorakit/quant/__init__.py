"""Quantized storage for frozen base weights (NF4 with double quantization) and the paged optimizer."""

from __future__ import annotations

from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["NF4Tensor", "dequantize_nf4", "quantize_nf4"]
