"""LoRA+ (Hayou, Ghosh, Yu, ICML 2024, arXiv 2402.12354): a larger learning rate for B than for A.

With lr_A = lr and lr_B = ratio * lr (the paper's rule of thumb is ratio = 16; the authors say the
best ratio depends on the task and model), the two factors learn at balanced speeds in the
infinite-width limit. LoRA+ changes only the optimizer, so it applies to every method whose deltas
declare A/B roles (LoRA, DoRA, QLoRA) and the saved adapter is an ordinary one.

Groups go by declared role, never by parameter name. Parameters that are neither A nor B get an
explicit rate: DoRA magnitudes `magnitude_ratio * lr` (default 1, i.e. lr, not B's rate by
accident), anything else (biases, norms, other trainable tensors) `lr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.contract import Role
from ..core.model import param_groups
from .lora import LoRAConfig

DEFAULT_RATIO = 16.0


def loraplus_lr_ratios(ratio: float = DEFAULT_RATIO, magnitude_ratio: float = 1.0) -> dict[Role, float]:
    """lr multipliers by role for `lorakit.param_groups(..., lr_ratios=...)`."""
    if ratio <= 0 or magnitude_ratio <= 0:
        raise ValueError(
            f"LoRA+ ratios must be positive, got ratio={ratio}, magnitude_ratio={magnitude_ratio}"
        )
    return {Role.A: 1.0, Role.B: ratio, Role.MAGNITUDE: magnitude_ratio}


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = DEFAULT_RATIO,
    weight_decay: float = 0.0,
    magnitude_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    groups = param_groups(model, lr, weight_decay, loraplus_lr_ratios(ratio, magnitude_ratio))
    if not any(g["role"] == Role.B.value for g in groups):
        roles = sorted({g["role"] for g in groups}) or ["none"]
        raise ValueError(
            f"LoRA+ needs trainable parameters with role B (LoRA, DoRA, QLoRA); this model's trainable roles are: {roles}"
        )
    return groups


def loraplus_optimizer(
    model: nn.Module,
    lr: float,
    ratio: float = DEFAULT_RATIO,
    weight_decay: float = 0.0,
    magnitude_ratio: float = 1.0,
    **adamw_kwargs: Any,
) -> torch.optim.AdamW:
    """AdamW with LoRA+ learning rates: role B at lr * ratio, role A at lr (see the module docstring)."""
    groups = loraplus_param_groups(model, lr, ratio, weight_decay, magnitude_ratio)
    return torch.optim.AdamW(groups, lr=lr, **adamw_kwargs)


@dataclass
class LoRAPlusConfig(LoRAConfig):
    """LoRA trained with LoRA+ learning rates; saved as a plain LoRA adapter."""

    loraplus_ratio: float = DEFAULT_RATIO
    magnitude_ratio: float = 1.0

    def lr_ratios(self) -> dict[Role, float]:
        return loraplus_lr_ratios(self.loraplus_ratio, self.magnitude_ratio)
