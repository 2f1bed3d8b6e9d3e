"""Activated LoRA (aLoRA; Greenewald et al., 2025, arXiv 2504.12397): LoRA that switches on at an
invocation sequence, so every token before it is the base model's and so is its KV cache.

    y[b, t] = W0 x[b, t] + [index[b, t] >= start[b]] * s * B A x[b, t]

`start[b]` is the absolute position (cache length + offset, in padded row coordinates) of the last
occurrence of the invocation token ids in row b, found over every id of the row so far, the cached
ones included (core/context.py records them on the cache). So a chunked prefill or a partly cached
prompt adapts exactly the tokens a single full forward adapts. Hugging Face PEFT (0.18+, the same
`alora_invocation_tokens` files) counts an offset from the end of each call instead, which adapts
the wrong tokens under chunked prefill (docs/methods/alora.md has the measured difference).

Rules, each enforced here: every token's output is what one full forward over its row so far
computes. A row without the invocation runs as the base model (one warning). Cached tokens that the
adapter computed before their start was known (a prefill chunk that ended inside the invocation,
or a later occurrence) are recomputed within the next call; a cache that already holds invocation
tokens computed *without* the adapter (a base cache reused too far) is refused. `inputs_embeds`
needs an explicit start (`lorakit.core.context.explicit_values(model, alora_start=...)`); merging is
refused. Beam search works: the beams of a row are copies of its prompt, with its start.
Any linear layer may be adapted: every pre-start token is the base model's in every module.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.context import IDS_ON_CACHE, Contributor, ForwardContext, Rewind
from ..core.contract import AdaptedLayer, Delta, NotMergeableError
from .lora import LoRAConfig, LoRADelta

STARTS_ON_CACHE = "lorakit_alora_starts"  # adapter name -> (B,) starts of the adapted tokens it holds
ON_FROM = "lorakit_alora_on_from"  # adapter name -> first position of an unbroken run computed with it on
NEVER = torch.iinfo(torch.long).max  # the start of a row without the invocation


@dataclass
class ALoRAConfig(LoRAConfig):
    """LoRA's options plus the invocation: token ids, or text encoded with the tokenizer (no special
    tokens added). None with a tokenizer: the assistant-turn header of its chat template, so the
    prompt runs on base weights and only the answer is adapted."""

    invocation: str | list[int] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    invocation_tokens: list[int] = field(default_factory=list)

    default_lr: ClassVar[float] = 1e-3
    fsdp_problem: ClassVar[str | None] = (
        "its per-forward invocation context is not checked under FSDP2 here; train it with DDP (leave out --fsdp)"
    )
    packing_problem: ClassVar[str | None] = (
        "it activates after the last invocation in a row, which in a packed row may be another "
        "sample's; train it without --packing"
    )
    # `lorakit chat` keeps the history as the base model's KV cache and invokes the adapter on it
    invoked_on_base_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules_to_save:
            raise ValueError(
                "aLoRA acts only from its invocation on, so the base model's cache of the text before "
                "it stays valid; modules trained whole (modules_to_save) would change every token. "
                "Use LoRA for that"
            )
        if not self.invocation_tokens:
            self.invocation_tokens = invocation_ids(self.invocation, self.tokenizer)
        self.invocation_tokens = [int(t) for t in self.invocation_tokens]
        self._warned = False

    def build(self, layer: AdaptedLayer, path: str) -> Delta:
        if layer.is_embedding:
            raise ValueError(f"aLoRA adapts linear layers; {path} is an embedding")
        rank, alpha = self.rank_alpha(path)
        return ALoRADelta(layer, rank, self.scaling(rank, alpha), self.dropout, self.init)

    def to_peft_dict(self) -> dict[str, Any]:
        return {**super().to_peft_dict(), "alora_invocation_tokens": list(self.invocation_tokens)}

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> ALoRAConfig:
        lora = LoRAConfig.from_peft_dict({k: v for k, v in d.items() if k != "alora_invocation_tokens"})
        fields = {f.name: getattr(lora, f.name) for f in dataclasses.fields(lora)}
        return cls(**fields, invocation_tokens=[int(t) for t in d["alora_invocation_tokens"]])

    def context_contributor(self, name: str) -> Contributor:
        """Each call's (B, T) mask of adapted tokens, for the deltas of adapter `name`."""

        def contribute(context: ForwardContext, on: bool) -> Tensor:
            starts = self.starts(context, name, on)
            return context.index >= starts[:, None]

        return contribute

    def starts(self, context: ForwardContext, name: str, on: bool) -> Tensor:
        """(B,) absolute starts for this call: what one full forward over the row so far would use
        (the last occurrence among every id of the row so far, cached ones included).

        When the cache holds tokens whose activation differs from these starts, they were computed
        before the start was known (or before a later occurrence, generated tokens included): if
        this adapter computed them itself (a prefill chunk that ended inside the invocation, or
        before a later occurrence) they are recomputed within this call (`Rewind`); otherwise
        (a base-model cache that already covers the invocation) the call is refused."""
        cache, past = context.cache, context.past
        held = _held_starts(cache, name, past)
        explicit = context.explicit.get("alora_start")
        device = context.index.device
        if explicit is not None:
            starts = torch.as_tensor(explicit, dtype=torch.long, device=device).expand(context.batch)
        elif context.has_ids or held is not None:
            starts = last_occurrence(context.ids, self.invocation_tokens)
        elif not on:
            return torch.full((context.batch,), NEVER, device=device)
        else:
            raise ValueError(
                "aLoRA finds its start in input_ids; this call passed inputs_embeds. Pass input_ids, "
                "or give the start: with lorakit.core.context.explicit_values(model, alora_start=n)"
            )
        _note_on(cache, name, past, on)
        if not on:
            return starts
        self._warn_missing(starts, context)
        previous = held if held is not None else torch.full_like(starts, NEVER)
        stale = (previous != starts) & (torch.minimum(previous, starts) < past)
        if bool(stale.any()):
            self._recompute_or_refuse(int(torch.minimum(previous, starts)[stale].min()), context, name)
        if cache is not None and bool((starts < past + context.length).any()):
            _hold_starts(cache, name, starts)  # this call puts adapted tokens into the cache
        return starts

    def _warn_missing(self, starts: Tensor, context: ForwardContext) -> None:
        missing = starts == NEVER
        if bool(missing.any()) and not self._warned and context.cache is None:  # a later chunk may hold it
            self._warned = True
            warnings.warn(
                f"{int(missing.sum())} row(s) hold no aLoRA invocation {self.invocation_tokens}; they run "
                "as the base model (warned once)",
                stacklevel=3,
            )

    def _recompute_or_refuse(self, first: int, context: ForwardContext, name: str) -> None:
        on_from = getattr(context.cache, ON_FROM, {}).get(name)
        if on_from is not None and on_from <= first:  # this adapter's own earlier chunk
            raise Rewind(first)
        raise ValueError(
            f"the KV cache already holds {context.past} tokens, past the aLoRA invocation at position "
            f"{first}: those tokens were computed without the adapter. Reuse a base cache only up to "
            f"before the invocation (crop it to {first} tokens), then call the model on the invocation "
            "and what follows"
        )


def _held_starts(cache: Any, name: str, past: int) -> Tensor | None:
    """The starts a cache's adapted tokens were computed with; forgotten once a rollback (crop)
    removed every adapted token, or when the batch changed."""
    held = getattr(cache, STARTS_ON_CACHE, {}).get(name) if cache is not None else None
    if held is None:
        return None
    if held.shape[0] != getattr(cache, IDS_ON_CACHE).shape[0] or not bool((held < past).any()):
        del getattr(cache, STARTS_ON_CACHE)[name]
        return None
    return held


def _note_on(cache: Any, name: str, past: int, on: bool) -> None:
    """Track from where a cache's tokens were all computed with this adapter on (a base-model call
    or a rollback below that point ends the run)."""
    if cache is None:
        return
    record = _cache_record(cache, ON_FROM)
    if not on or record.get(name, past) > past:
        record.pop(name, None)
    if on:
        record.setdefault(name, past)


def _hold_starts(cache: Any, name: str, starts: Tensor) -> None:
    _cache_record(cache, STARTS_ON_CACHE)[name] = starts


def _cache_record(cache: Any, attribute: str) -> dict[str, Any]:
    """A per-adapter record kept on the cache object (it lives and is cropped with the cache)."""
    record = getattr(cache, attribute, None)
    if record is None:
        record = {}
        setattr(cache, attribute, record)
    return record


def last_occurrence(ids: Tensor, pattern: list[int]) -> Tensor:
    """(B,) index of the last full match of `pattern` in each row of `ids` (B, L); NEVER if none."""
    k = len(pattern)
    if ids.shape[1] < k:
        return torch.full((ids.shape[0],), NEVER, device=ids.device)
    windows = ids.unfold(1, k, 1)  # (B, L - k + 1, k)
    match = (windows == torch.tensor(pattern, device=ids.device)).all(-1)
    where = torch.arange(match.shape[1], device=ids.device).expand_as(match)
    last = torch.where(match, where, -1).amax(dim=1)
    return torch.where(last >= 0, last, NEVER)


def invocation_ids(invocation: str | list[int] | None, tokenizer: Any) -> list[int]:
    """The invocation as token ids: given ids, text encoded without special tokens added, or (None)
    the assistant-turn header of the tokenizer's chat template, trailing whitespace left out (its
    newline may merge with the answer's first token)."""
    if isinstance(invocation, (list, tuple)):
        ids = [int(t) for t in invocation]
    elif tokenizer is None:
        raise ValueError("aLoRA needs its invocation: token ids, or text with the tokenizer to encode it")
    else:
        text = invocation if isinstance(invocation, str) else assistant_header(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the aLoRA invocation {invocation!r} encodes to no tokens")
    return ids


def assistant_header(tokenizer: Any) -> str:
    """What the chat template adds for `add_generation_prompt=True`: the assistant turn's header."""
    turn = [{"role": "user", "content": "x"}]
    plain = tokenizer.apply_chat_template(turn, tokenize=False)
    prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    header = prompt[len(plain) :].rstrip() if prompt.startswith(plain) else ""
    if not header:
        raise ValueError(
            "this tokenizer's chat template adds no assistant header to find; pass the invocation "
            "(--invocation TEXT)"
        )
    return header


class ALoRADelta(LoRADelta):
    """LoRA's branch, kept only for the tokens at or after the row's activation start."""

    mergeable: ClassVar[bool] = False
    needs_context: ClassVar[bool] = True

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        on = self.context_value  # (B, T) bool: the tokens this adapter adapts
        if on is None or x.dim() != 3 or tuple(on.shape) != tuple(x.shape[:2]):
            raise RuntimeError(
                f"aLoRA got input of shape {tuple(x.shape)} and a context for "
                f"{None if on is None else tuple(on.shape)} tokens: a layer ran outside the decoder "
                "call that set it (a recomputation after a newer forward?)"
            )
        return super().forward(x, base_out, layer) * on[..., None].to(base_out.dtype)  # (B, T, out)

    def merged_weight(self, weight: Tensor) -> Tensor:
        raise NotMergeableError(
            "aLoRA cannot be merged: it changes only the tokens from the invocation on, so merged "
            "weights would adapt the whole prompt too (and its KV cache would no longer be the base's)"
        )
