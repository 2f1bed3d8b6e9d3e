"""LoRA (Hu et al., ICLR 2022, arXiv 2106.09685), with rsLoRA scaling and PiSSA init.

    y = W0 x + s * B A x        A: (r, in), B: (out, r), s = alpha / r   (rsLoRA: alpha / sqrt(r))

Init "kaiming" (as Hugging Face PEFT): A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the model starts
exactly at the base function. "gaussian": A ~ N(0, 1/r), B = 0. "pissa" (Meng et al., NeurIPS 2024,
arXiv 2404.02948): B A is the top-r SVD part of W0 (divided by s) and the base keeps the residual
W0 - s B0 A0, so the principal subspace is what trains.

A PiSSA adapter is saved as an ordinary LoRA on the *original* base: the trained change is
s (B A - B0 A0) = s [B, -B0] [A; A0], a rank-2r LoRA with the same scale (alpha is rescaled so that
alpha' / 2r equals s). Loaders, including PEFT, need nothing special.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, Role
from ..core.target import TargetSpec

INITS = ("kaiming", "gaussian", "pissa")


# adapter_config.json fields PEFT expects and lorakit always writes the same way (biases stay
# frozen, weights are (out, in) after AdaptedLayer's layout handling, no extra modules saved)
PEFT_FIXED_FIELDS: dict[str, Any] = {
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "use_dora": False,
    "lora_bias": False,
    "inference_mode": True,
}


@dataclass
class LoRAConfig:
    """LoRA on linear layers (and embeddings when named); `rank_pattern` / `alpha_pattern` map a
    module-name suffix to its own rank / alpha, as in PEFT."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    init: str = "kaiming"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # whole modules trained beside the LoRA (PEFT's rule: names that module names end with), e.g.
    # ["embed_tokens", "norm"]; with tied embeddings the head moves with the embedding unless
    # ensure_weight_tying is False (core/copies.py)
    modules_to_save: list[str] | None = None
    ensure_weight_tying: bool = True

    peft_type: ClassVar[str] = "LORA"
    # None: trains under FSDP2 (--fsdp, train/fsdp.py); a subclass that cannot says why
    fsdp_problem: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    def rank_alpha(self, path: str) -> tuple[int, float]:
        rank = _pattern_lookup(self.rank_pattern, path, self.rank)
        return rank, _pattern_lookup(self.alpha_pattern, path, self.alpha)

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        rank, alpha = self.rank_alpha(path)
        scale = self.scaling(rank, alpha)
        if layer.is_embedding:
            if self.init == "pissa":
                raise ValueError(f"init='pissa' is for linear layers; {path} is an embedding")
            return LoRAEmbeddingDelta(layer, rank, scale)
        return LoRADelta(layer, rank, scale, self.dropout, self.init)

    def to_peft_dict(self) -> dict[str, Any]:
        rank_pattern, alpha_pattern = dict(self.rank_pattern), dict(self.alpha_pattern)
        rank, alpha = self.rank, self.alpha
        if self.init == "pissa":  # saved as the rank-2r conversion, see the module docstring
            rank, alpha = 2 * self.rank, self._doubled_alpha(self.rank, self.alpha)
            for key in set(rank_pattern) | set(alpha_pattern):
                r, a = self.rank_alpha(key)
                rank_pattern[key], alpha_pattern[key] = 2 * r, self._doubled_alpha(r, a)
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if self.init in ("kaiming", "pissa") else "gaussian",
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            **PEFT_FIXED_FIELDS,
        }

    def _doubled_alpha(self, rank: int, alpha: float) -> float:
        """alpha' such that the rank-2r conversion keeps the scale s of rank r."""
        scale = self.scaling(rank, alpha)
        return scale * (math.sqrt(2 * rank) if self.use_rslora else 2 * rank)

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        _refuse_unsupported(d)
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(("pissa", "olora")):
            raise ValueError(
                f"this adapter was saved with init_lora_weights={init!r} against a modified base "
                "(residual) weight, so it is not a delta on the original model; re-save it with "
                "PEFT's path_initial_model_for_weight_conversion to convert it to plain LoRA"
            )
        return cls(
            rank=int(d.get("r", 8)),
            alpha=d.get("lora_alpha", 8),
            dropout=float(d.get("lora_dropout", 0.0) or 0.0),
            target_modules=_targets_from_peft(d.get("target_modules")),
            exclude_modules=_targets_from_peft(d.get("exclude_modules")),
            init="gaussian" if init == "gaussian" else "kaiming",
            use_rslora=bool(d.get("use_rslora", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
            modules_to_save=list(d.get("modules_to_save") or []) or None,
            ensure_weight_tying=bool(d.get("ensure_weight_tying", False)),  # PEFT's default
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern_lookup(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """PEFT's rule: a key matches a module whose name equals it or ends with '.' + key."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def _targets_from_peft(value: Any) -> TargetSpec:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def _refuse_unsupported(d: dict[str, Any]) -> None:
    checks = {
        "bias": d.get("bias") not in (None, "none"),
        "lora_bias": d.get("lora_bias"),
        "layers_to_transform": d.get("layers_to_transform"),
        "layer_replication": d.get("layer_replication"),
        "trainable_token_indices": d.get("trainable_token_indices"),
        "target_parameters": d.get("target_parameters"),
    }
    used = [key for key, value in checks.items() if value]
    if used:
        raise ValueError(f"this adapter uses PEFT options lorakit does not support yet: {used}")
    if not d.get("target_modules"):
        raise ValueError("adapter_config.json has no target_modules; lorakit needs them explicitly")


class LoRADelta(Delta):
    """The LoRA branch of one linear layer (nn.Linear or GPT-2 Conv1D)."""

    roles: ClassVar[dict[str, Role]] = {"lora_A": Role.A, "lora_B": Role.B}
    peft_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float, dropout: float, init: str) -> None:
        super().__init__()
        device = layer.base_layer.weight.device
        self.rank, self.scale, self.init = rank, scale, init
        self.lora_A = nn.Parameter(torch.empty(rank, layer.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "pissa":
            self._pissa_init(layer)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _pissa_init(self, layer: AdaptedLayer) -> None:
        weight = layer.weight_out_in()  # (out, in)
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[: self.rank] / self.scale).sqrt()  # so that scale * B A is the principal part
        with torch.no_grad():
            self.lora_B.copy_(U[:, : self.rank] * root)  # (out, r)
            self.lora_A.copy_(root[:, None] * Vh[: self.rank])  # (r, in)
        self.keeps_base_precision = True  # unwrap adds B0 A0 back: keep the residual weight in fp32
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        layer.set_weight_out_in(weight - self.scale * self.pissa_B0 @ self.pissa_A0)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype
            x = x.to(self.lora_A.dtype)
        h = F.linear(x, self.lora_A)  # (..., r)
        return (F.linear(h, self.lora_B) * self.scale).to(base_out.dtype)  # (..., out)

    def gated(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer, gate: Tensor) -> Tensor:
        """g * scale * B (A x), the gate applied to the rank-r activation: r values a token instead of
        a pass over the (tokens, out) output, forward and backward (a mixture's LoRA expert)."""
        if type(self).forward is not LoRADelta.forward:  # a subclass computes its own output
            return super().gated(x, base_out, layer, gate)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        h = F.linear(x, self.lora_A)  # (..., r)
        h = h * (gate * self.scale).to(h.dtype)
        return F.linear(h, self.lora_B).to(base_out.dtype)

    def add_to(self, out: Tensor, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        """out + scale * (x A^T) B^T with the B matmul, the scale and the addition in one addmm: two
        fewer passes over the (tokens, out) output forward (2-5% of an unmerged forward) and one
        fewer backward, where the output's gradient passes through to the base unchanged.

        Written for decoding too, where one token's matmuls take microseconds and the Python around
        them counts: parameters read from `_parameters`, no module call for a no-op dropout.
        """
        if type(self).forward is not LoRADelta.forward or (
            torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)
        ):
            # training under autocast keeps the separate ops (under bf16 the fused addmm's gradients
            # came out further from fp32 in tests/train/test_fast.py); a subclass has its own forward
            return super().add_to(out, x, base_out, layer)
        params = self._parameters
        lora_A, lora_B = params["lora_A"], params["lora_B"]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = lora_B.dtype
            if x.dtype != dtype:
                x = x.to(dtype)
        if out.dtype != dtype:  # a base computing in another dtype: the separate ops cast
            return super().add_to(out, x, base_out, layer)
        dropout = self._modules["dropout"]
        if self.training and type(dropout) is not nn.Identity:
            x = dropout(x)
        h = F.linear(x, lora_A)  # (..., r)
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.t(), alpha=self.scale
        )
        return flat.view(out.shape)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B.float() @ self.lora_A.float())  # (out, in)

    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return weight - self.delta_weight()

    def restore_base(self, weight: Tensor) -> Tensor:
        if self.init != "pissa":
            return weight
        return weight + self.scale * self.pissa_B0 @ self.pissa_A0

    def base_correction(self, x: Tensor, layer: AdaptedLayer) -> Tensor | None:
        if self.init != "pissa":
            return None
        h = F.linear(x.to(self.pissa_A0.dtype), self.pissa_A0)
        return (F.linear(h, self.pissa_B0) * self.scale).to(x.dtype)

    def export_state(self) -> dict[str, Tensor]:
        A, B = self.lora_A.detach(), self.lora_B.detach()
        if self.init == "pissa":
            A, B = torch.cat([A, self.pissa_A0]), torch.cat([B, -self.pissa_B0], dim=1)
        return {"lora_A.weight": A, "lora_B.weight": B}


class LoRAEmbeddingDelta(Delta):
    """LoRA on an nn.Embedding, laid out as PEFT does: A (r, num_embeddings) = 0, B (dim, r) ~ N(0, 1)."""

    roles: ClassVar[dict[str, Role]] = {"lora_embedding_A": Role.A, "lora_embedding_B": Role.B}
    peft_keys: ClassVar[dict[str, str]] = {
        "lora_embedding_A": "lora_embedding_A",
        "lora_embedding_B": "lora_embedding_B",
    }

    def __init__(self, layer: AdaptedLayer, rank: int, scale: float) -> None:
        super().__init__()
        device = layer.base_layer.weight.device
        self.rank, self.scale = rank, scale
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, layer.in_features, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(layer.out_features, rank, device=device))

    def forward(self, ids: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        h = F.embedding(ids, self.lora_embedding_A.T)  # (..., r)
        return (F.linear(h, self.lora_embedding_B) * self.scale).to(base_out.dtype)  # (..., dim)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_embedding_B.float() @ self.lora_embedding_A.float())  # (dim, num)

    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return weight - self.delta_weight()
