"""Decoder layers compiled with `torch.compile` for the training forward and backward only.

On the default model (4 x 256 tokens, bf16 autocast, 2 CPU threads) compiling each decoder layer
took a LoRA step from ~1.4-1.5 to ~1.2 s and its peak RSS from ~1.95 to ~1.42 GB: TorchInductor fuses
the elementwise work between the matmuls (RMSNorm, rotary embedding, SiLU x up, residual adds, the
casts autocast inserts) into a few C++ loops, forward and backward, and `recompute_in_backward`
plus the attention's checkpoint make backward recompute cheap tensors instead of keeping them.
The matmuls themselves stay oneDNN's. Gradients come out slightly *closer* to fp32 training than
eager bf16 autocast (fewer intermediate roundings; docs/benchmarks.md has the figures).

What it costs: one compilation (about 115 s on the default model with a cold TorchInductor cache on
2 cores, 20 s when its on-disk cache already holds the kernels), with `dynamic=True` so that the
trainer's micro-batches of every length and size share it. What it saves depends on the shapes:
~0.3 s a pass at 4 x 256 tokens, ~0.1 s at the default run's 8 x ~75 (1.59 against 1.68 s a step),
so `compile="auto"` waits for runs of 1,000+ passes. One compiled function serves every layer of
a class. Only calls that build a graph for backward take the compiled path (grad enabled, module
in training mode, no KV cache passed in); evaluation and generation run the layer's own forward.

It never costs a run: if compiling or running the compiled layer raises, the same call runs the
eager forward; if that succeeds, compiling is switched off for the model (with a warning) and
training goes on eagerly; if the eager forward raises too, that error is the real one and goes up.
"""

from __future__ import annotations

import shutil
import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.contract import AdaptedLayer, Delta
from ..core.kvcache import LAYER_CACHE_ARGUMENTS
from .fast import NORMS, to_autocast_dtype

# Models below this size compile for longer than they run (the test suite's tiny models, say).
AUTO_MIN_PARAMETERS = 50_000_000
# nor runs this short. Compiling the default model costs ~115 s with a cold TorchInductor cache and
# ~20 s with a warm one; a pass saves ~0.3 s at 4 x 256 tokens but only ~0.1 s at the default run's
# 8 x ~75, so its 300 passes came out 80 s slower compiled (cold). Long runs gain.
AUTO_MIN_PASSES = 1000
# Llama-style MLPs, down(act(gate(x)) * up(x)), whose product is recomputed in backward.
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_problem(model: nn.Module) -> str | None:
    """Why the decoder layers of `model` cannot be compiled here; None if they can."""
    if not decoder_layers(model):
        return f"{type(model).__name__} names no decoder-layer class (_no_split_modules)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    device = next(model.parameters()).device
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler found (TorchInductor builds its CPU kernels with one)"
    return None


def slower_compiled(model: nn.Module) -> str | None:
    """Why compiling is measured to slow `model` down (a part that says `compiles_slower`); or None."""
    for module in model.modules():
        reason = getattr(module, "compiles_slower", None)
        if reason:
            return str(reason)
    return None


def compile_layers(model: nn.Module) -> int:
    """Route each decoder layer's training calls through one compiled forward; returns how many."""
    recompute_in_backward(model)
    state = _State()
    compiled: dict[type, Any] = {}
    count = 0
    for layer in decoder_layers(model):
        if "forward" in layer.__dict__:  # compiled already, or another patch's own forward: left alone
            continue
        kind = type(layer)
        if kind not in compiled:
            compiled[kind] = torch.compile(kind.forward, dynamic=True)
        layer.forward = TrainingForward(layer, compiled[kind], state)
        count += 1
    return count


def uncompile_layers(model: nn.Module) -> int:
    """Give every decoder layer (and norm, MLP) its own forward back; returns how many layers."""
    count = 0
    for module in model.modules():
        own = module.__dict__.get("forward")
        if isinstance(own, TrainingForward):
            count += 1
        if isinstance(own, TrainingForward) or getattr(own, "__func__", None) in (
            _mlp_forward,
            _norm_forward,
        ):
            del module.forward
    return count


class _State:
    """Shared by the layers of one model: a failure switches all of them back to eager."""

    def __init__(self) -> None:
        self.enabled = True


class TrainingForward:
    """A layer's `forward`: the compiled function for training calls, the layer's own otherwise.

    It holds the unbound compiled function and the layer, not a bound method, so a deep copy of the
    model calls its own layers.
    """

    def __init__(self, layer: nn.Module, compiled: Any, state: _State) -> None:
        self.layer = layer
        self.compiled = compiled
        self.state = state
        self.adapted = [m for m in layer.modules() if isinstance(m, AdaptedLayer)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        eager = type(layer).forward
        if not (self.state.enabled and torch.is_grad_enabled() and layer.training):
            return eager(layer, *args, **kwargs)
        if any(kwargs.get(name) is not None for name in LAYER_CACHE_ARGUMENTS):
            return eager(layer, *args, **kwargs)  # prefix tuning's KV prefix, a generation cache
        prepared = self._prepare()
        try:
            return self.compiled(layer, *args, **kwargs)
        except Exception as err:  # compiling failed (no compiler, an unsupported op): run eagerly
            out = eager(layer, *args, **kwargs)  # raises if the call itself is wrong
            self.state.enabled = False
            warnings.warn(
                f"torch.compile of {type(layer).__name__} failed ({_summary(err)}); "
                "training goes on with the eager layers (compile='off' skips the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            return out
        finally:
            self._finish(prepared)

    def _prepare(self) -> list[Delta]:
        """Each active delta's eager pre-work (`Delta.prepare_compiled`); returns those that did some."""
        prepared = []
        for adapted in self.adapted:
            for name in adapted.active if adapted.enabled else ():
                delta = adapted.adapters[name]
                if name not in adapted.merged and type(delta).prepare_compiled is not Delta.prepare_compiled:
                    delta.prepare_compiled(adapted)
                    prepared.append(delta)
        return prepared

    @staticmethod
    def _finish(prepared: list[Delta]) -> None:
        for delta in prepared:
            delta.finish_compiled()


def _summary(err: Exception) -> str:
    """`Type: message` on one line; a compiler failure's own first line only says who raised."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines or [""])[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def recompute_in_backward(model: nn.Module) -> int:
    """Inside compiled layers, recompute two cheap producers of matmul inputs instead of keeping them.

    The input of every linear layer is kept for its LoRA branch's gradient; where that input is an
    elementwise function of tensors kept anyway, recomputing it in backward is one fused pass. The
    RMSNorm output (with its cast to bf16) comes back from the norm's input, and SwiGLU's product
    from gate and up: together -170 MB of peak RSS on the default model, no measurable time.
    Outside `torch.compile` the modules run their own forward unchanged.
    """
    count = 0
    for module in model.modules():
        name = type(module).__name__
        patch = _mlp_forward if name in MLPS else _norm_forward if name in NORMS else None
        if patch is not None and "forward" not in module.__dict__:
            module.forward = types.MethodType(patch, module)
            count += 1
    return count


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return type(self).forward(self, x)
    product = checkpoint(_swiglu, self.act_fn, self.gate_proj(x), self.up_proj(x), use_reentrant=False)
    return self.down_proj(product)


def _swiglu(act: Any, gate: Tensor, up: Tensor) -> Tensor:
    return act(gate) * up


def _norm_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return type(self).forward(self, x)
    return checkpoint(_norm_cast, self, x, use_reentrant=False)


def _norm_cast(norm: nn.Module, x: Tensor) -> Tensor:
    """The norm's output in the autocast dtype, as `fast.cast_norm_outputs` hands it on."""
    return to_autocast_dtype(type(norm).forward(norm, x))
