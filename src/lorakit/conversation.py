"""A conversation whose KV cache is the base model's and grows turn by turn, with aLoRA adapters
invoked on it: each invocation prefills only its own tokens, generates, and rolls the cache back.

    conv = Conversation(model, tokenizer, system="...")
    conv.add("user", "My income is ...")          # prefills only the new tokens, base weights
    reply = conv.respond()                         # the base model answers; history grows
    check = conv.invoke("checker")                 # aLoRA: prefill the invocation, generate, roll back
    check.text, check.prefilled                    # its answer, and the 4 or so tokens it prefilled

The history is rendered with the model's chat template each time and only the tokens beyond the
cached ones are run (if the template tokenizes an earlier part differently, the cache is cropped
to the common prefix first, so the cache always equals a fresh prefill of the history). Everything
the history holds was computed with every adapter off: that is what makes an aLoRA invocation
reuse it (methods/alora.py), and what `invoke` restores afterwards, also when generation raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from .core.kvcache import cache_argument, output_cache
from .core.model import disable_adapters, registry, set_active
from .generate import stop_ids, text_delta


@dataclass
class Turn:
    """What one call produced: the text, the tokens it ran, and the cache size after it."""

    text: str
    prefilled: int  # prompt tokens this call computed (not counting the generated ones)
    generated: int
    cached: int  # tokens in the base cache after the call


class Conversation:
    """A multi-turn chat on one base-model KV cache; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer: Any, system: str | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache = DynamicCache(config=model.config)
        self.ids: list[int] = []  # the tokens the cache holds
        self._cache_name = cache_argument(model)
        self._device = next(model.parameters()).device
        self._stop = stop_ids(model, tokenizer)

    # ---- the base history ---------------------------------------------------------------------

    def add(self, role: str, content: str) -> int:
        """Append a message and prefill its tokens with the base weights; returns how many ran."""
        self.messages.append({"role": role, "content": content})
        return self._extend(self._render())

    def respond(self, max_new_tokens: int = 256, on_text: Callable[[str], None] | None = None) -> Turn:
        """The base model answers the history; the answer becomes part of it."""
        target = self._render(generation_prompt=True)
        prefilled = self._extend(target[:-1]) + 1  # the last token starts the generation
        text, generated = self._generate(max_new_tokens, on_text, None, target[-1])
        self.messages.append({"role": "assistant", "content": text})
        prefilled += self._extend(self._render())  # the answer's tokens as the template renders them
        return Turn(text, prefilled, generated, len(self.ids))

    # ---- invoking an adapter ------------------------------------------------------------------

    def invoke(
        self,
        adapter: str,
        instruction: str | None = None,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        on_text: Callable[[str], None] | None = None,
    ) -> Turn:
        """Run aLoRA adapter `adapter` on the history: the tokens after the cached history (the
        assistant header its invocation is, or `instruction` as a user turn first) are prefilled
        with the adapter on, it generates, and the cache is cropped back to the history."""
        if adapter not in registry(self.model).configs:
            raise KeyError(
                f"no adapter named {adapter!r}; adapters here: {list(registry(self.model).configs)}"
            )
        extra = [{"role": "user", "content": instruction}] if instruction else []
        target = self._render(extra, generation_prompt=True)
        base_length, previous = len(self.ids), list(registry(self.model).active)
        try:
            common = self._common_prefix(target)
            if common < base_length:
                self._crop(common)
                base_length = common
            set_active(self.model, [adapter])
            prefilled = len(target) - base_length
            self._run(target[base_length:-1])
            text, generated = self._generate(max_new_tokens, on_text, adapter, target[-1], min_new_tokens)
        finally:
            self._crop(base_length)  # the history is the base model's again
            set_active(self.model, previous) if previous else None
        return Turn(text, prefilled, generated, len(self.ids))

    # ---- pieces -------------------------------------------------------------------------------

    def _render(
        self, extra: list[dict[str, str]] | None = None, generation_prompt: bool = False
    ) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            self.messages + (extra or []), tokenize=False, add_generation_prompt=generation_prompt
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _common_prefix(self, target: list[int]) -> int:
        n = 0
        for a, b in zip(self.ids, target, strict=False):
            if a != b:
                break
            n += 1
        return n

    def _extend(self, target: list[int]) -> int:
        """Make the cache hold `target`, base weights only. Returns the tokens run."""
        common = self._common_prefix(target)
        self._crop(common)
        with disable_adapters(self.model):
            self._run(target[common:])
        return len(target) - common

    def _run(self, ids: list[int]) -> torch.Tensor | None:
        if not ids:
            return None
        step = torch.tensor([ids], device=self._device)
        with torch.inference_mode():
            out = self.model(input_ids=step, use_cache=True, **{self._cache_name: self.cache})
        self.cache = output_cache(out)
        self.ids.extend(ids)
        return out.logits[0, -1]

    def _crop(self, length: int) -> None:
        if length < len(self.ids):
            self.cache.crop(length - self.cache.get_seq_length())
            del self.ids[length:]

    def _generate(
        self,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None,
        adapter: str | None,
        first: int,
        min_new_tokens: int = 0,
    ) -> tuple[str, int]:
        """Greedy decoding from the prompt's last token `first`; generated tokens leave the cache
        afterwards (`respond` re-adds the answer as the template renders it)."""
        start = len(self.ids)
        reply: list[int] = []
        context = disable_adapters(self.model) if adapter is None else contextlib.nullcontext()
        try:
            with context:
                shown = ""
                for produced in _decode(self, first, max_new_tokens, min_new_tokens):
                    reply.append(produced)
                    if on_text is not None:
                        piece, shown = text_delta(self.tokenizer, reply, shown)
                        if piece:
                            on_text(piece)  # whole characters only
        finally:
            self._crop(start)
        return self.tokenizer.decode(reply, skip_special_tokens=True), len(reply)


def _decode(conv: Conversation, token: int, max_new_tokens: int, min_new_tokens: int) -> Iterator[int]:
    for i in range(max_new_tokens):
        logits = conv._run([token])
        if i < min_new_tokens:
            logits = logits.clone()
            logits[list(conv._stop)] = float("-inf")
        token = int(logits.argmax())
        if token in conv._stop:
            return
        yield token


def conversation_repl(
    model: nn.Module,
    tokenizer: Any,
    adapter: str,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
    max_new_tokens: int = 256,
    system: str | None = None,
) -> None:
    """`lorakit chat` with an aLoRA adapter: the history stays the base model's cache, each reply is
    the adapter invoked on it, and each turn says how many tokens it ran."""
    conv = Conversation(model, tokenizer, system)
    print_fn("lorakit chat (aLoRA: the history is the base model's KV cache): /reset, /exit")
    while True:
        try:
            line = input_fn("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print_fn()
            return
        if line == "/exit":
            return
        if line == "/reset":
            conv = Conversation(model, tokenizer, system)
            print_fn("(new conversation)")
            continue
        if not line:
            continue
        user = conv.add("user", line)
        turn = conv.invoke(
            adapter, max_new_tokens=max_new_tokens, on_text=lambda t: print_fn(t, end="", flush=True)
        )
        print_fn()
        added = conv.add("assistant", turn.text)
        print_fn(
            f"[prefilled {user} user + {turn.prefilled} invocation tokens, generated {turn.generated}; "
            f"the reply joined the base cache ({added} tokens), which holds {len(conv.ids)}]"
        )
