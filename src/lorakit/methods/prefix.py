"""Prefix tuning (Li & Liang, ACL 2021, arXiv 2101.00190) and P-tuning v2 (Liu et al., ACL 2022,
arXiv 2110.07602): trainable keys and values of n virtual tokens in every layer.

The prefix is (n, layers * 2 * kv_dim), laid out as PEFT lays out `prompt_embeddings` (GQA-aware:
kv_dim counts the key/value heads). The optional reparameterisation P = MLP(P') (tanh, one hidden
layer) is used while training; the saved file holds the resulting prefix only, as in the paper and
in PEFT. The hook of methods/kv_prefix.py puts it into the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.contract import Role
from ..core.model import attach_model_adapter
from .kv_prefix import KV, KVPrefixAdapter, check_init, check_peft_decoder_only, decoder_kv, decoder_of


class PrefixAdapter(KVPrefixAdapter):
    """Prefix tuning: trainable keys and values in every layer, optionally through an MLP."""

    method: ClassVar[str] = "prefix tuning"

    def __init__(self, config: PrefixTuningConfig, model: nn.Module) -> None:
        super().__init__(config, decoder_of(model).config, config.num_virtual_tokens)
        n, kv_dim = config.num_virtual_tokens, self.kv_heads * self.head_dim
        width = self.layers * 2 * kv_dim
        gen = torch.Generator().manual_seed(config.seed)
        if config.projection_size:
            self.prefix_tokens = nn.Parameter(torch.randn(n, kv_dim, generator=gen))  # P' (n, kv_dim)
            self.prefix_mlp = nn.Sequential(
                nn.Linear(kv_dim, config.projection_size), nn.Tanh(), nn.Linear(config.projection_size, width)
            )
        elif config.init_from == "vocab":
            self.__dict__["_decoder"] = decoder_of(model)
            ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, n), generator=gen)
            with torch.no_grad():
                kv = decoder_kv(self.decoder, input_ids=ids.to(model.get_input_embeddings().weight.device))
            self.prefix = nn.Parameter(self._flatten(kv).float())
        else:
            self.prefix = nn.Parameter(torch.randn(n, width, generator=gen))  # PEFT's N(0, 1)

    def _flatten(self, kv: KV) -> Tensor:
        """Per-layer (1, heads, n, hd) keys/values -> (n, layers * 2 * kv_dim), PEFT's layout."""
        stacked = torch.stack([t[0] for pair in kv for t in pair])  # (2L, heads, n, hd)
        return stacked.permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, -1)

    def prefix_values(self) -> Tensor:
        return self.prefix_mlp(self.prefix_tokens) if self.config.projection_size else self.prefix

    def prefix_kv(self, batch: int) -> KV:
        n = self.num_virtual_tokens
        p = self.prefix_values().view(n, 2 * self.layers, self.kv_heads, self.head_dim)
        p = p.permute(1, 2, 0, 3)[:, None]  # (2L, 1, heads, n, hd): layer l's key is 2l, value 2l+1
        return self._expand([(p[2 * i], p[2 * i + 1]) for i in range(self.layers)], batch)

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        if self.config.projection_size:
            return {Role.PROMPT: [self.prefix_tokens], Role.OTHER: list(self.prefix_mlp.parameters())}
        return {Role.PROMPT: [self.prefix]}

    def export_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.prefix_values().detach()}

    def import_state(self, state: dict[str, Tensor]) -> None:
        if self.config.projection_size:
            raise ValueError("a saved prefix is the MLP's output; load it with projection_size=0")
        with torch.no_grad():
            self.prefix.copy_(state["prompt_embeddings"])

    def to_peft_dict(self) -> dict[str, Any]:
        kv_dim = self.kv_heads * self.head_dim
        return {
            **self.peft_common(),
            "peft_type": "PREFIX_TUNING",
            "token_dim": kv_dim,
            "num_attention_heads": self.kv_heads,
            "encoder_hidden_size": self.config.projection_size or kv_dim,
            "prefix_projection": bool(self.config.projection_size),
            "init_weights": None,
        }


@dataclass
class PrefixTuningConfig:
    """Trainable keys/values of n virtual tokens in every layer. `projection_size` > 0 trains them
    through an MLP (kv_dim -> projection_size -> layers*2*kv_dim, tanh), as Li & Liang do. init_from
    (without the MLP): "vocab" (the keys/values the model computes for sampled vocabulary tokens,
    Li & Liang's real-activation init) or "random" (PEFT's N(0, 1))."""

    num_virtual_tokens: int = 20
    projection_size: int = 0
    init_from: str = "vocab"
    seed: int = 0

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    packing_problem: ClassVar[str | None] = (
        "its keys and values go before each row, so only a packed row's first sample would follow them"
    )
    default_lr: ClassVar[float] = 1e-2

    def __post_init__(self) -> None:
        check_init(self.num_virtual_tokens, self.init_from)
        if self.init_from == "text":
            raise ValueError(
                'prefix tuning initialises from "vocab" or "random"; "text" is for prompt tuning'
            )
        if self.projection_size < 0:
            raise ValueError(f"projection_size must be >= 0 (0 = no MLP), got {self.projection_size}")

    def apply_to(self, model: nn.Module, name: str) -> None:
        attach_model_adapter(model, self, PrefixAdapter(self, model), name)

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> PrefixTuningConfig:
        check_peft_decoder_only(d)  # with or without PEFT's MLP, the file holds the final prefix
        return cls(num_virtual_tokens=int(d["num_virtual_tokens"]), init_from="random")
