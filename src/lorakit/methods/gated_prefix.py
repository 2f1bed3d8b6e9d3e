"""The gated prefix expert of a routed mixture (methods/mopeft.py): a separate attention branch over
n trainable key/value slots per layer, added to the attention output before o_proj, scaled per
token by a gate and per head by a zero-initialised factor (LLaMA-Adapter's zero-init attention,
Zhang et al. 2023; later-methods.md section 4.3):

    o_t = attention(q_t, K, V) + beta * g(v_t) * softmax(q_t P_K^T * scale) P_V         out = o_proj(o_t)

- A separate branch, not UniPELT's keys concatenated into the softmax: the base attention's
  probabilities are untouched, so beta = 0 is exactly the base model, and the token positions stay
  where they are (a prefix in the cache would shift them by n).
- The gate reads the token's own value vector v_t (W_v h_t: the layer input projected, before any
  position rotation), the one per-token input an attention function receives besides the query,
  which carries its position. It is causal, and with a KV cache the new tokens' values are the last
  ones, so cached decoding equals a full forward and costs O(n) per token.
- Where it lives: the expert's tensors (P_K, P_V per key/value head, beta per query head, the
  gate's router) are a delta on the attention's o_proj, so saving, loading, parameter groups,
  checkpoints and deletion are the layer contract's; that delta adds nothing at o_proj itself. Its
  branch enters through the attention function registered here as "lorakit_mopeft", which calls the
  model's own attention implementation first (kept in the config as `lorakit_inner_attention`, which
  the trainer's CPU set-up switches to its own kernel as it would the model's: train/fast.py).
- A forward where the branch did not run while the expert is on (something set another attention
  implementation after the mixture was applied) raises instead of silently computing without it.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.contract import AdaptedLayer, Delta, Role
from ..train.attention import INNER, register_attention

NAME = "lorakit_mopeft"


class GatedPrefixDelta(Delta):
    """One attention layer's prefix expert. `route` is the owning mixture's gate function."""

    roles: ClassVar[dict[str, Role]] = {
        "prefix_key": Role.PROMPT,
        "prefix_value": Role.PROMPT,
        "scale": Role.GATE,
    }
    peft_keys: ClassVar[dict[str, str]] = {
        "prefix_key": "prefix_key",
        "prefix_value": "prefix_value",
        "scale": "scale",
        "router_weight": "router.weight",
        "router_bias": "router.bias",
    }
    mergeable: ClassVar[bool] = False

    def __init__(self, key: Tensor, value: Tensor, heads: int, slots: int) -> None:
        super().__init__()
        kv_heads, _, head_dim = key.shape
        self.prefix_key = nn.Parameter(key.clone())  # (kv_heads, n, head_dim)
        self.prefix_value = nn.Parameter(value.clone())
        self.scale = nn.Parameter(torch.zeros(heads, device=key.device))  # beta, per query head
        self.router_weight = nn.Parameter(torch.zeros(slots, kv_heads * head_dim, device=key.device))
        self.router_bias = nn.Parameter(torch.zeros(slots, device=key.device))
        self.ran = False  # set by the attention function, checked by the o_proj forward that follows
        self.seen: Tensor | None = None  # the last gates, while mopeft.gate_means records them
        self.record: tuple[Tensor, Tensor] | None = None  # (probs, kept) for the balancing loss

    def branch(
        self, query: Tensor, new_values: Tensor, scaling: float | None, route: Any, weight: float
    ) -> Tensor:
        """(B, H, N, D) queries and (B, KV, N, D) values of the same tokens -> (B, N, H, D)."""
        b, heads, n, d = query.shape
        kv_heads = self.prefix_key.shape[0]
        tokens = new_values.transpose(1, 2).reshape(b, n, kv_heads * d)
        gate = route(self, tokens)[..., 0]  # (B, N)
        if self.seen is not None:
            self.seen = gate.detach()  # (B, N)
        keys = self.prefix_key.repeat_interleave(heads // kv_heads, dim=0)  # (H, n, D)
        values = self.prefix_value.repeat_interleave(heads // kv_heads, dim=0)
        scale = d**-0.5 if scaling is None else scaling
        probs = torch.softmax(torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale, dim=-1)
        out = torch.matmul(probs.to(values.dtype), values)  # (B, H, N, D)
        factor = self.scale.view(1, heads, 1, 1) * gate[:, None, :, None] * weight
        if not torch.compiler.is_compiling():
            self.ran = True
        return (out * factor.to(out.dtype)).transpose(1, 2)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        raise RuntimeError("the gated prefix expert acts inside attention, not on o_proj's output")


def live_prefixes(attention: nn.Module) -> list[tuple[Any, float]]:
    """(mixture, output weight) for each active mixture holding a prefix expert on this attention."""
    layer = getattr(attention, "o_proj", None)
    if not isinstance(layer, AdaptedLayer) or not layer.enabled:
        return []
    deltas = layer.adapters
    return [
        (deltas[name], layer.weights.get(name, 1.0))
        for name in layer.active
        if name not in layer.merged and getattr(deltas[name], "prefix", None) is not None
    ]


def _inner(module: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module.config, INNER, None) or "sdpa"
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    """The model's own attention, plus every live mixture's gated prefix branch."""
    out, weights = _inner(module)(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    n = query.shape[2]
    for mixture, weight in live_prefixes(module):
        out = out + mixture.prefix.branch(query, value[:, :, -n:], scaling, mixture.prefix_gates, weight).to(
            out.dtype
        )
    return out, weights


def use_gated_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through this module's function (idempotent)."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return
    setattr(config, INNER, current)
    model.set_attn_implementation(register_attention(NAME, attention_forward))


def prefix_init(model: nn.Module, n: int) -> dict[int, tuple[Tensor, Tensor]]:
    """Layer index -> (keys, values) (kv_heads, n, head_dim) of n random vocabulary tokens run through
    the base model: slots at the scale of real keys and values (prefix tuning's "vocab" init)."""
    from .kv_prefix import decoder_kv, decoder_of

    decoder = decoder_of(model)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, n))
    device = next(model.parameters()).device
    with torch.no_grad():
        kv = decoder_kv(decoder, input_ids=ids.to(device))
    return {i: (k[0].float(), v[0].float()) for i, (k, v) in enumerate(kv)}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Path of each attention module's o_proj -> the attention module (Llama-style layers)."""
    found = {
        f"{path}.o_proj": module
        for path, module in model.named_modules()
        if hasattr(module, "o_proj") and isinstance(getattr(module, "layer_idx", None), int)
    }
    if not found:
        raise ValueError(
            f"the gated prefix expert needs Llama-style attention modules (with o_proj and a layer "
            f"index); {type(model).__name__} has none: mix lora, dora or adapter experts instead"
        )
    return found
