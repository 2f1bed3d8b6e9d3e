"""NF4 + double quantization: against reference math written here, and against bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant import NF4Tensor, dequantize_nf4, quantize_nf4
from lorakit.quant.nf4 import dynamic_code, nf4_code


def _weight(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def test_code_book_is_the_papers_normal_quantiles() -> None:
    """q_i: 8 positive quantiles of N(0,1) at linspace(delta, 1/2, 9), 7 negative at
    linspace(delta, 1/2, 8), and 0, each half normalised by its largest value; delta = 1 - (1/32 + 1/30) / 2."""
    delta = 1 - (1 / 32 + 1 / 30) / 2
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    expected = (values / values.max()).sort().values
    torch.testing.assert_close(nf4_code().double(), expected, atol=2e-7, rtol=0)
    assert nf4_code()[7] == 0 and nf4_code()[0] == -1 and nf4_code()[-1] == 1


def test_quantize_matches_reference_math() -> None:
    """idx = argmin |w / absmax_block - code|; w_hat = code[idx] * absmax_block, no double quant."""
    w = _weight((24, 40))
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    idx = (((blocks / absmax)[..., None] - nf4_code()).abs()).argmin(-1).reshape(-1)
    expected = (nf4_code()[idx].reshape(-1, 64) * absmax).reshape(w.shape)
    torch.testing.assert_close(dequantize_nf4(q), expected, atol=1e-7, rtol=0)
    unpacked = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)
    assert torch.equal(unpacked.long(), idx)


def test_double_quant_reconstructs_block_scales_within_8_bit_error() -> None:
    w = _weight((256, 512))
    q = quantize_nf4(w)
    c1 = w.reshape(-1, 64).abs().amax(dim=1)
    offset = c1.mean()
    centred = (c1 - offset).reshape(-1, 256)
    scale = centred.abs().amax(dim=1, keepdim=True)
    nearest = ((centred / scale)[..., None] - dynamic_code()).abs().argmin(-1)
    assert torch.equal(q.absmax.long(), nearest.reshape(-1))
    torch.testing.assert_close(q.block_scales(), (dynamic_code()[nearest] * scale).reshape(-1) + offset)


@pytest.mark.parametrize(("double_quant", "bound"), [(True, 4.13), (False, 4.5)])
def test_bits_per_parameter(double_quant: bool, bound: float) -> None:
    q = quantize_nf4(_weight((1024, 1024)), double_quant=double_quant)
    theory = 4 + 8 / 64 + 32 / (64 * 256) if double_quant else 4.5
    assert q.bits_per_parameter <= bound
    assert q.bits_per_parameter == pytest.approx(theory, abs=1e-4)


def test_odd_sizes_partial_blocks_and_dtypes_round_trip() -> None:
    for shape, dtype in [((37, 91), torch.float32), ((5,), torch.bfloat16), ((3, 7, 11), torch.float16)]:
        w = _weight(shape, dtype)
        back = dequantize_nf4(quantize_nf4(w))
        assert back.shape == w.shape and back.dtype == dtype
        rel = (back.float() - w.float()).norm() / w.float().norm()
        assert rel < 0.12, (shape, rel)


@pytest.mark.parametrize("chunk", [64, 192, 1 << 18])  # chunk boundaries inside and past the weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_code_times_block_scale_rounded_once(monkeypatch, chunk, dtype) -> None:
    monkeypatch.setattr("lorakit.quant.nf4.CPU_CHUNK", chunk)
    q = quantize_nf4(_weight((37, 91)), blocksize=32)  # 105 full blocks and a 7-value tail
    idx = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)[: q.numel()].long()
    c1 = q.block_scales().repeat_interleave(32)[: q.numel()]
    expected = (nf4_code()[idx] * c1).to(dtype).reshape(37, 91)  # fp32 product, one rounding
    assert torch.equal(dequantize_nf4(q, dtype), expected)


def test_bad_input_is_refused() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(_weight((64,)), blocksize=48)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))


def test_zero_block_dequantizes_to_zero() -> None:
    w = _weight((4, 64))
    w[1] = 0
    back = dequantize_nf4(quantize_nf4(w))
    assert torch.equal(back[1], torch.zeros(64)) and torch.isfinite(back).all()


# --- bitsandbytes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


# Rows a multiple of 64, or an odd row length (bitsandbytes then falls back to its generic code).
# bitsandbytes 0.50.2's CPU dequantize_4bit scales per row when a row is not a multiple of the
# block (e.g. (40, 96)) although quantize_4bit blocks the flat tensor: its own round trip is then
# several times worse than ours, so those shapes are not compared.
SHAPES = [(128, 256), (37, 91), (1000, 333), (64, 4096)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_bitsandbytes_without_double_quant(bnb_functional, shape, dtype) -> None:
    w = _weight(shape, dtype, seed=3)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_quant_against_bitsandbytes(bnb_functional, shape, dtype) -> None:
    """The 4-bit codes, the mean and the second-level scales are bit-identical, and dequantizing
    bitsandbytes' own state with our code gives bit-identical weights. The 8-bit codes of the
    block scales may differ: bitsandbytes' CPU kernel finds them with an approximate range search
    (`BinAlgo<Direct2>`) that sometimes returns the neighbour of the nearest code; ours is always
    the nearest (the reference test above), so ours differ from it in a few codes, by one step."""
    F = bnb_functional
    w = _weight(shape, dtype, seed=4)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    theirs = NF4Tensor(packed.view(-1), state.absmax, w.shape, dtype, 64, state.state2.absmax, state.offset)
    assert torch.equal(dequantize_nf4(theirs), F.dequantize_4bit(packed, state))
    differ = ours.absmax.long() - state.absmax.long()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.01


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_op_is_a_well_formed_custom_op_with_the_reference_math(double_quant: bool) -> None:
    """`lorakit::nf4_linear`, the NF4 matmul compiled layers see: x W^T forward, its input
    gradient g W, and torch.library.opcheck's schema, fake-tensor and autograd checks."""
    from lorakit.quant.linear import _nf4_linear

    gen = torch.Generator().manual_seed(7)
    q = quantize_nf4(torch.randn(12, 128, generator=gen), double_quant=double_quant)
    weight = dequantize_nf4(q, torch.float32)  # (out, in)
    args = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset, list(q.shape), q.blocksize, torch.float32)
    x = torch.randn(2, 3, 128, generator=gen, requires_grad=True)
    y = torch.ops.lorakit.nf4_linear(x, *args)
    torch.testing.assert_close(y, x @ weight.T)
    g = torch.randn(2, 3, 12, generator=gen)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, g @ weight)
    torch.library.opcheck(_nf4_linear, (x.detach().requires_grad_(), *args))
    torch.library.opcheck(_nf4_linear, (g.clone().requires_grad_(), *args, True))
