"""Prompt tuning and prefix tuning (P-tuning v2): trainable virtual tokens, given to the model
through its key/value cache (transformers' `Cache`), so the caller's tensors keep their shapes.

Prompt tuning (Lester, Al-Rfou, Constant, EMNLP 2021, arXiv 2104.08691) prepends n trainable
embeddings P (n, d) to the input embeddings: the model reads [P; E(x)] at positions 0..n+T-1. Under
causal attention the n virtual positions attend only to each other, so their keys and values in
every layer are exactly what the model computes on P alone. lorakit computes them once per forward
(one row, expanded to the batch; the concatenation costs batch x n token-forwards) and hands them
to the model as a cache prefix of length n. The outputs are the real positions' outputs of the
concatenated sequence, equal to PEFT's logits[:, n:] and with PEFT's loss (its labels are shifted
by n masked positions; here the virtual positions never reach the output, so labels need no
shift). The attention mask gets n leading ones and the real tokens' positions start at n.

Prefix tuning (Li & Liang, ACL 2021, arXiv 2101.00190; P-tuning v2, Liu et al., ACL 2022, arXiv
2110.07602) trains the per-layer keys and values directly: prefix (n, layers * 2 * kv_dim), laid out
as PEFT lays out `prompt_embeddings`. The optional reparameterisation P = MLP(P') (tanh, one hidden
layer) is used while training; the saved file holds the resulting prefix only, as in the paper.

Both work with `generate()` and any decode loop: the hook fills an empty cache with the prefix,
leaves a cache it already filled alone, widens the attention mask by n and shifts given
`position_ids` by n. Transformers drops `past_key_values` under gradient checkpointing, so training
with it is refused (PEFT refuses it too).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..core.contract import ModelAdapter, NotMergeableError, Role
from ..core.model import attach_model_adapter, model_adapters

INITS = ("vocab", "text", "random")
PEFT_INITS = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}
KV = list[tuple[Tensor, Tensor]]  # per layer: key, value (batch, kv_heads, n, head_dim)


def _decoder(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is model or not hasattr(decoder, "config"):
        raise TypeError(
            f"prompt and prefix tuning need a Hugging Face *ForCausalLM model (its decoder takes "
            f"past_key_values); {type(model).__name__} has no base_model decoder"
        )
    return decoder


def _dims(config: Any) -> tuple[int, int, int, int]:
    """(layers, hidden size, kv heads, head dim) of a decoder config (GQA-aware)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, head_dim


def decoder_kv(decoder: nn.Module, **inputs: Tensor) -> KV:
    """Every layer's keys and values for one sequence (`input_ids` or `inputs_embeds`)."""
    out = decoder(**inputs, use_cache=True, past_key_values=DynamicCache(config=decoder.config))
    return [(k, v) for k, v, *_ in out.past_key_values]


class KVPrefixAdapter(ModelAdapter):
    """A per-layer key/value prefix of `num_virtual_tokens`, put into the decoder's cache."""

    method: ClassVar[str] = "prompt/prefix tuning"

    def __init__(self, config: Any, model_config: Any, num_virtual_tokens: int) -> None:
        super().__init__()
        self.config, self.num_virtual_tokens = config, num_virtual_tokens
        self.layers, self.hidden, self.kv_heads, self.head_dim = _dims(model_config)
        self._handle: Any = None
        self._busy = False  # set while the prefix itself runs through the decoder (prompt tuning)

    def prefix_kv(self, batch: int) -> KV:
        raise NotImplementedError

    def merge_error(self) -> NotMergeableError:
        return NotMergeableError(
            f"{self.method} cannot be merged: its virtual tokens are extra keys and values in every "
            "layer, not a change of the weights, so the model keeps computing them (generation pays "
            f"for {self.num_virtual_tokens} more cached positions); lorakit.disable_adapters gives the base"
        )

    @property
    def decoder(self) -> nn.Module:
        return self.__dict__["_decoder"]  # kept out of the module tree: the model owns it

    def attach(self, model: nn.Module) -> None:
        others = [n for n, a in model_adapters(model) if isinstance(a, KVPrefixAdapter) and a is not self]
        if others:
            raise ValueError(
                f"this model already holds the prompt/prefix adapter {others[0]!r}; both would claim "
                "the start of the key/value cache. Delete it first (lorakit.delete_adapter)"
            )
        self.__dict__["_decoder"] = decoder = _decoder(model)
        self._signature = inspect.signature(decoder.forward)
        self._handle = decoder.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def detach(self, model: nn.Module, keep_changes: bool) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._busy or not (self.active and self.enabled):
            return None
        kwargs = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
        x = kwargs.get("input_ids")
        batch, length = (x if x is not None else kwargs["inputs_embeds"]).shape[:2]
        n = self.num_virtual_tokens
        cache = kwargs.get("past_key_values")
        if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
            raise ValueError(
                f"{type(self.config).__name__} passes its prefix through the key/value cache, which "
                "transformers drops under gradient checkpointing; train with gradient_checkpointing off"
            )
        if cache is None or cache.get_seq_length() == 0:
            cache = cache if cache is not None else DynamicCache(config=module.config)
            for layer, (k, v) in enumerate(self.prefix_kv(batch)):
                cache.update(k, v, layer)
            cache.lorakit_prefix = id(self)
        elif getattr(cache, "lorakit_prefix", None) != id(self):
            raise ValueError(
                "past_key_values was filled without this prompt/prefix adapter (by the base model or "
                "another adapter); start generation from an empty cache with the adapter active"
            )
        kwargs["past_key_values"] = cache
        kwargs["attention_mask"] = self._widen_mask(kwargs.get("attention_mask"), batch, length, cache)
        if kwargs.get("position_ids") is not None:  # callers count positions without the prefix
            kwargs["position_ids"] = kwargs["position_ids"] + n
        return (), kwargs

    def _widen_mask(self, mask: Tensor | None, batch: int, length: int, cache: Any) -> Tensor | None:
        """(batch, seen - n + length) -> (batch, seen + length): the prefix is always attended."""
        if mask is None:
            return None
        seen, n = cache.get_seq_length(), self.num_virtual_tokens
        if mask.dim() == 2 and mask.shape[1] == seen + length - n:
            return torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if mask.dim() == 2 and mask.shape[1] == seen + length:
            return mask
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not fit {length} new tokens after "
            f"{seen - n} cached ones (plus {n} virtual tokens); pass a 2-D (batch, length) mask"
        )

    def _expand(self, kv: KV, batch: int) -> KV:
        dtype = next(self.decoder.parameters()).dtype
        return [(k.to(dtype).expand(batch, -1, -1, -1), v.to(dtype).expand(batch, -1, -1, -1)) for k, v in kv]

    def _peft_common(self) -> dict[str, Any]:
        return {
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_layers": self.layers,
            "num_transformer_submodules": 1,
            "inference_mode": True,
            "base_model_name_or_path": None,
            "revision": None,
            "modules_to_save": None,
        }


class PromptAdapter(KVPrefixAdapter):
    """Prompt tuning: n trainable input embeddings, run through the frozen decoder for their K/V."""

    method: ClassVar[str] = "prompt tuning"

    def __init__(self, config: PromptTuningConfig, model: nn.Module) -> None:
        super().__init__(config, _decoder(model).config, config.num_virtual_tokens)
        embedding = model.get_input_embeddings().weight.detach()  # (vocab, d)
        self.prompt_embeddings = nn.Parameter(config.initial_prompt(embedding).float().clone())  # (n, d)

    def prefix_kv(self, batch: int) -> KV:
        embeds = self.prompt_embeddings[None].to(next(self.decoder.parameters()).dtype)  # (1, n, d)
        self._busy = True
        try:
            return self._expand(decoder_kv(self.decoder, inputs_embeds=embeds), batch)
        finally:
            self._busy = False

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        return {Role.PROMPT: [self.prompt_embeddings]}

    def export_state(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings.detach()}

    def to_peft_dict(self) -> dict[str, Any]:
        tokenizer = self.config.tokenizer
        return {
            **self._peft_common(),
            "peft_type": "PROMPT_TUNING",
            "token_dim": self.hidden,
            "num_attention_heads": self.decoder.config.num_attention_heads,
            "prompt_tuning_init": PEFT_INITS[self.config.init_from],
            "prompt_tuning_init_text": self.config.init_text,
            "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) or None,
            "tokenizer_kwargs": None,
        }


class PrefixAdapter(KVPrefixAdapter):
    """Prefix tuning: trainable keys and values in every layer, optionally through an MLP."""

    method: ClassVar[str] = "prefix tuning"

    def __init__(self, config: PrefixTuningConfig, model: nn.Module) -> None:
        super().__init__(config, _decoder(model).config, config.num_virtual_tokens)
        n, kv_dim = config.num_virtual_tokens, self.kv_heads * self.head_dim
        width = self.layers * 2 * kv_dim
        gen = torch.Generator().manual_seed(config.seed)
        if config.projection_size:
            self.prefix_tokens = nn.Parameter(torch.randn(n, kv_dim, generator=gen))  # P' (n, kv_dim)
            self.prefix_mlp = nn.Sequential(
                nn.Linear(kv_dim, config.projection_size), nn.Tanh(), nn.Linear(config.projection_size, width)
            )
        elif config.init_from == "vocab":
            self.__dict__["_decoder"] = _decoder(model)
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
            **self._peft_common(),
            "peft_type": "PREFIX_TUNING",
            "token_dim": kv_dim,
            "num_attention_heads": self.kv_heads,
            "encoder_hidden_size": self.config.projection_size or kv_dim,
            "prefix_projection": bool(self.config.projection_size),
            "init_weights": None,
        }


@dataclass
class PromptTuningConfig:
    """n virtual tokens before the input. init_from: "vocab" (embeddings of sampled vocabulary tokens,
    Lester et al.'s better-than-random choice), "text" (the embeddings of `init_text`, cycled or
    cut to n tokens; needs `tokenizer`), or "random" (PEFT's default, N(0, 1))."""

    num_virtual_tokens: int = 20
    init_from: str = "vocab"
    init_text: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    seed: int = 0

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    default_lr: ClassVar[float] = 3e-2  # prompts need a far larger lr than LoRA (Lester: 0.3, Adafactor)

    def __post_init__(self) -> None:
        _check_common(self.num_virtual_tokens, self.init_from)
        if self.init_from == "text" and (not self.init_text or self.tokenizer is None):
            raise ValueError('init_from="text" needs init_text and the tokenizer that encodes it')

    def initial_prompt(self, embedding: Tensor) -> Tensor:
        n, gen = self.num_virtual_tokens, torch.Generator().manual_seed(self.seed)
        if self.init_from == "random":
            return torch.randn(n, embedding.shape[1], generator=gen)
        if self.init_from == "text":
            ids = self.tokenizer(self.init_text, add_special_tokens=False)["input_ids"]
            ids = (ids * (n // len(ids) + 1))[:n]  # PEFT's rule: repeat the text, then cut
        else:
            ids = torch.randint(0, embedding.shape[0], (n,), generator=gen).tolist()
        return embedding[torch.tensor(ids, device=embedding.device)]

    def apply_to(self, model: nn.Module, name: str) -> None:
        attach_model_adapter(model, self, PromptAdapter(self, model), name)

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> PromptTuningConfig:
        _check_peft_common(d)
        return cls(num_virtual_tokens=int(d["num_virtual_tokens"]), init_from="random")


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
    default_lr: ClassVar[float] = 1e-2

    def __post_init__(self) -> None:
        _check_common(self.num_virtual_tokens, self.init_from)
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
        _check_peft_common(d)  # with or without PEFT's MLP, the file holds the final prefix
        return cls(num_virtual_tokens=int(d["num_virtual_tokens"]), init_from="random")


def _check_common(num_virtual_tokens: int, init: str) -> None:
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens}")
    if init not in INITS:
        raise ValueError(f"init_from must be one of {INITS}, got {init!r}")


def _check_peft_common(d: dict[str, Any]) -> None:
    if d.get("num_transformer_submodules") not in (None, 1) or d.get("task_type") == "SEQ_2_SEQ_LM":
        raise ValueError(
            "this prompt-learning adapter is for an encoder-decoder model; lorakit reads decoder-only ones"
        )
