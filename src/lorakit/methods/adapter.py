"""Bottleneck adapters (Houlsby et al., ICML 2019, arXiv 1902.00751; Pfeiffer et al., EACL 2021,
arXiv 2005.00247).

    h' = h + f(h W_down + b_down) W_up + b_up       W_down: (m, d), W_up: (d, m), m << d

where h is the output of a sublayer, before the residual add. Houlsby placement puts one adapter
after the attention output projection and one after the MLP in every layer; Pfeiffer placement
only the one after the MLP. W_up and both biases start at zero, so the model starts exactly at the
base function; W_down starts as nn.Linear does (kaiming-uniform), so W_up gets gradients at once.

An adapter is an extra sequential layer with a nonlinearity: it cannot be folded into W0, so
`merge` raises NotMergeableError and generation always pays for it (measured in
docs/methods/schools.md). Each adapter reads the output of the layer it wraps, so it must be the only
adapter on that layer (a merged LoRA on the same layer would change what the adapter reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, NotMergeableError, Role
from ..core.target import TargetSpec

# where each placement goes, for the Llama family (o_proj, down_proj) and GPT-2 (attn/mlp c_proj)
PLACEMENTS = {
    "houlsby": r".*\.(self_attn\.o_proj|mlp\.down_proj|attn\.c_proj|mlp\.c_proj)",
    "pfeiffer": r".*\.(mlp\.down_proj|mlp\.c_proj)",
}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class AdapterConfig:
    """Bottleneck adapters of width `size` at `placement` ("houlsby" or "pfeiffer");
    `modules` overrides the placement with explicit target modules (same forms as LoRA's)."""

    size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    modules: TargetSpec = None
    exclude_modules: TargetSpec = None

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"  # lorakit's own: PEFT has no bottleneck adapter
    default_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size (the bottleneck width) must be a positive integer, got {self.size}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")

    @property
    def target_modules(self) -> TargetSpec:
        return self.modules if self.modules is not None else PLACEMENTS[self.placement]

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        if layer.adapters:
            raise ValueError(
                f"{path} already holds adapter(s) {list(layer.adapters)}; a bottleneck adapter reads "
                "its layer's output and must be the only adapter there"
            )
        if layer.is_embedding:
            raise ValueError(f"bottleneck adapters go after linear layers; {path} is an embedding")
        return BottleneckDelta(layer, self.size, self.activation)

    def to_peft_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "size": self.size,
            "placement": self.placement,
            "activation": self.activation,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        targets = d.get("target_modules")
        return cls(
            size=int(d["size"]),
            placement=d.get("placement", "houlsby"),
            activation=d.get("activation", "relu"),
            modules=sorted(targets) if isinstance(targets, (list, tuple)) else targets,
        )


class BottleneckDelta(Delta):
    """One bottleneck adapter on the output of the layer it wraps."""

    roles: ClassVar[dict[str, Role]] = {
        "adapter_down": Role.A,
        "adapter_up": Role.B,
        "adapter_down_bias": Role.BIAS,
        "adapter_up_bias": Role.BIAS,
    }
    peft_keys: ClassVar[dict[str, str]] = {
        "adapter_down": "adapter_down.weight",
        "adapter_down_bias": "adapter_down.bias",
        "adapter_up": "adapter_up.weight",
        "adapter_up_bias": "adapter_up.bias",
    }
    mergeable: ClassVar[bool] = False

    def __init__(self, layer: AdaptedLayer, size: int, activation: str) -> None:
        super().__init__()
        device, d = layer.base_layer.weight.device, layer.out_features
        self.activation = activation
        self.adapter_down = nn.Parameter(torch.empty(size, d, device=device))
        self.adapter_down_bias = nn.Parameter(torch.zeros(size, device=device))
        self.adapter_up = nn.Parameter(torch.zeros(d, size, device=device))
        self.adapter_up_bias = nn.Parameter(torch.zeros(d, device=device))
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        if layer.merged:
            raise RuntimeError(
                f"adapter(s) {layer.merged} are merged into the layer this bottleneck adapter reads; "
                "unmerge them first"
            )
        h = base_out
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.adapter_down.dtype)
        z = ACTIVATIONS[self.activation](F.linear(h, self.adapter_down, self.adapter_down_bias))  # (..., m)
        return F.linear(z, self.adapter_up, self.adapter_up_bias).to(base_out.dtype)  # (..., d)

    def merged_weight(self, weight: Tensor) -> Tensor:
        raise NotMergeableError(
            "a bottleneck adapter is a nonlinear layer after the base layer, not a weight change, so "
            "it cannot be merged; it stays in the forward pass (lorakit.disable_adapters gives the base)"
        )
