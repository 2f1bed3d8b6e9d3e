"""A routed mixture of PEFT modules (MoPEFT, Sahay and Savakis 2024; MoLoRA, Zadouri et al. 2024;
UniPELT, Mao et al. 2022): several methods' modules on the same layers, each scaled per token by a
learned gate.

    y = W0 x + sum_e g_e(x) * delta_e(x)        g(x) = gate(R x + b), R = 0 and b = 0 at init

Every adapted layer holds its experts (LoRA and DoRA where `target_modules` says, bottleneck
adapters at `placement`: after o_proj and down_proj for "houlsby") and one router R, b over the
experts it holds, reading the layer's own input x. The prefix expert (methods/gated_prefix.py) is a
gated attention branch over trainable key/value slots; its tensors sit on each attention's o_proj
with a router of their own reading the token's value vector (its gate is needed inside attention,
before o_proj's input exists). The gate of a token depends only on that token's
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
from ..core.model import adapter_deltas, delete_adapter, inject
from ..core.target import TargetSpec, find_targets
from .adapter import AdapterConfig
from .dora import DoRAConfig
from .gated_prefix import GatedPrefixDelta, attention_modules, prefix_init, use_gated_prefix_attention
from .lora import LoRAConfig

EXPERTS = ("lora", "dora", "adapter", "prefix")
GATES = ("sigmoid", "softmax", "topk")
POOLING = ("token", "sequence_mean")
NOT_EXPERTS = {
    "prompt": "prompt tuning adds input tokens, which a per-token gate cannot scale",
}


@dataclass
class MoPEFTConfig:
    """experts: a subset of "lora", "dora", "adapter", "prefix" (a list or "lora,adapter"); rank, alpha
    and target_modules are the LoRA/DoRA experts'; size, placement and activation the bottleneck
    adapters'; num_virtual_tokens the prefix expert's key/value slots per layer."""

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
    num_virtual_tokens: int = 20
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
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")

    def expert_configs(self) -> dict[str, Any]:
        made = {
            "lora": lambda: LoRAConfig(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules),
            "dora": lambda: DoRAConfig(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules),
            "adapter": lambda: AdapterConfig(
                size=self.size, placement=self.placement, activation=self.activation
            ),
        }
        return {name: made[name]() for name in self.experts if name != "prefix"}

    def apply_to(self, model: nn.Module, adapter_name: str) -> None:
        """Inject the mixture; with a prefix expert, route attention through its branch too."""
        inject(model, self, adapter_name)
        if "prefix" in self.experts:
            try:
                use_gated_prefix_attention(model)
            except Exception:
                delete_adapter(model, adapter_name)
                raise

    def select_targets(self, model: nn.Module) -> list[str]:
        """Each expert's own targets (core.inject asks for them); the layers that get a mixture are
        their union, in model order. The prefix expert's are the attention modules' o_proj."""
        self._paths = {
            name: (config, set(find_targets(model, config.target_modules, self.exclude_modules)))
            for name, config in self.expert_configs().items()
        }
        if "prefix" in self.experts:
            attentions = attention_modules(model)
            self._paths["prefix"] = (_PrefixExpert(self, model, attentions), set(attentions))
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
            "num_virtual_tokens": self.num_virtual_tokens,
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
            "format": "lorakit: per layer <expert>.<the expert's own keys>, router.weight (slots, in), "
            "router.bias; the prefix expert's on o_proj: prefix.prefix_key/prefix_value (kv heads, n, "
            "head dim), prefix.scale (heads), prefix.router.weight (slots, kv heads * head dim)",
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
            num_virtual_tokens=int(d.get("num_virtual_tokens", 20)),
        )


class _PrefixExpert:
    """Builds the gated prefix expert of each attention's o_proj (slots from the base model's keys and
    values of random vocabulary tokens)."""

    def __init__(self, config: MoPEFTConfig, model: nn.Module, attentions: dict[str, nn.Module]) -> None:
        self.attentions, self.inits = attentions, prefix_init(model, config.num_virtual_tokens)
        self.slots = 1 if config.gate == "sigmoid" else 2  # the prefix (and the null slot)

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        attention = self.attentions[path]
        key, value = self.inits[attention.layer_idx]
        heads = attention.config.num_attention_heads
        device = layer.base_layer.weight.device
        return GatedPrefixDelta(key.to(device), value.to(device), heads, self.slots)


class MixtureDelta(Delta):
    """One layer's experts and their router; see the module docstring. On an attention's o_proj it
    may also hold the prefix expert (`prefix`), whose branch the attention function adds."""

    mergeable: ClassVar[bool] = False

    @property
    def skips_parameters(self) -> bool:
        """Top-k routing leaves the experts no token picked without a gradient in that step (DDP
        must then look for unused parameters: train/distributed.py)."""
        return self.gate == "topk"

    def __init__(self, layer: AdaptedLayer, experts: dict[str, Delta], config: MoPEFTConfig) -> None:
        super().__init__()
        experts = dict(experts)
        self.prefix: GatedPrefixDelta | None = experts.pop("prefix", None)
        self.experts = nn.ModuleDict(experts)  # the experts acting on this layer's output
        self.gate, self.pooling = config.gate, config.pooling
        self.slots = len(experts) + (0 if config.gate == "sigmoid" else 1)  # + the null slot
        self.top_k = config.top_k
        device = layer.base_layer.weight.device
        if experts:
            self.router_weight = nn.Parameter(torch.zeros(self.slots, layer.in_features, device=device))
            self.router_bias = nn.Parameter(torch.zeros(self.slots, device=device))
        self.forced: dict[str, float] | None = None  # force_gates(): fixed gates, for analysis
        self.record: tuple[Tensor, Tensor] | None = None  # (probs, kept) of the last training forward
        self.seen: Tensor | None = None  # the last gates, while gate_means records them
        # PiSSA-style base edits do not occur here, but follow the experts if one ever needs fp32
        self.keeps_base_precision = any(getattr(e, "keeps_base_precision", False) for e in experts.values())

    @property
    def names(self) -> list[str]:
        """Every expert of this layer, the prefix included."""
        return [*self.experts, *(["prefix"] if self.prefix is not None else [])]

    def _route(self, x: Tensor, weight: Tensor, bias: Tensor, owner: Any) -> Tensor:
        """Router input (..., in) -> gates (..., slots); in training, `owner.record` gets the
        (probabilities, kept slots) a balancing loss needs (none for independent sigmoid gates)."""
        logits = F.linear(_router_input(x, weight), weight, bias).float()
        if self.gate == "sigmoid":  # independent gates: nothing to keep or balance
            gates = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
            kept = torch.ones_like(probs)
            if self.gate == "topk":
                k = min(self.top_k, probs.shape[-1])
                kept = torch.zeros_like(probs).scatter_(-1, probs.topk(k, dim=-1).indices, 1.0)
            gates = probs * kept
            if self.training and torch.is_grad_enabled():
                owner.record = (probs, kept)
        if self.pooling == "sequence_mean" and gates.dim() == 3:  # UniPELT: not causal (see docstring)
            gates = gates.mean(dim=1, keepdim=True).expand_as(gates)
        return gates

    def gates(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., experts): each token's gate per expert acting on this layer's output."""
        gates = self._route(x, self.router_weight, self.router_bias, self)[..., : len(self.experts)]
        if self.seen is not None:
            self.seen = gates
        return gates

    def prefix_gates(self, prefix: GatedPrefixDelta, tokens: Tensor) -> Tensor:
        """(B, N, kv heads * head dim) value vectors -> (B, N, 1) gates of the prefix expert."""
        if self.forced is not None:
            return tokens.new_full((*tokens.shape[:-1], 1), self.forced.get("prefix", 0.0))
        return self._route(tokens, prefix.router_weight, prefix.router_bias, prefix)[..., :1]

    def _check_prefix_ran(self) -> None:
        prefix = self.prefix
        if prefix is None or torch.compiler.is_compiling():
            return
        if not prefix.ran:
            raise RuntimeError(
                "this mixture's prefix expert did not run: the model's attention implementation was "
                "changed after the mixture was applied; call "
                "lorakit.methods.gated_prefix.use_gated_prefix_attention(model) again"
            )
        prefix.ran = False

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        self._check_prefix_ran()
        if not self.experts:
            return torch.zeros_like(base_out)
        if self.forced is not None:
            gates = torch.tensor([self.forced.get(n, 0.0) for n in self.experts], device=x.device)
            gates = gates.expand(*x.shape[:-1], -1)
        else:
            gates = self.gates(x)
        out = None
        for e, expert in enumerate(self.experts.values()):
            part = expert.gated(x, base_out, layer, gates[..., e : e + 1])
            out = part if out is None else out + part
        return out

    def add_to(self, out: Tensor, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        if not self.experts:  # the prefix expert alone: its branch was added inside attention
            self._check_prefix_ran()
            return out
        return out + self(x, base_out, layer)

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
        state = {}
        if self.experts:
            state = {"router.weight": self.router_weight.detach(), "router.bias": self.router_bias.detach()}
        for name, expert in self._all_experts():
            state.update({f"{name}.{k}": v for k, v in expert.export_state().items()})
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        if self.experts:
            with torch.no_grad():
                self.router_weight.copy_(state["router.weight"])
                self.router_bias.copy_(state["router.bias"])
        for name, expert in self._all_experts():
            expert.import_state(
                {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
            )

    def _all_experts(self) -> list[tuple[str, Delta]]:
        return [*self.experts.items(), *([("prefix", self.prefix)] if self.prefix is not None else [])]

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        groups: dict[Role, list[nn.Parameter]] = {}
        if self.experts:
            groups[Role.GATE] = [self.router_weight, self.router_bias]
        if self.prefix is not None:
            groups.setdefault(Role.GATE, []).extend([self.prefix.router_weight, self.prefix.router_bias])
        for _, expert in self._all_experts():
            for role, params in expert.role_parameters().items():
                groups.setdefault(role, []).extend(params)
        return groups


def _router_input(x: Tensor, weight: Tensor) -> Tensor:
    """x as the router's matmul takes it: under autocast as it is (the matmul casts both sides), else
    in the router's dtype."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype == weight.dtype:
        return x
    return x.to(weight.dtype)


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
            if not isinstance(delta, MixtureDelta):
                continue
            for owner in (delta, delta.prefix):
                if owner is not None and getattr(owner, "record", None) is not None:
                    terms.append(balance_loss(*owner.record, delta.gate))
                    owner.record = None
        return {"balance": self.weight * torch.stack(terms).mean()} if terms else {}


@contextmanager
def force_gates(model: nn.Module, gates: dict[str, float], adapter_name: str = "default"):
    """Fix every layer's gates of mixture `adapter_name` (e.g. {"lora": 1.0, "adapter": 0.0}) while
    the block runs: the mixture then computes exactly those experts at those scales."""
    deltas = [d for _, _, d in adapter_deltas(model, adapter_name) if isinstance(d, MixtureDelta)]
    if not deltas:
        raise KeyError(f"no mixture adapter named {adapter_name!r} on this model")
    known = {n for d in deltas for n in d.names}
    unknown = set(gates) - known
    if unknown:
        raise ValueError(f"no expert named {sorted(unknown)}; this mixture has {sorted(known)}")
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
    """Mean gate per adapted layer and expert over the real tokens of a batch (the routing heatmap):
    the gates the forward itself computed, recorded as it goes."""
    deltas = {p: d for p, _, d in adapter_deltas(model, adapter_name) if isinstance(d, MixtureDelta)}
    owners = [o for d in deltas.values() for o in (d if d.experts else None, d.prefix) if o is not None]
    for owner in owners:
        owner.seen = WATCH
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
        weight = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).float()[
            ..., None
        ]

        def mean(gates: Tensor, e: int) -> float:
            if gates is WATCH:
                raise RuntimeError("a mixture layer did not run in this forward")
            gates = gates[..., None] if gates.dim() == 2 else gates  # the prefix's (B, N)
            return float((gates[..., e : e + 1].float() * weight).sum() / weight.sum())

        return {
            path: {
                **{name: mean(d.seen, e) for e, name in enumerate(d.experts)},
                **({"prefix": mean(d.prefix.seen, 0)} if d.prefix is not None else {}),
            }
            for path, d in deltas.items()
        }
    finally:
        for owner in owners:
            owner.seen = None


WATCH = torch.empty(0)  # `seen` while gate_means records: the next forward's gates replace it
