"""A frozen linear layer stored in NF4, and whole-model quantize / dequantize.

Forward dequantizes the weight on the fly in the compute dtype (bf16 for QLoRA) and multiplies:

    y = x W^T + b          W = dequant(NF4)   (out, in), rebuilt per call, never kept

Backward needs only the input gradient (W is frozen): with y = x W^T,

    dL/dx = dL/dy W        (..., out) @ (out, in) -> (..., in)

so `NF4Matmul` saves the packed 4-bit weight (a reference, no copy) and dequantizes it again in
backward; no full-precision copy of W lives between the two passes. With `kernel="bitsandbytes"`
the forward and backward go through `bitsandbytes.matmul_4bit` on the same packed bytes instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nf4 import NF4Tensor, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4

KERNELS = ("torch", "bitsandbytes")


class NF4Matmul(torch.autograd.Function):
    """x (..., in) @ dequant(q)^T (in, out) in `dtype`; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, x: Tensor, q: NF4Tensor, dtype: torch.dtype) -> Tensor:
        ctx.q, ctx.dtype = q, dtype  # the packed weight only
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, dequantize_nf4(q, dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with torch.autocast(grad_out.device.type, enabled=False):
            weight = dequantize_nf4(ctx.q, ctx.dtype)  # (out, in), rebuilt and dropped
            return grad_out.to(ctx.dtype) @ weight, None, None  # (..., in)


def _nf4_matmul(x: Tensor, q: NF4Tensor, dtype: torch.dtype) -> Tensor:
    if torch.compiler.is_compiling():  # one opaque op in the graph: no graph break, nothing kept
        return torch.ops.lorakit.nf4_linear(
            x, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, list(q.shape), q.blocksize, dtype
        )
    return NF4Matmul.apply(x, q, dtype)


# The same matmul as custom ops for compiled decoder layers (lorakit.train.compiled). TorchInductor
# cannot lower the dequantization, and `torch.compiler.disable` around it broke each compiled layer
# into eight graphs (a QLoRA step took 2.28 s compiled against 1.74 eager); as an opaque op with its
# own backward the layer stays one graph and only the packed weight is kept for backward: a
# default-model QLoRA step then took 1.39-1.59 s compiled against 1.56-1.61 eager, 1.32 GB of peak
# RSS against 1.79 GB.
def _nf4_of(packed, absmax, absmax_scale, absmax_offset, shape, blocksize) -> NF4Tensor:  # type: ignore[no-untyped-def]
    return NF4Tensor(packed, absmax, torch.Size(shape), torch.float32, blocksize, absmax_scale, absmax_offset)


@torch.library.custom_op("lorakit::nf4_linear", mutates_args=())
def _nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    absmax_scale: Tensor | None,
    absmax_offset: Tensor | None,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
    transposed: bool = False,
) -> Tensor:
    """x W^T (..., out), or with `transposed` x W (..., in): the forward and its input gradient."""
    weight = dequantize_nf4(_nf4_of(packed, absmax, absmax_scale, absmax_offset, shape, blocksize), dtype)
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype) @ weight if transposed else F.linear(x, weight)


@_nf4_linear.register_fake
def _(x, packed, absmax, absmax_scale, absmax_offset, shape, blocksize, dtype, transposed=False):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], shape[1] if transposed else shape[0]), dtype=dtype)


def _nf4_linear_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, packed, absmax, absmax_scale, absmax_offset, shape, blocksize, dtype, transposed = inputs
    ctx.save_for_backward(packed, absmax, absmax_scale, absmax_offset)
    ctx.shape, ctx.blocksize, ctx.dtype, ctx.transposed = shape, blocksize, dtype, transposed


def _nf4_linear_backward(ctx, grad):  # type: ignore[no-untyped-def]
    dx = _nf4_linear(grad, *ctx.saved_tensors, ctx.shape, ctx.blocksize, ctx.dtype, not ctx.transposed)
    return dx, None, None, None, None, None, None, None, None


_nf4_linear.register_autograd(_nf4_linear_backward, setup_context=_nf4_linear_setup)


def stored_nf4(module: nn.Module, shape: tuple[int, int]) -> NF4Tensor:
    """The NF4Tensor a 4-bit module keeps as buffers (packed, absmax, absmax_scale, absmax_offset)."""
    return NF4Tensor(
        module.packed,
        module.absmax,
        torch.Size(shape),
        module.weight_dtype,
        module.blocksize,
        module.absmax_scale,
        module.absmax_offset,
    )


class Linear4bit(nn.Module):
    """nn.Linear with its weight in NF4 (frozen); the bias, if any, stays in its own dtype, frozen.

    `compute_dtype` is the dtype of the matmul outside autocast (inside autocast, autocast's);
    None means the input's. The output has the input's dtype outside autocast, as nn.Linear.
    """

    is_quantized_linear = True  # lets target matching treat it as a linear layer
    weight_layout = "out_in"

    def __init__(
        self,
        q: NF4Tensor,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        kernel: str = "torch",
        from_conv1d: bool = False,
    ) -> None:
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype = q.blocksize, q.dtype
        self.compute_dtype, self.kernel, self.from_conv1d = compute_dtype, kernel, from_conv1d
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._bnb_state: tuple[object, object] | None = None

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = torch.bfloat16,
        kernel: str = "torch",
    ) -> Linear4bit:
        """Quantize an nn.Linear (or GPT-2's Conv1D, whose weight is stored (in, out))."""
        conv1d = not isinstance(module, nn.Linear)
        weight = module.weight.detach()
        q = quantize_nf4(weight.T if conv1d else weight, blocksize, double_quant)
        return cls(q, getattr(module, "bias", None), compute_dtype, kernel, from_conv1d=conv1d)

    @property
    def weight(self) -> NF4Tensor:
        """The NF4 weight (out, in): shape, device and dequantize() like a tensor's, no float copy."""
        return stored_nf4(self, (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.weight, dtype)

    def _dtype(self, x: Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.compute_dtype or x.dtype

    def forward(self, x: Tensor) -> Tensor:
        dtype = self._dtype(x)
        if self.kernel == "bitsandbytes":
            out = self._bnb_matmul(x.to(dtype))
        else:
            out = _nf4_matmul(x.to(dtype), self.weight, dtype)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)

    def _bnb_matmul(self, x: Tensor) -> Tensor:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), quant_state=self.bnb_quant_state(x.dtype))

    def bnb_quant_state(self, dtype: torch.dtype) -> object:
        """The same packed weight described as a bitsandbytes QuantState."""
        from bitsandbytes.functional import QuantState

        q = self.weight
        nested = None
        if q.double_quant:
            nested = QuantState(
                absmax=q.absmax_scale, code=dynamic_code(q.device), blocksize=256, dtype=torch.float32
            )
        return QuantState(
            absmax=q.absmax,
            shape=q.shape,
            dtype=dtype,
            blocksize=q.blocksize,
            code=nf4_code(q.device),
            quant_type="nf4",
            offset=q.absmax_offset,
            state2=nested,
        )

    def dequantized_module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The full-precision layer this one approximates (nn.Linear, or Conv1D if it came from one)."""
        weight = self.dequantize(dtype)  # (out, in)
        bias = self.bias is not None
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features)
            module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
            if not bias:
                module.bias = None
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=bias, device="meta")
            module.weight = nn.Parameter(weight, requires_grad=False)
        if bias:
            module.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return module.to(weight.device)

    def extra_repr(self) -> str:
        dq = "double-quantized" if self.absmax_scale is not None else "fp32"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize="
            f"{self.blocksize} ({dq} scales), compute_dtype={self.compute_dtype}, kernel={self.kernel}"
        )


def _is_float_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def quantize_model(
    model: nn.Module,
    skip_modules: Iterable[str] = (),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    kernel: str = "torch",
) -> list[str]:
    """Replace every linear layer (nn.Linear, Conv1D) by a Linear4bit, in place; returns their names.

    Left in full precision: the output head (`get_output_embeddings()`, often tied to the input
    embedding), embeddings and norms (not linear), layers already in 4 bits, and `skip_modules`
    (a name matches a module whose name equals it or ends with "." + it).
    """
    skip = list(skip_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [
        name
        for name, module in model.named_modules()
        if _is_float_linear(module)
        and module is not head
        and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name in names:
        module = model.get_submodule(name)
        model.set_submodule(
            name, Linear4bit.from_linear(module, blocksize, double_quant, compute_dtype, kernel)
        )
    if names:
        from lorakit.models import release_file_mapping

        # the fp32 weights just replaced were read from the safetensors mapping, and the embedding
        # left in it would keep all of them resident (+600 MB of peak RSS on a QLoRA step)
        release_file_mapping(model)
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every Linear4bit (and Embedding4bit) by the full-precision layer it approximates, in
    place. A head that shared a 4-bit embedding's codes gets the new embedding's weight: tied again."""
    tables: dict[int, nn.Parameter] = {}
    embeds = [name for name, m in model.named_modules() if getattr(m, "is_quantized_embedding", False)]
    for name in embeds:
        quantized = model.get_submodule(name)
        module = quantized.dequantized_module(dtype)
        model.set_submodule(name, module)
        tables[quantized.packed.data_ptr()] = module.weight
    names = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        quantized = model.get_submodule(name)
        shared = tables.get(quantized.packed.data_ptr())
        if shared is not None:
            module = nn.Linear(quantized.in_features, quantized.out_features, bias=False, device="meta")
            module.weight = shared
        else:
            module = quantized.dequantized_module(dtype)
        model.set_submodule(name, module)
    return embeds + names


def weight_memory(model: nn.Module, reference_bytes: int = 2) -> dict[str, float]:
    """The frozen base's storage next to the same model with every weight in a `reference_bytes`
    dtype (2: bf16). Trainable parameters (the adapter) are left out; tied tensors count once.

    `model_*` covers every frozen parameter and the 4-bit layers' buffers; `linear_*` only the
    layers held in NF4 (their packed codes, scales and bias). Layers left in full precision count
    at `reference_bytes` per value in both columns, as they would be stored in a bf16 checkpoint.
    """
    linear_actual = linear_reference = linear_params = packed_bytes = 0
    counted: set[int] = set()
    embed_actual = embed_reference = 0
    for module in model.modules():
        if getattr(module, "is_quantized_embedding", False):  # an NF4 table: counted once, with a tied head
            embed_actual += module.weight.nbytes
            embed_reference += module.num_embeddings * module.embedding_dim * reference_bytes
            counted.update(t.data_ptr() for t in module.buffers())
    for module in model.modules():
        if isinstance(module, Linear4bit) and module.packed.data_ptr() in counted:
            continue  # a head over an NF4 embedding's codes
        if isinstance(module, Linear4bit):
            n = module.out_features * module.in_features
            bias = module.bias.numel() if module.bias is not None else 0
            packed_bytes += module.weight.nbytes
            linear_actual += module.weight.nbytes + bias * reference_bytes
            linear_reference += (n + bias) * reference_bytes
            linear_params += n
            counted.update(t.data_ptr() for t in [*module.buffers(), *module.parameters()])
    other = frozen_bytes(model, counted, reference_bytes)
    return weight_report(
        linear_actual,
        linear_reference,
        linear_params,
        packed_bytes,
        other + embed_actual,
        other + embed_reference,
    )


def frozen_bytes(model: nn.Module, counted: set[int], reference_bytes: int) -> int:
    """Bytes of the frozen parameters not in `counted` (data pointers), at `reference_bytes` each."""
    total = 0
    for p in model.parameters():
        if p.requires_grad or p.data_ptr() in counted:
            continue
        counted.add(p.data_ptr())
        total += p.numel() * reference_bytes
    return total


def weight_report(
    linear_actual: int,
    linear_reference: int,
    linear_params: int,
    packed_bytes: int,
    rest_actual: int,
    rest_reference: int,
) -> dict[str, float]:
    """The weight-memory figures the bench reports, from the 4-bit layers' totals and the rest's."""
    model_actual, model_reference = linear_actual + rest_actual, linear_reference + rest_reference
    return {
        "model_bytes": model_actual,
        "model_reference_bytes": model_reference,
        "model_ratio": model_actual / model_reference,
        "linear_bytes": linear_actual,
        "linear_reference_bytes": linear_reference,
        "linear_ratio": linear_actual / linear_reference if linear_reference else float("nan"),
        "linear_bits_per_parameter": 8 * packed_bytes / linear_params if linear_params else float("nan"),
    }
