"""Chatting with a model (streamed, token by token) and exporting a merged model folder."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .core.io import atomic_folder
from .core.kvcache import cache_argument, output_cache
from .train.evaluate import chat_prompt_ids

Messages = list[dict[str, str]]
HELP = "lorakit chat: /reset starts a new conversation, /exit (or Ctrl-D) quits"


def stream_chat(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield the reply's text piece by piece as tokens are decoded (greedy at temperature 0).

    An own decode loop with the KV cache rather than ``generate`` in a thread: no thread to leak
    when the caller stops early, and errors surface in the caller. Stops at eos.
    """
    device = next(model.parameters()).device
    step = torch.tensor([chat_prompt_ids(tokenizer, messages)], device=device)
    stop = stop_ids(model, tokenizer)
    past, reply, shown = None, [], ""
    cache_name = cache_argument(model)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=step, use_cache=True, **{cache_name: past})
            past = output_cache(out)
            token = _next_token(out.logits[0, -1], temperature, generator)
            if token in stop:
                return
            reply.append(token)
            step = torch.tensor([[token]], device=device)
            piece, shown = text_delta(tokenizer, reply, shown)
            if piece:
                yield piece


def text_delta(tokenizer: PreTrainedTokenizerBase, tokens: list[int], shown: str) -> tuple[str, str]:
    """(the text `tokens` decode to beyond `shown`, the text shown after it). While the last
    character is half of a multi-byte one, nothing new: wait for the rest."""
    decoded = tokenizer.decode(tokens, skip_special_tokens=True)
    if decoded.endswith("\ufffd"):
        return "", shown
    return (decoded[len(shown) :] if len(decoded) > len(shown) else ""), decoded


def chat_repl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    system: str | None = None,
    route: Callable[[Messages], contextlib.AbstractContextManager[str]] | None = None,
) -> None:
    """An interactive multi-turn chat; the whole history goes to the model at every turn.

    ``input_fn`` / ``print_fn`` are injectable so the loop can be scripted in tests;
    ``print_fn`` must accept print's ``end`` and ``flush`` keywords. ``route(history)``, if given,
    is entered around each reply (a task router activating its choice) and yields a label to show.
    """
    start: Messages = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print_fn(HELP)
    while True:
        try:
            line = input_fn("> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt
            print_fn()
            return
        if line == "/exit":
            return
        if line == "/reset":
            history = list(start)
            print_fn("(new conversation)")
        elif line.startswith("/"):
            print_fn(f"unknown command {line!r}; {HELP}")
        elif line:
            history.append({"role": "user", "content": line})
            with route(history) if route else contextlib.nullcontext("") as label:
                if label:
                    print_fn(f"[{label}] ", end="", flush=True)
                reply = _print_reply(model, tokenizer, history, print_fn, max_new_tokens, temperature)
            history.append({"role": "assistant", "content": reply})


def _print_reply(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    history: Messages,
    print_fn: Callable[..., None],
    max_new_tokens: int,
    temperature: float,
) -> str:
    """Stream one reply to the screen; Ctrl-C cuts it short and keeps what was said so far."""
    pieces: list[str] = []
    try:
        for piece in stream_chat(model, tokenizer, history, max_new_tokens, temperature):
            print_fn(piece, end="", flush=True)
            pieces.append(piece)
    except KeyboardInterrupt:
        print_fn(" (interrupted)", end="")
    print_fn()
    return "".join(pieces)


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


# ----------------------------------------------------------------------------- export


def export_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write a plain Hugging Face folder (config, safetensors, tokenizer) any HF tool can load.

    The adapters must already be merged and unloaded. Tied embeddings are saved once only when
    the two matrices really are one tensor; if training made them differ, both are saved.
    """
    leftover = [n for n, _ in model.named_modules() if n.endswith(".base_layer")]
    if leftover:
        raise ValueError(
            f"the model still holds adapter wrappers (e.g. {leftover[0]}); expected a plain model; "
            "merge and unload the adapters before exporting"
        )
    out = Path(out_dir)

    def write(folder: Path) -> None:
        with _tying_matches_weights(model):
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_folder(out, write)  # a crash mid-export leaves no half model folder behind
    return out


@contextlib.contextmanager
def _tying_matches_weights(model: PreTrainedModel) -> Iterator[None]:
    """Make ``config.tie_word_embeddings`` say what the weights are, for the save only."""
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    declared = bool(getattr(model.config, "tie_word_embeddings", False))
    tied = declared
    if outp is not None and inp is not None:
        tied = outp.weight is inp.weight or torch.equal(outp.weight, inp.weight)
    model.config.tie_word_embeddings = tied
    try:
        yield
    finally:
        model.config.tie_word_embeddings = declared
