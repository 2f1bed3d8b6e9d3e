"""The machinery prompt and prefix tuning share: a key/value prefix of n virtual tokens that a
forward pre-hook on the decoder puts into transformers' `Cache`, so the caller's tensors keep their
shapes and `generate()` works unchanged (methods/prompt.py and methods/prefix.py say what fills it).

The hook fills an empty cache with the prefix, leaves a cache it already filled alone (decode steps),
widens the attention mask by n leading ones and shifts given `position_ids` by n, so the real tokens
sit at positions n.., as if n tokens came before them. The cache goes in under the name the decoder's
own forward declares (`cache` from transformers 5.24, `past_key_values` before: core/kvcache.py).
Transformers drops the cache under gradient checkpointing, so training with it is refused (PEFT
refuses it too).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..core.contract import ModelAdapter, NotMergeableError
from ..core.kvcache import CACHE_ARGUMENTS, cache_argument, output_cache
from ..core.model import model_adapters

INITS = ("vocab", "text", "random")
KV = list[tuple[Tensor, Tensor]]  # per layer: key, value (batch, kv_heads, n, head_dim)


def decoder_of(model: nn.Module) -> nn.Module:
    decoder = getattr(model, "base_model", None)
    if not isinstance(decoder, nn.Module) or decoder is model or not hasattr(decoder, "config"):
        raise TypeError(
            f"prompt and prefix tuning need a Hugging Face *ForCausalLM model (its decoder takes "
            f"past_key_values); {type(model).__name__} has no base_model decoder"
        )
    return decoder


def decoder_dims(config: Any) -> tuple[int, int, int, int]:
    """(layers, hidden size, kv heads, head dim) of a decoder config (GQA-aware)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, head_dim


def decoder_kv(decoder: nn.Module, **inputs: Tensor) -> KV:
    """Every layer's keys and values for one sequence (`input_ids` or `inputs_embeds`)."""
    cache = DynamicCache(config=decoder.config)
    out = decoder(**inputs, use_cache=True, **{cache_argument(decoder): cache})
    return [(layer.keys, layer.values) for layer in output_cache(out).layers]


class KVPrefixAdapter(ModelAdapter):
    """A per-layer key/value prefix of `num_virtual_tokens`, put into the decoder's cache."""

    method: ClassVar[str] = "prompt/prefix tuning"

    def __init__(self, config: Any, model_config: Any, num_virtual_tokens: int) -> None:
        super().__init__()
        self.config, self.num_virtual_tokens = config, num_virtual_tokens
        self.layers, self.hidden, self.kv_heads, self.head_dim = decoder_dims(model_config)
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
        self.__dict__["_decoder"] = decoder = decoder_of(model)
        self._signature = inspect.signature(decoder.forward)
        self._cache_name = cache_argument(decoder)
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
        if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
            raise ValueError(
                f"{type(self.config).__name__} passes its prefix through the key/value cache, which "
                "transformers drops under gradient checkpointing; train with gradient_checkpointing off"
            )
        given = [kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs]  # either spelling
        cache = self._cache_with_prefix(next((c for c in given if c is not None), None), batch, module)
        kwargs[self._cache_name] = cache
        kwargs["attention_mask"] = self._widen_mask(kwargs.get("attention_mask"), batch, length, cache)
        if kwargs.get("position_ids") is not None:  # callers count positions without the prefix
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens
        return (), kwargs

    def _cache_with_prefix(self, cache: Any, batch: int, decoder: nn.Module) -> DynamicCache:
        """An empty (or no) cache gets the prefix; a cache this adapter filled is passed through."""
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"prompt/prefix tuning puts its prefix into a DynamicCache; got {type(cache).__name__} "
                "(generate with the default cache, not cache_implementation='static')"
            )
        if cache is None or cache.get_seq_length() == 0:
            cache = cache if cache is not None else DynamicCache(config=decoder.config)
            for layer, (k, v) in enumerate(self.prefix_kv(batch)):
                cache.update(k, v, layer)
            cache.lorakit_prefix = id(self)
        elif getattr(cache, "lorakit_prefix", None) != id(self):
            raise ValueError(
                "the KV cache passed in was filled without this prompt/prefix adapter (by the base model or "
                "another adapter); start generation from an empty cache with the adapter active"
            )
        return cache

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

    def peft_common(self) -> dict[str, Any]:
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


def check_init(num_virtual_tokens: int, init: str) -> None:
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens}")
    if init not in INITS:
        raise ValueError(f"init_from must be one of {INITS}, got {init!r}")


def check_peft_decoder_only(d: dict[str, Any]) -> None:
    if d.get("num_transformer_submodules") not in (None, 1) or d.get("task_type") == "SEQ_2_SEQ_LM":
        raise ValueError(
            "this prompt-learning adapter is for an encoder-decoder model; lorakit reads decoder-only ones"
        )
