"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): SVD-form LoRA whose rank budget moves to
the layers where it matters.

    y = W0 x + s * P diag(lambda) Q x  =  W0 x + s * B (A * E) x
    A = Q: (r, in)   E = lambda: (r, 1)   B = P: (out, r)   s = alpha / init_rank (fixed)

E starts at 0 (the model starts at the base function); A and B ~ N(0, 0.02), as the authors' code
and Hugging Face PEFT. No SVD is ever computed: P and Q are kept near-orthogonal by a penalty,
and the budget (how many lambdas stay non-zero, over all layers) shrinks from `init_rank` to
`target_rank` per layer on average during training. That part lives in `adalora_budget.py` and
runs through the trainer's hooks (`AdaLoRAConfig.training_hooks`).

Saved as PEFT saves AdaLoRA: `lora_A`, `lora_E`, `lora_B` sliced to the kept triplets and
`rank_pattern` = {"<module>.lora_E": [kept?] * init_rank} in adapter_config.json; a delta built
from a rank pattern holds only its kept triplets and keeps the scale alpha / init_rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, Role
from ..core.target import TargetSpec
from .lora import PEFT_FIXED_FIELDS, _refuse_unsupported, _targets_from_peft

INIT_STD = 0.02  # A and B ~ N(0, 0.02): the authors' SVDLinear and PEFT


@dataclass
class AdaLoRAConfig:
    """AdaLoRA on linear layers. `init_rank` defaults to 1.5 x `target_rank` (PEFT's 12 -> 8).

    Schedule, in optimizer steps of a run of T steps: the budget stays at init for `t_init` steps,
    falls as a cubic to the target at step T - `t_final`, then stays fixed; reallocation runs every
    `delta_t` steps. Unset (None) values come from T: t_init = max(1, T // 10), t_final = 3T // 10,
    delta_t = max(1, T // 30); `total_steps` None means the trainer's step count.
    `orth_reg_weight` is gamma (the authors' 0.1; PEFT defaults to 0.5).
    """

    target_rank: int = 8
    init_rank: int | None = None
    alpha: float = 16
    dropout: float = 0.0
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    t_init: int | None = None
    t_final: int | None = None
    delta_t: int | None = None
    total_steps: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)  # module path -> kept slots

    peft_type: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        if self.init_rank is None:
            self.init_rank = (3 * self.target_rank + 1) // 2
        if not 1 <= self.target_rank <= self.init_rank:
            raise ValueError(
                f"AdaLoRA needs 1 <= target_rank <= init_rank, got target_rank={self.target_rank}, "
                f"init_rank={self.init_rank}"
            )
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        for path, kept in self.rank_pattern.items():
            if len(kept) != self.init_rank:
                raise ValueError(
                    f"rank_pattern[{path!r}] has {len(kept)} entries; it needs one per initial "
                    f"triplet (init_rank={self.init_rank})"
                )

    @property
    def scale(self) -> float:
        return self.alpha / self.init_rank

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        if layer.is_embedding:
            raise ValueError(
                f"AdaLoRA adapts linear layers; {path} is an nn.Embedding. Leave it out of "
                "target_modules or use LoRAConfig for it"
            )
        kept = self.rank_pattern.get(path, [True] * self.init_rank)
        slots = tuple(i for i, keep in enumerate(kept) if keep)
        return AdaLoRADelta(layer, slots, self.init_rank, self.scale, self.dropout)

    def training_hooks(self, model: nn.Module, adapter_name: str) -> Any:
        from .adalora_budget import RankAllocator

        return RankAllocator(self, model, adapter_name)

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's AdaLoraConfig; the schedule is written as the trainer resolved it (see
        `adalora_budget.Schedule`), and `r` is PEFT's placeholder (PEFT ignores it for AdaLoRA)."""
        from .adalora_budget import Schedule

        if self.total_steps is not None:
            schedule = Schedule.resolve(self, self.total_steps)
        else:  # never trained: record what was set; PEFT needs total_step > tinit + tfinal
            t_init, t_final = self.t_init or 0, self.t_final or 0
            schedule = Schedule(t_init + t_final + 1, t_init, t_final, self.delta_t or 1)
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "r": 8,
            "init_r": self.init_rank,
            "target_r": self.target_rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "tinit": schedule.t_init,
            "tfinal": schedule.t_final,
            "deltaT": schedule.delta_t,
            "total_step": schedule.total,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "rank_pattern": {f"{p}.lora_E": kept for p, kept in self.rank_pattern.items()} or None,
            "init_lora_weights": True,
            "use_rslora": False,
            **PEFT_FIXED_FIELDS,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> AdaLoRAConfig:
        _refuse_unsupported(d)
        if d.get("modules_to_save"):
            raise ValueError(
                "this AdaLoRA adapter uses modules_to_save, which lorakit's AdaLoRA does not support yet"
            )
        pattern = {
            _module_of(key): [bool(v) for v in kept] for key, kept in (d.get("rank_pattern") or {}).items()
        }
        return cls(
            target_rank=int(d.get("target_r", 8)),
            init_rank=int(d.get("init_r", 12)),
            alpha=d.get("lora_alpha", 8),
            dropout=float(d.get("lora_dropout", 0.0) or 0.0),
            target_modules=_targets_from_peft(d.get("target_modules")),
            exclude_modules=_targets_from_peft(d.get("exclude_modules")),
            t_init=d.get("tinit"),
            t_final=d.get("tfinal"),
            delta_t=d.get("deltaT"),
            total_steps=d.get("total_step"),
            beta1=float(d.get("beta1", 0.85)),
            beta2=float(d.get("beta2", 0.85)),
            orth_reg_weight=float(d.get("orth_reg_weight", 0.5)),
            rank_pattern=pattern,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_of(key: str) -> str:
    """PEFT's rank_pattern key ("<module>.lora_E", or "<module>.lora_E.<adapter>" while training)
    -> the module path."""
    head, sep, _ = key.rpartition(".lora_E")
    if not sep:
        raise ValueError(f"rank_pattern key {key!r} does not name a lora_E parameter")
    return head


class AdaLoRADelta(Delta):
    """The SVD-form branch of one linear layer (nn.Linear or GPT-2 Conv1D).

    `slots` are the indices (among init_rank) of the triplets this delta holds: all of them when
    built for training, the kept ones when built from a saved rank pattern. `mask` marks the
    triplets the last reallocation kept; the allocator zeroes E outside it.
    """

    roles: ClassVar[dict[str, Role]] = {"lora_A": Role.A, "lora_E": Role.SINGULAR, "lora_B": Role.B}
    peft_keys: ClassVar[dict[str, str]] = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}

    def __init__(
        self, layer: AdaptedLayer, slots: tuple[int, ...], init_rank: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        device, rank = layer.base_layer.weight.device, len(slots)
        self.slots, self.init_rank, self.scale = slots, init_rank, scale
        self.lora_A = nn.Parameter(torch.randn(rank, layer.in_features, device=device) * INIT_STD)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=device))
        self.lora_B = nn.Parameter(torch.randn(layer.out_features, rank, device=device) * INIT_STD)
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        h = F.linear(x, self.lora_A * self.lora_E)  # (..., r) = (A * E) x = diag(lambda) Q x
        return (F.linear(h, self.lora_B) * self.scale).to(base_out.dtype)  # (..., out) = s P h

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()))  # (out, in)

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """The kept triplets as a LoRA pair: A = s diag(E) Q (r, in), B = P (out, r)."""
        keep = self.mask
        return (self.scale * self.lora_A * self.lora_E)[keep].detach(), self.lora_B[:, keep].detach()

    def merged_weight(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight()

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        return weight - self.delta_weight()

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.mask[:, None], 0.0)

    def kept_slots(self) -> list[bool]:
        """The rank pattern: one entry per initial triplet, True where it is kept."""
        kept = [False] * self.init_rank
        for slot, keep in zip(self.slots, self.mask.tolist(), strict=True):
            kept[slot] = keep
        return kept

    def rank(self) -> int:
        return int(self.mask.sum())

    def export_state(self) -> dict[str, Tensor]:
        keep = self.mask
        return {
            "lora_A": self.lora_A.detach()[keep],
            "lora_E": self.lora_E.detach()[keep],
            "lora_B": self.lora_B.detach()[:, keep],
        }
