"""NF4 storage with double quantization (Dettmers et al., "QLoRA", NeurIPS 2023, arXiv 2305.14314).

A weight is cut into blocks of `blocksize` (64) consecutive values (row-major order of the
(out, in) matrix); each block keeps one scale c1 = max|w| and each value the 4-bit index of the
nearest NF4 code to w / c1, two indices per byte (first value in the high nibble):

    w ~ code[idx] * c1

Double quantization stores c1 itself in 8 bits: subtract their mean (they are all positive, and
the 8-bit "dynamic" code is symmetric), then quantize blockwise with blocks of 256, one fp32 scale
c2 per block:

    c1 ~ dyn[q1] * c2 + mean(c1)

Bits per parameter: 4 + 32/64 = 4.5 without double quantization, 4 + 8/64 + 32/(64*256) = 4.127
with it (plus one fp32 mean per tensor). The rounding follows bitsandbytes exactly (a reciprocal
multiply for full blocks, a division for a trailing partial block, ties to the lower code, fp32
products), so the dequantized values are bit-identical to `bitsandbytes.functional`'s (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import Tensor

# The 16 NF4 values: 7 negative, an exact zero, 8 positive normal quantiles, scaled to [-1, 1]
# (paper section 3; the same float32 values as bitsandbytes' table).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # second-level blocks of the double quantization


@cache
def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@cache
def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """The signed 8-bit dynamic-exponent code (Dettmers, arXiv 1511.04561), 256 sorted values.

    With e leading zero bits (e = 0..6) the remaining bits form a linear fraction: 2^e intervals of
    [0.1, 1], each represented by its midpoint, times 10^(e-6), for both signs; plus 0 and 1.
    The 254 + 2 values are sorted; the one code short of 256 is filled with another 0.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()  # fp32 products
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _midpoints(code: Tensor) -> Tensor:
    return (code[:-1] + code[1:]) / 2  # code is sorted; a value on a midpoint goes to the lower code


def blockwise_quantize(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(indices uint8 of x's numel, absmax fp32 per block): nearest code to x / absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)
    if full < n:  # a trailing partial block
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp_(-1, 1)])
    idx = torch.bucketize(scaled, _midpoints(code.to(x.device)), out_int32=True).to(torch.uint8)
    return idx, absmax


def blockwise_dequantize(idx: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """fp32 values code[idx] * absmax of their block (idx flat, uint8)."""
    return _scale_blocks(code.to(idx.device).index_select(0, idx.int()), absmax, blocksize)


def _scale_blocks(values: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """values (n,) times the absmax of their block; a trailing partial block has its own."""
    n = values.numel()
    full = n - n % blocksize
    if full == n:
        return (values.view(-1, blocksize) * absmax[:, None]).view(-1)
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    out[full:] = values[full:] * absmax[-1]
    return out


@dataclass(frozen=True)
class NF4Tensor:
    """A weight in NF4: packed indices plus its (possibly double-quantized) block scales."""

    packed: Tensor  # uint8 (ceil(numel / 2),): two 4-bit indices per byte, first in the high nibble
    absmax: Tensor  # fp32 (n_blocks,), or uint8 (n_blocks,) codes when double-quantized
    shape: torch.Size
    dtype: torch.dtype  # of the weight before quantization (dequantize's default)
    blocksize: int = 64
    absmax_scale: Tensor | None = None  # fp32 (ceil(n_blocks / 256),), double quantization only
    absmax_offset: Tensor | None = None  # fp32 scalar: the mean subtracted before quantizing c1

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> list[Tensor]:
        extra = [self.absmax_scale, self.absmax_offset] if self.double_quant else []
        return [self.packed, self.absmax, *extra]

    @property
    def nbytes(self) -> int:
        """Bytes stored: the packed indices and every scale."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> NF4Tensor:
        moved = {f: getattr(self, f) for f in ("packed", "absmax", "absmax_scale", "absmax_offset")}
        return replace(self, **{k: None if t is None else t.to(device) for k, t in moved.items()})

    def block_scales(self) -> Tensor:
        """c1, the fp32 scale of every 64-value block (undoing the double quantization)."""
        if not self.double_quant:
            return self.absmax
        c1 = blockwise_dequantize(self.absmax, self.absmax_scale, dynamic_code(self.device), ABSMAX_BLOCKSIZE)
        return c1 + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self, dtype)


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a floating-point tensor of any shape to NF4 (see the module docstring)."""
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    idx, absmax = blockwise_quantize(weight.detach(), nf4_code(weight.device), blocksize)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), NF4_VALUES.index(0.0))])  # pad with the code of 0
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(n / 2),)
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = blockwise_quantize(absmax - offset, dynamic_code(weight.device), ABSMAX_BLOCKSIZE)
    return NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize, scale, offset)


# Values dequantized per chunk on CPU: the fp32 temporary (4 MiB) stays in cache, and no call
# allocates (and page-faults in) a weight-sized fp32 buffer: 4096 x 4096 ran 4x faster than in one
# piece. Every layer of the default model (at most 1536 x 576) is one chunk, so one parallel region
# per op, which matters on a loaded machine where each region waits for its slowest thread.
CPU_CHUNK = 1 << 20


@cache
def _byte_table(device: torch.device) -> Tensor:
    """(256,) float64 whose 8 bytes are the two fp32 NF4 values a packed byte holds (high nibble
    first): unpacking is one 1-D index_select, the fastest gather torch has on CPU."""
    byte = torch.arange(256, device=device)
    pairs = nf4_code(device)[torch.stack([byte >> 4, byte & 15], dim=1)]  # (256, 2) fp32
    return pairs.contiguous().view(torch.float64).view(-1)


def _unpack(packed: Tensor) -> Tensor:
    """fp32 NF4 codes of the packed bytes, 2 per byte."""
    return _byte_table(packed.device).index_select(0, packed.int()).view(torch.float32)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The weight back in `dtype` (default: its original dtype): code[idx] * c1 in fp32, rounded
    once to `dtype`. Vectorized torch: a gather by packed byte and a multiply by the block's scale,
    written straight into the output (in L2-sized chunks on CPU)."""
    n, bs = q.numel(), q.blocksize
    out = torch.empty(n, dtype=dtype or q.dtype, device=q.device)
    c1 = q.block_scales()  # (n_blocks,) fp32
    full = n - n % bs  # blocksize is even: full blocks end on a byte boundary
    step = CPU_CHUNK // bs if q.device.type == "cpu" else max(1, full // bs)  # blocks per chunk
    blocks = out[:full].view(-1, bs)
    for start in range(0, full // bs, step):
        stop = min(start + step, full // bs)
        codes = _unpack(q.packed[start * bs // 2 : stop * bs // 2]).view(-1, bs)
        torch.mul(codes, c1[start:stop, None], out=blocks[start:stop])
    if full < n:  # a trailing partial block with its own scale
        out[full:] = _unpack(q.packed[full // 2 :])[: n - full] * c1[-1]
    return out.view(q.shape)
