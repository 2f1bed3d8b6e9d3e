"""AdamW, the warm-up + decay schedule, and the autocast precision decision."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.train.config import SCHEDULES, TrainConfig


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in steps; rounds up so a nonzero ratio always warms up at least one step."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr used by optimizer step `step` (0-based).

    Warm-up is linear and starts at 1/warmup rather than 0, so no step is wasted at lr 0. Decay
    runs over the remaining steps and would reach 0 one step after the last, so the last step
    still learns a little.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)  # in [0, 1)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (none has requires_grad=True); apply an adapter "
            "or unfreeze some parameters before training"
        )
    return [{"params": params, "weight_decay": weight_decay}]


def build_optimizer(groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch/device has one, else the foreach one."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "paged_adamw":
        from lorakit.quant.paged import PagedAdamW

        return PagedAdamW(groups, **kwargs)
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch or a dtype the fused kernel refuses
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(
        lr_factor,
        total_steps=config.steps,
        warmup=warmup_steps(config.steps, config.warmup_ratio),
        schedule=config.schedule,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for "bf16", None (plain fp32) for "fp32", and for "auto" bf16 only where it is fast."""
    return precision_choice(precision, device)[0]


def precision_choice(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None = fp32) and one line saying why, for the run's first lines."""
    if precision == "fp32":
        return None, "precision: fp32 (asked for)"
    if precision == "bf16":
        return torch.bfloat16, "precision: bf16 autocast (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "precision: bf16 autocast (this GPU computes bf16 natively)"
        return None, "precision: fp32 (this GPU has no native bf16)"
    if device.type != "cpu":
        return None, f"precision: fp32 (bf16 speed on {device.type} is not known to lorakit)"
    flags = cpu_bf16_flags(_cpuinfo(), torch.backends.cpu.get_cpu_capability())
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    if flags and not onednn_isa_has_bf16(limit):
        return None, (
            f"precision: fp32 (ONEDNN_MAX_CPU_ISA={limit} keeps oneDNN, which runs bf16 matmuls, off this "
            f"CPU's {', '.join(flags)}: bf16 would be emulated; --precision bf16 forces it)"
        )
    if flags:
        return (
            torch.bfloat16,
            f"precision: bf16 autocast (this CPU has {', '.join(flags)}: native bf16 matmuls)",
        )
    return None, (
        "precision: fp32 (this CPU has no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32; "
        "--precision bf16 forces it)"
    )


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls are faster than fp32 only with native support (CUDA Ampere+, AVX512-BF16/AMX)."""
    return precision_choice("auto", device)[0] is not None


def cpu_bf16_flags(cpuinfo: str, capability: str) -> list[str]:
    """The native-bf16 features among a CPU's /proc/cpuinfo flags and torch's dispatch capability."""
    found = sorted(set(cpuinfo.split()) & {"avx512_bf16", "amx_bf16"})
    if "AMX" in capability and "amx_bf16" not in found:
        found.append("amx_bf16")
    return found


# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) at or above the first with native bf16 dot products
BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512", "AVX10_2_512")


def onednn_isa_has_bf16(limit: str) -> bool:
    """Whether oneDNN may use native bf16 under ONEDNN_MAX_CPU_ISA=`limit` (unset or ALL: yes). The
    variable is how a user, or lorakit's own benchmarks, run an AVX512 CPU as an AVX2-only one
    (with ATEN_CPU_CAPABILITY=avx2 and MKL_ENABLE_INSTRUCTIONS=AVX2)."""
    limit = limit.strip().upper()
    return limit in ("", "ALL", "DEFAULT") or limit.startswith(BF16_ISAS)


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.exists() else ""
