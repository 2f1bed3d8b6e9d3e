"""The per-forward context: what a model-level forward tells every delta about the current call.

A `Delta` sees `(x, base_out, layer)`: a layer's input, nothing about which tokens they are. Methods
whose output depends on *where* a token is (aLoRA switches on from an invocation position; a
router's gate reads a per-sequence signal) declare `needs_context = True`. Then one forward
pre-hook on the model's decoder (`model.base_model`, what the causal LM's forward and lorakit's
chunked loss both call) builds a `ForwardContext` for every call, and each such delta reads it as
`self.context`:

    index[b, t]     = cache length + t                    # absolute, in padded row coordinates
    positions[b, t] = the position id the model uses      # left padding accounted
    ids             = every token id of the row so far    # recorded on the cache, then this call's
    values[name]    = what adapter `name` computed for this call (aLoRA: each row's start)

It holds on every path: a plain forward and generation (the decoder runs for each, chunked or token
by token; the ids seen so far ride on the cache object, so a decode step knows its row); the chunked
loss (it calls the decoder); compiled decoder layers (the context is set eagerly before the compiled
layers run, and read there as tensors); gradient checkpointing (the context stays until the next
forward, so a recomputation in backward reads the one its forward read; a mismatch of shapes
raises). Nothing is global: the hook and the current context live on the model.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .kvcache import CACHE_ARGUMENTS

HOLDER = "_lorakit_context"
IDS_ON_CACHE = "lorakit_ids"  # (B, L) token ids the cache holds keys and values for


@dataclass
class ForwardContext:
    """What one call of the decoder is about; see the module docstring."""

    index: Tensor  # (B, T) long
    positions: Tensor  # (B, T) long
    ids: Tensor  # (B, L + T) long: the row so far, -1 where unknown (see _ids_so_far)
    has_ids: bool  # this call gave input_ids (not inputs_embeds)
    past: int  # tokens the cache held before this call
    cache: Any = None  # the cache this call extends (state that must outlive the call rides on it)
    explicit: dict[str, Tensor] = field(default_factory=dict)  # values set by the caller
    values: dict[str, Any] = field(default_factory=dict)  # adapter name -> what it computed
    members: dict[str, list[Any]] = field(default_factory=dict)  # adapter name -> its bound deltas

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def length(self) -> int:
        return self.index.shape[1]


class Rewind(Exception):
    """A contributor's request to recompute the cached tokens from position `to` within this call:
    a prefill chunk ended inside an aLoRA invocation, so its last tokens were computed, with the
    adapter on, before the start was known. Only for tokens this hook saw computed that way."""

    def __init__(self, to: int) -> None:
        super().__init__(to)
        self.to = to


# A contributor computes an adapter's value for a call: (context, adapter is on) -> value.
Contributor = Callable[[ForwardContext, bool], Any]


class ContextHolder:
    """The hook, the contributors and the current context of one model (kept in its __dict__)."""

    def __init__(self, model: nn.Module) -> None:
        decoder = getattr(model, "base_model", None)
        if not isinstance(decoder, nn.Module) or decoder is model:
            raise TypeError(
                f"this method needs to know where each token is, from a Hugging Face *ForCausalLM "
                f"model's decoder (base_model); {type(model).__name__} has none"
            )
        self.model = weakref.ref(model)
        self.contributors: dict[str, Contributor] = {}
        self.members: dict[str, list[Any]] = {}  # adapter name -> its context-reading deltas
        self.is_on: dict[str, Callable[[], bool]] = {}
        self.current: ForwardContext | None = None
        self.explicit: dict[str, Tensor] = {}
        self._signature = inspect.signature(decoder.forward)
        self._trim = 0
        self._handles = [
            decoder.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            decoder.register_forward_hook(self._post_forward, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.current = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        bound.update(bound.pop("kwargs", {}))
        self._trim = 0
        try:
            self.current = self.build(bound)
            return None
        except Rewind as rewind:
            call = self._rewound(bound, rewind.to)
            self.current = self.build(call)
            return (), call

    def _rewound(self, call: dict[str, Any], to: int) -> dict[str, Any]:
        """This call, extended back to position `to`: the cache cropped to `to` tokens and their ids
        put before this call's; the post-hook cuts the outputs back to this call's tokens."""
        name = next(n for n in CACHE_ARGUMENTS if call.get(n) is not None)
        cache, ids = call[name], call["input_ids"]
        past = int(cache.get_seq_length())
        redo = getattr(cache, IDS_ON_CACHE)[:, to:past]
        if bool((redo < 0).any()) or not getattr(cache, "is_croppable", True):
            raise ValueError("the cached tokens to recompute are unknown or the cache cannot be cropped")
        cache.crop(to - past)
        setattr(cache, IDS_ON_CACHE, getattr(cache, IDS_ON_CACHE)[:, :to])
        call = {**call, "input_ids": torch.cat([redo.to(ids.device), ids], dim=1)}
        if call.get("position_ids") is not None:
            first = call["position_ids"][:, :1] - (past - to)
            back = first + torch.arange(past - to, device=first.device)
            call["position_ids"] = torch.cat([back, call["position_ids"]], dim=1)
        self._trim = past - to
        return call

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        trim, self._trim = self._trim, 0
        if not trim:
            return None
        output["last_hidden_state"] = output["last_hidden_state"][:, trim:]
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, trim:] for h in output["hidden_states"])
        return output

    def build(self, call: dict[str, Any]) -> ForwardContext:
        """The context of one decoder call from its arguments (ids, mask, positions, cache)."""
        ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, length = ref.shape[:2]
        cache = next((call[n] for n in CACHE_ARGUMENTS if call.get(n) is not None), None)
        past = int(cache.get_seq_length()) if cache is not None else 0
        index = torch.arange(past, past + length, device=ref.device).expand(batch, length)
        positions = call.get("position_ids")
        mask = call.get("attention_mask")
        if positions is None:
            positions = _positions_from_mask(mask, past, length) if _is_2d(mask) else index
        known = _ids_so_far(cache, ids, past, batch, length, ref.device)
        context = ForwardContext(
            index,
            positions.expand(batch, length),
            known,
            ids is not None,
            past,
            cache,
            dict(self.explicit),
            members=self.members,
        )
        for name, contribute in self.contributors.items():
            context.values[name] = contribute(context, self.is_on[name]())
        return context


def _is_2d(mask: Any) -> bool:
    return isinstance(mask, Tensor) and mask.dim() == 2


def _positions_from_mask(mask: Tensor, past: int, length: int) -> Tensor:
    """Position ids as generation derives them: tokens before, not counting left padding."""
    counted = mask.long().cumsum(-1) - 1  # (B, past + length)
    return counted[:, -length:].clamp_min(0)


def _ids_so_far(cache: Any, ids: Tensor | None, past: int, batch: int, length: int, device: Any) -> Tensor:
    """Every id of each row up to this call's last: the ids recorded on the cache, then this call's
    (-1 where unknown: `inputs_embeds`, or a cache filled where this hook was not installed). The
    record is extended here, so the next call on this cache knows its rows; a cropped cache (a
    rollback) keeps the record of what it kept."""
    new = ids if ids is not None else torch.full((batch, length), -1, dtype=torch.long, device=device)
    if cache is None:
        return new
    before = getattr(cache, IDS_ON_CACHE, None)
    if before is None or before.shape[0] != batch or before.shape[1] < past:
        before = torch.full((batch, past), -1, dtype=torch.long, device=device)
    known = torch.cat([before[:, :past].to(new.device), new], dim=1)
    setattr(cache, IDS_ON_CACHE, known)
    return known


def holder_of(model: nn.Module) -> ContextHolder:
    """The model's context holder; the decoder hook is installed with the first one asked for."""
    holder = model.__dict__.get(HOLDER)
    if holder is None:
        holder = ContextHolder(model)
        model.__dict__[HOLDER] = holder
    return holder


def drop_contributor(model: nn.Module, name: str) -> None:
    """Forget adapter `name`; the hook goes with the last contributor."""
    holder = model.__dict__.get(HOLDER)
    if holder is None:
        return
    holder.contributors.pop(name, None)
    holder.is_on.pop(name, None)
    holder.members.pop(name, None)
    if not holder.contributors:
        holder.remove()
        del model.__dict__[HOLDER]


class explicit_values:
    """`with explicit_values(model, alora_start=starts): ...`: values the caller sets for the calls
    inside (an aLoRA start for an `inputs_embeds` call, say); contributors read them first."""

    def __init__(self, model: nn.Module, **values: Tensor) -> None:
        self.holder, self.values = holder_of(model), values

    def __enter__(self) -> None:
        self.saved = dict(self.holder.explicit)
        self.holder.explicit.update(self.values)

    def __exit__(self, *exc: Any) -> None:
        self.holder.explicit = self.saved
