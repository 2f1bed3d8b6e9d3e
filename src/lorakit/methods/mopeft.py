"""A routed mixture of PEFT modules (MoPEFT, Sahay and Savakis 2024; MoLoRA, Zadouri et al. 2024;
UniPELT, Mao et al. 2022): several methods' modules on the same layers, each scaled per token by a
learned gate.

    y = W0 x + sum_e g_e(x) * delta_e(x)        g(x) = gate(R x + b), R = 0 and b = 0 at init

Every adapted layer holds its experts (LoRA and DoRA where `target_modules` says, bottleneck
adapters at `placement`: after o_proj and down_proj for "houlsby") and one router R, b over the
experts it holds, reading the layer's own input x. The gate of a token depends only on that token's
input, so it is causal and a KV cache stays valid: generation costs what the experts cost, once per
token (PEFT's X-LoRA runs the model twice per token and refuses the cache).

Gates (`gate`):
- "sigmoid" (default, UniPELT's): independent gates in (0, 1); each expert can switch on or off.
- "softmax": a softmax over the experts and a "null" slot of logit 0, so "no module" is expressible.
- "topk": the same softmax, then only the k largest slots kept (the null slot can be one of them),
  not renormalised; a Switch-style balancing loss alpha * S * sum_i f_i P_i (S slots, f_i the share
  of tokens that kept slot i, P_i its mean probability) is added per micro-batch with
  `balance_weight` (the trainer's `micro_batch_losses` hook, logged as `balance`).
  "softmax" gets the importance loss w * CV(sum_t p_t)^2 (Shazeer et al. 2017) instead.

At init every expert outputs zero (LoRA's B, DoRA's B, the adapter's up-projection are zero), so
the model is the base model exactly; the routers start at R = 0, b = 0 (sigmoid gates 0.5).
`pooling="sequence_mean"` averages each sequence's gates over its tokens, UniPELT's form: it lets
earlier tokens see later ones, and exists as the negative control of the causality test only.
A gated layer is not a fixed weight change, so merging is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, NotMergeableError, Role, TrainingHooks
from ..core.model import adapter_deltas
from ..core.target import TargetSpec, find_targets
from .adapter import AdapterConfig
from .dora import DoRAConfig
from .lora import LoRAConfig

EXPERTS = ("lora", "dora", "adapter")
GATES = ("sigmoid", "softmax", "topk")
POOLING = ("token", "sequence_mean")
NOT_EXPERTS = {
    "prefix": "prefix tuning acts on attention through the KV cache, not on a layer's output; a gated "
    "prefix branch is not built yet",
    "prompt": "prompt tuning adds input tokens, which a per-token gate cannot scale",
}


@dataclass
class MoPEFTConfig:
    """experts: a subset of "lora", "dora", "adapter" (a list or "lora,adapter"); rank, alpha and
    target_modules are the LoRA/DoRA experts'; size, placement and activation the bottleneck
    adapters'."""

    experts: Any = ("lora", "adapter")
    gate: str = "sigmoid"
    top_k: int = 1
    balance_weight: float = 0.01
    rank: int = 8
    alpha: float = 16.0
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    pooling: str = "token"
    _paths: dict[str, tuple[Any, set[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    peft_type: ClassVar[str] = "MOPEFT"  # lorakit's own: PEFT has no mixture of method types
    default_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        names = self.experts.split(",") if isinstance(self.experts, str) else list(self.experts)
        self.experts = tuple(n.strip() for n in names if n.strip())
        for name in self.experts:
            if name in NOT_EXPERTS:
                raise ValueError(f"{name} cannot be a mixture expert: {NOT_EXPERTS[name]}")
            if name not in EXPERTS:
                raise ValueError(f"unknown expert {name!r}; experts can be {', '.join(EXPERTS)}")
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts must name one or more different methods, got {self.experts}")
        if {"lora", "dora"} <= set(self.experts):
            raise ValueError("lora and dora would share the same layers; pick one of them")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.balance_weight < 0:
            raise ValueError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)}, got {self.pooling!r}")

    def expert_configs(self) -> dict[str, Any]:
        made = {
            "lora": lambda: LoRAConfig(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules),
            "dora": lambda: DoRAConfig(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules),
            "adapter": lambda: AdapterConfig(
                size=self.size, placement=self.placement, activation=self.activation
            ),
        }
        return {name: made[name]() for name in self.experts}

    def select_targets(self, model: nn.Module) -> list[str]:
        """Each expert's own targets (core.inject asks for them); the layers that get a mixture are
        their union, in model order."""
        self._paths = {
            name: (config, set(find_targets(model, config.target_modules, self.exclude_modules)))
            for name, config in self.expert_configs().items()
        }
        union = set().union(*(paths for _, paths in self._paths.values()))
        linear = find_targets(model, "all-linear")
        other = sorted(union - set(linear))
        if other:  # an embedding (or the head): the router reads the layer's input, not token ids
            raise ValueError(
                f"MoPEFT mixes experts on linear layers, whose input its per-token router reads; "
                f"{', '.join(other[:3])}{' ...' if len(other) > 3 else ''} {'is' if len(other) == 1 else 'are'} "
                "not one of them: remove it from --target-modules (or train it with --method lora)"
            )
        return [p for p in linear if p in union]

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        # each expert's own build refuses what it cannot sit beside (a bottleneck adapter: any other)
        here = {n: config.build(layer, path) for n, (config, paths) in self._paths.items() if path in paths}
        return MixtureDelta(layer, here, self)

    def training_hooks(self, model: nn.Module, adapter_name: str) -> TrainingHooks | None:
        if self.gate == "sigmoid" or self.balance_weight == 0:
            return None
        return _Balance(adapter_name, self.balance_weight)

    def to_peft_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "task_type": "CAUSAL_LM",
            "experts": list(self.experts),
            "gate": self.gate,
            "top_k": self.top_k,
            "balance_weight": self.balance_weight,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "adapter_size": self.size,
            "adapter_placement": self.placement,
            "adapter_activation": self.activation,
            "pooling": self.pooling,
            "format": "lorakit: per layer <expert>.<the expert's own keys>, router.weight (slots, in), router.bias",
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> MoPEFTConfig:
        targets = d.get("target_modules", "all-linear")
        return cls(
            experts=tuple(d["experts"]),
            gate=d.get("gate", "sigmoid"),
            top_k=int(d.get("top_k", 1)),
            balance_weight=float(d.get("balance_weight", 0.01)),
            rank=int(d["r"]),
            alpha=float(d["lora_alpha"]),
            target_modules=sorted(targets) if isinstance(targets, list) else targets,
            exclude_modules=d.get("exclude_modules"),
            size=int(d.get("adapter_size", 64)),
            placement=d.get("adapter_placement", "houlsby"),
            activation=d.get("adapter_activation", "relu"),
            pooling=d.get("pooling", "token"),
        )


class MixtureDelta(Delta):
    """One layer's experts and their router; see the module docstring."""

    mergeable: ClassVar[bool] = False

    @property
    def skips_parameters(self) -> bool:
        """Top-k routing leaves the experts no token picked without a gradient in that step (DDP
        must then look for unused parameters: train/distributed.py)."""
        return self.gate == "topk"

    def __init__(self, layer: AdaptedLayer, experts: dict[str, Delta], config: MoPEFTConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleDict(experts)
        self.gate, self.pooling = config.gate, config.pooling
        self.slots = len(experts) + (0 if config.gate == "sigmoid" else 1)  # + the null slot
        self.top_k = min(config.top_k, self.slots)
        device = layer.base_layer.weight.device
        self.router_weight = nn.Parameter(torch.zeros(self.slots, layer.in_features, device=device))
        self.router_bias = nn.Parameter(torch.zeros(self.slots, device=device))
        self.forced: dict[str, float] | None = None  # force_gates(): fixed gates, for analysis
        self.record: tuple[Tensor, Tensor] | None = None  # (probs, kept) of the last training forward
        # PiSSA-style base edits do not occur here, but follow the experts if one ever needs fp32
        self.keeps_base_precision = any(getattr(e, "keeps_base_precision", False) for e in experts.values())

    def gates(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., experts): each token's gate per expert."""
        logits = F.linear(x.to(self.router_weight.dtype), self.router_weight, self.router_bias).float()
        if self.gate == "sigmoid":
            probs = torch.sigmoid(logits)
            kept = torch.ones_like(probs)
        else:
            probs = torch.softmax(logits, dim=-1)
            kept = torch.ones_like(probs)
            if self.gate == "topk":
                kept = torch.zeros_like(probs).scatter_(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        gates = probs * kept
        if self.pooling == "sequence_mean" and gates.dim() == 3:  # UniPELT: not causal (see docstring)
            gates = gates.mean(dim=1, keepdim=True).expand_as(gates)
        if self.training and torch.is_grad_enabled():
            self.record = (probs, kept)
        return gates[..., : len(self.experts)]

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        if self.forced is not None:
            gates = torch.tensor([self.forced.get(n, 0.0) for n in self.experts], device=x.device)
            gates = gates.expand(*x.shape[:-1], -1)
        else:
            gates = self.gates(x)
        out = None
        for e, expert in enumerate(self.experts.values()):
            part = expert(x, base_out, layer) * gates[..., e : e + 1].to(base_out.dtype)
            out = part if out is None else out + part
        return out

    def prepare_compiled(self, layer: AdaptedLayer) -> None:
        for expert in self.experts.values():
            expert.prepare_compiled(layer)

    def finish_compiled(self) -> None:
        for expert in self.experts.values():
            expert.finish_compiled()

    def merged_weight(self, weight: Tensor) -> Tensor:
        raise NotMergeableError(
            "a routed mixture scales each expert per token, so it is not a fixed weight change and "
            "cannot be merged; force the gates (mopeft.force_gates) and merge the experts' own adapters"
        )

    def export_state(self) -> dict[str, Tensor]:
        state = {"router.weight": self.router_weight.detach(), "router.bias": self.router_bias.detach()}
        for name, expert in self.experts.items():
            state.update({f"{name}.{k}": v for k, v in expert.export_state().items()})
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.router_weight.copy_(state["router.weight"])
            self.router_bias.copy_(state["router.bias"])
        for name, expert in self.experts.items():
            expert.import_state(
                {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
            )

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        groups: dict[Role, list[nn.Parameter]] = {Role.GATE: [self.router_weight, self.router_bias]}
        for expert in self.experts.values():
            for role, params in expert.role_parameters().items():
                groups.setdefault(role, []).extend(params)
        return groups


def balance_loss(probs: Tensor, kept: Tensor, gate: str) -> Tensor:
    """The balancing term of one layer's routing, (..., S) probabilities and kept slots: Switch's
    S * sum_i f_i P_i for top-k (1 when uniform, S when one slot takes all), the squared coefficient of
    variation of the slots' summed probability for a dense softmax (0 when uniform)."""
    probs, kept = probs.reshape(-1, probs.shape[-1]), kept.reshape(-1, kept.shape[-1])
    if gate == "topk":
        return probs.shape[-1] * (kept.mean(0) * probs.mean(0)).sum()
    importance = probs.sum(0)
    return importance.var(unbiased=False) / importance.mean().square()


class _Balance(TrainingHooks):
    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight = name, weight

    def micro_batch_losses(self, model: nn.Module) -> dict[str, Tensor]:
        terms = []
        for _, _, delta in adapter_deltas(model, self.name):
            if isinstance(delta, MixtureDelta) and delta.record is not None:
                terms.append(balance_loss(*delta.record, delta.gate))
                delta.record = None
        return {"balance": self.weight * torch.stack(terms).mean()} if terms else {}


@contextmanager
def force_gates(model: nn.Module, gates: dict[str, float], adapter_name: str = "default"):
    """Fix every layer's gates of mixture `adapter_name` (e.g. {"lora": 1.0, "adapter": 0.0}) while
    the block runs: the mixture then computes exactly those experts at those scales."""
    deltas = [d for _, _, d in adapter_deltas(model, adapter_name) if isinstance(d, MixtureDelta)]
    if not deltas:
        raise KeyError(f"no mixture adapter named {adapter_name!r} on this model")
    unknown = set(gates) - set(deltas[0].experts) - {n for d in deltas for n in d.experts}
    if unknown:
        raise ValueError(f"no expert named {sorted(unknown)}; this mixture has {list(deltas[0].experts)}")
    for delta in deltas:
        delta.forced = dict(gates)
    try:
        yield
    finally:
        for delta in deltas:
            delta.forced = None


@torch.no_grad()
def gate_means(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, adapter_name: str = "default"
) -> dict[str, dict[str, float]]:
    """Mean gate per adapted layer and expert over the real tokens of a batch (the routing heatmap)."""
    deltas = {p: d for p, _, d in adapter_deltas(model, adapter_name) if isinstance(d, MixtureDelta)}
    seen: dict[str, Tensor] = {}
    handles = []
    for path, delta in deltas.items():

        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any, path: str = path) -> None:
            seen[path] = deltas[path].gates(args[0])

        handles.append(delta.register_forward_hook(record, with_kwargs=True))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    weight = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()[..., None]
    return {
        path: {
            name: float((seen[path][..., e : e + 1] * weight).sum() / weight.sum())
            for e, name in enumerate(deltas[path].experts)
        }
        for path in seen
    }
