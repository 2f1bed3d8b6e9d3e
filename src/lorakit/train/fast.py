"""Make a model train fast and lean before the first step (the trainer calls this; so does the bench).

Each piece was measured on the default model (bf16 autocast, 4 x 256 tokens, 2 CPU threads) and is
kept because it paid; docs/benchmarks.md has the figures. None of them changes what is computed
beyond rounding order: the linear layers see the same bf16 operands autocast would give them.

- attention: `lorakit.train.attention` (grouped matmul kernel, recomputes probabilities in
  backward) on CPU, where PyTorch's flash kernel is slow at short lengths, if the model uses
  transformers' default (SDPA); an explicit choice such as eager is kept.
- RMSNorm outputs cast once to the autocast dtype (Llama-family norms, whose outputs only feed
  linear layers): otherwise q, k, v and each LoRA branch cast the same fp32 tensor to bf16 on
  their own and autograd keeps every copy (six a layer for attention, four for the MLP). The
  values are the same: each of them would have cast it anyway. (A fused RMSNorm/SwiGLU autograd
  function written in torch ops was also tried: 0.2-0.3 s a step slower, and it saved 60 MB.)
- frozen linear weights stored in the autocast dtype: autocast would cast each of them at every
  forward and keep the cast copy for backward; stored in bf16 they are cast never and kept once.
  Only weights no adapter needs in full precision (PiSSA's residual base; DoRA takes its norms in
  fp32 from the stored weight, whatever its dtype) and only `nn.Linear` layers (not embeddings,
  whose fp32 rows start the fp32 residual stream, nor a tied output head, nor quantized layers).
- glibc's allocator told to keep freed memory (`tune_allocator`): PyTorch's CPU tensors come
  straight from malloc, and glibc returns every large free to the OS, so each step page-faults
  its activations in again (a softmax over a fresh 9 MB tensor took 25 ms instead of 1.3 ms).
  Its small-block caches (tcache, fast bins) can only be turned off at the process's start, which
  the `lorakit` command does (`lorakit_launcher`); the log line says whether they are off
  (`small_block_caches`): with them on, the blocks they hold scatter through the space freed
  activations left and the heap grows instead of reusing it (0.82-0.88x the fp32 task step's peak RSS
  without them, docs/benchmarks.md).
- decoder layers compiled with `torch.compile` for training calls (`lorakit.train.compiled`):
  the elementwise work between matmuls fused, attention probabilities, norm outputs and SwiGLU's
  product recomputed in backward instead of kept. compile="auto" does it on a CPU for models of
  50M+ parameters and runs of 1,000+ passes; the first step pays the compilation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

import torch
from torch import nn

from lorakit.core.contract import AdaptedLayer
from lorakit.models import release_file_mapping

from . import attention
from .config import COMPILES

_ALLOCATOR_TUNED: str | None = None  # the mode tune_allocator last set in this process


def prepare_for_training(
    model: nn.Module,
    amp_dtype: torch.dtype | None,
    compile: str = "auto",
    passes: int | None = None,
    allocator: str = "fast",
) -> list[str]:
    """Apply every speed-up that fits `model`; returns one line per change, for the log.

    `compile`: "auto" compiles the decoder layers (`lorakit.train.compiled`) on a CPU for models of
    at least `AUTO_MIN_PARAMETERS` parameters when a C++ compiler is found, unless a part of the
    model is known to run slower compiled or `passes` (forward/backward passes the run will make,
    if known) is below `AUTO_MIN_PASSES`; "on" compiles wherever possible (and raises where it is
    not); "off" never. `allocator` (CPU): "fast" keeps freed memory for reuse, "lean" hands blocks
    of `LEAN_MMAP_THRESHOLD` and more back to the OS (`tune_allocator`).
    """
    if compile not in COMPILES:
        raise ValueError(f"compile={compile!r}: choose one of {', '.join(COMPILES)}")
    done: list[str] = []
    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    wraps = hasattr(config, attention.INNER)  # a wrapping attention function: switch what it wraps
    current = getattr(config, attention.INNER if wraps else "_attn_implementation", None)
    if device.type == "cpu" and hasattr(model, "set_attn_implementation") and current in ("sdpa", None):
        try:
            if wraps:
                setattr(config, attention.INNER, attention.register())
            else:
                model.set_attn_implementation(attention.register())
            done.append("attention: lorakit grouped-matmul kernel")
        except (ValueError, ImportError) as err:  # a model that refuses custom attention keeps its own
            done.append(f"attention: kept the model's ({err})")
    elif device.type != "cpu" and current is not None:
        done.append(f"attention: the model's own ({current}: on {device.type}, PyTorch's fused kernels)")
    if amp_dtype is not None:
        count = cast_norm_outputs(model)
        if count:
            done.append(f"RMSNorm outputs cast once to the autocast dtype: {count} norms")
        cast = store_frozen_linears(model, amp_dtype)
        if cast:
            done.append(
                f"frozen linear weights stored in {str(amp_dtype).removeprefix('torch.')}: {cast} layers"
            )
    if device.type == "cpu" and tune_allocator(allocator):
        done.append(f"{ALLOCATOR_LINES[allocator]}; {small_block_caches()}")
    if compile != "off":
        done.append(_compile(model, device, compile, passes))
    return done


def _compile(model: nn.Module, device: torch.device, mode: str, passes: int | None) -> str:
    from . import compiled  # it builds on this module's norms and casts

    problem = compiled.compile_problem(model)
    if problem is not None:
        if mode == "on":
            raise ValueError(f"compile='on' is not possible here: {problem}. Use compile='auto' or 'off'")
        return f"torch.compile: not used ({problem})"
    if mode == "auto" and device.type != "cpu":
        return "torch.compile: not used (compile='auto' compiles on CPUs only; 'on' compiles here too)"
    size = sum(p.numel() for p in model.parameters())
    if mode == "auto" and size < compiled.AUTO_MIN_PARAMETERS:
        return (
            f"torch.compile: not used ({size:,} parameters: compiling takes longer than it saves "
            f"below {compiled.AUTO_MIN_PARAMETERS:,}; compile='on' forces it)"
        )
    if mode == "auto" and passes is not None and passes < compiled.AUTO_MIN_PASSES:
        return (
            f"torch.compile: not used ({passes} forward/backward passes: compiling (20-115 s) costs "
            f"more than it saves below {compiled.AUTO_MIN_PASSES}; compile='on' forces it)"
        )
    slower = compiled.slower_compiled(model) if mode == "auto" else None
    if slower is not None:
        return f"torch.compile: not used ({slower}; compile='on' forces it)"
    count = compiled.compile_layers(model)
    return f"torch.compile: {count} decoder layers compiled for training (the first step compiles them)"


# Norms whose output feeds only linear layers (q/k/v, gate/up, the output head) in their models.
# (Not Qwen3's: its class also normalises q and k per head, ahead of the rotary embedding.)
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Phi3RMSNorm")


def cast_norm_outputs(model: nn.Module) -> int:
    """Under autocast, hand the output of each recognised norm on in the autocast dtype."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in NORMS and not getattr(module, "_lorakit_casts_output", False):
            module.register_forward_hook(_cast_output)
            module._lorakit_casts_output = True
            count += 1
    return count


def _cast_output(module: nn.Module, args: Any, output: Any) -> Any:
    return to_autocast_dtype(output)


def to_autocast_dtype(output: Any) -> Any:
    """A tensor in the autocast dtype while autocast is on for its device; anything else as it is."""
    if isinstance(output, torch.Tensor):
        device = output.device.type
        if torch.is_autocast_enabled(device):
            return output.to(torch.get_autocast_dtype(device))
    return output


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights (and biases) of frozen `nn.Linear` layers to `dtype`; returns how many."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = getattr(head, "base_layer", head)  # a head holding an adapter (token rows, LoRA) stays fp32 too
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    readers = {
        id(layer.base_layer)
        for layer in model.modules()
        if isinstance(layer, AdaptedLayer)
        and any(getattr(d, "keeps_base_precision", False) for d in layer.adapters.values())
    }
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or module is head or id(module) in readers:
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad or id(p) in tied for p in params) or module.weight.dtype == dtype:
            continue
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(dtype)
        count += 1
    if count:
        release_file_mapping(model)
    return count


# "lean": every block of this size or more is its own mapping, returned to the OS when freed, so
# resident memory follows what is alive instead of the heap's high-water mark (measured on the
# default task's fp32 batches, AVX2-capped EPYC: peak 1.57 GB against 2.05 GB, 3.80 s a step against
# 2.48 s: each step page-faults its activations in again; 1 MB gave 1.91 GB at 3.11 s, 4 MB nothing).
LEAN_MMAP_THRESHOLD = 256 * 2**10
# (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) per mode; lean keeps glibc's default trim threshold (128 KB),
# so the top of the heap is returned too
ALLOCATOR_SETTINGS = {"fast": (32 * 2**20, 2**31 - 1), "lean": (LEAN_MMAP_THRESHOLD, 128 * 2**10)}
ALLOCATOR_LINES = {
    "fast": "glibc malloc: freed memory kept for reuse (M_MMAP_THRESHOLD 32 MB, no trimming)",
    "lean": "glibc malloc: blocks of 256 KB+ handed back to the OS when freed (--allocator lean: less "
    "resident memory, slower steps)",
}


def small_block_caches() -> str:
    """What the log says of glibc's per-thread cache and fast bins, which only the process's start
    can turn off (`lorakit_launcher`: the `lorakit` command does)."""
    import lorakit_launcher

    if not lorakit_launcher.glibc():
        return "not glibc: its small-block caches do not apply"
    current = os.environ.get("GLIBC_TUNABLES", "")
    if all(knob in current.split(":") for knob in lorakit_launcher.KNOBS):
        return "small-block caches off (GLIBC_TUNABLES), so freed activations are reused in one piece"
    return (
        "glibc's small-block caches on (a Python program's default; the `lorakit` command turns them "
        f"off: GLIBC_TUNABLES={lorakit_launcher.tunables()} before Python starts: 0.2-0.35 GB less at "
        "the default task's fp32 peak)"
    )


def tune_allocator(mode: str = "fast") -> bool:
    """Set glibc's allocator for training (Linux only): "fast" keeps freed heap memory for reuse,
    "lean" hands large blocks back to the OS. Returns whether it was set now (False if it already
    was, or where there is no mallopt)."""
    global _ALLOCATOR_TUNED
    if mode not in ALLOCATOR_LINES:
        raise ValueError(f"allocator={mode!r}: choose one of {', '.join(ALLOCATOR_LINES)}")
    if _ALLOCATOR_TUNED == mode or platform.system() != "Linux":
        return False
    try:
        libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_bytes, trim_bytes = ALLOCATOR_SETTINGS[mode]
    ok = mallopt(m_mmap_threshold, mmap_bytes) == 1 and mallopt(m_trim_threshold, trim_bytes) == 1
    _ALLOCATOR_TUNED = mode if ok else _ALLOCATOR_TUNED
    return ok
