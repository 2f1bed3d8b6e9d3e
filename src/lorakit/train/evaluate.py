"""Evaluation for any causal LM (adapted, merged or fully fine-tuned).

- ``generate_answers`` / ``exact_match``: greedy, batched task answers.
- ``answer_nll``: held-out loss on the labelled (answer) tokens only.
- ``text_nll``: loss on general English text, a cheap forgetting signal.
- ``reference_next_token_logprobs`` + ``next_token_kl``: how far the tuned next-token distribution
  moved from the base model's, measured against a reference taken before training.

Everything runs under ``torch.inference_mode()``; ``autocast_dtype`` (e.g. ``torch.bfloat16``)
turns on autocast for the forward passes, while losses are always reduced in fp32.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from ..core.kvcache import cache_argument, output_cache
from ..core.model import adapters_row_problem
from .batching import bool_mask_problem, common_prefix_length, pads_only, shared_prefix_collate

Messages = list[dict[str, str]]
IGNORE = -100


class EncodedLike(Protocol):
    """An encoded sample as an object (lorakit.data's ``Encoded``); a mapping works too."""

    input_ids: Sequence[int]
    labels: Sequence[int]


Sample = Mapping[str, Sequence[int]] | EncodedLike
Collate = Callable[[Sequence[Sample], int], Mapping[str, torch.Tensor]]


class Item(Protocol):
    """A held-out task example: chat messages to answer and the reference answer.

    lorakit.data's ``EvalItem`` names them ``messages`` / ``reference``; objects with
    ``prompt`` / ``answer`` are accepted too.
    """

    messages: Messages
    reference: str


# ----------------------------------------------------------------------------- task answers


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    share_prefix: bool = True,
    settled: Sequence[Callable[[str], bool] | None] | None = None,
    starts: Mapping[tuple[int, ...], Sequence[int]] | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, decoded without special tokens and stripped.

    Batches are left-padded (so every row's last prompt token sits at the same column) and built
    from prompts sorted by length (less padding); the results equal one-by-one greedy decoding.
    With `share_prefix` (the default) the prompts' common prefix (system prompt, instruction: ~47
    of the default task's ~65 prompt tokens) is computed once and its keys and values are shared by
    every row (`_greedy_shared_prefix`), where the model allows it (`shared_prefix_problem`).

    `settled[i]` (optional, per prompt): called with prompt i's answer so far, True once whatever
    follows cannot change how the caller scores it; that row then stops early (its answer is a
    truncated one, so callers pass it only for answers they score and do not show).

    `starts` (optional, by a prompt's tokens): tokens its greedy answer is known to begin with,
    from a teacher-forced pass over a reference answer (`answer_nll(..., greedy_starts=True)`):
    the reference's tokens up to the first the model would not pick, then the one it picks. Such
    a row is generated on from there, or not at all when the start already ends the answer (an
    eos, or `max_new_tokens` tokens): a model that gets most answers right skips most decoding.
    """
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    eos = _eos_ids(model, tokenizer)
    checks = list(settled) if settled is not None else [None] * len(encoded)
    if len(checks) != len(encoded):
        raise ValueError(f"settled has {len(checks)} entries for {len(encoded)} prompts")
    begun = [_known_start(starts, e, eos, max_new_tokens) for e in encoded]
    todo = [i for i, b in enumerate(begun) if len(b) < max_new_tokens and not set(b) & set(eos)]
    answers = [list(b) for b in begun]
    if todo:
        going = [encoded[i] + begun[i] for i in todo]  # generation goes on after the known start
        budgets = [max_new_tokens - len(begun[i]) for i in todo]

        def decided(k: int, tokens: list[int]) -> bool:
            check = checks[todo[k]]
            return check is not None and check(_decode_until(tokenizer, begun[todo[k]] + tokens, eos))

        with torch.inference_mode(), _autocast(model, autocast_dtype):
            new = _generate(
                model, tokenizer, going, budgets, batch_size, eos, decided, share_prefix, settled is not None
            )
        for i, tokens in zip(todo, new, strict=True):
            answers[i] += tokens
    return [_decode_until(tokenizer, a, eos) for a in answers]


def _known_start(
    starts: Mapping[tuple[int, ...], Sequence[int]] | None, prompt: list[int], eos: list[int], limit: int
) -> list[int]:
    """The known start of `prompt`'s greedy answer, cut after its first eos and at `limit` tokens."""
    start = list(starts.get(tuple(prompt), ())) if starts else []
    end = next((k + 1 for k, t in enumerate(start) if t in eos), len(start))
    return start[: min(end, limit)]


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    budgets: list[int],
    batch_size: int,
    eos: list[int],
    decided: Callable[[int, list[int]], bool],
    share_prefix: bool,
    stop_early: bool,
) -> list[list[int]]:
    """Greedy tokens after each of `encoded`, at most `budgets[k]` for prompt k: from the prompts'
    shared prefix's cache where the model allows it, else with transformers' `generate` (asking
    `decided` after every token only with `stop_early`: a criterion it would otherwise run for
    nothing)."""
    # every prompt keeps a token after the prefix: the first answer token is read from its logits
    prefix = common_prefix_length(encoded, min(len(e) for e in encoded) - 1)
    if share_prefix and prefix >= MIN_SHARED_PREFIX and shared_prefix_problem(model) is None:
        return _greedy_shared_prefix(
            model, encoded, prefix, budgets, batch_size, eos, tokenizer.pad_token_id, decided
        )
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _left_pad([encoded[i] for i in rows], tokenizer.pad_token_id, _device(model))
        config = GenerationConfig(
            max_new_tokens=max(budgets[i] for i in rows),  # a row with less is cut to its own after
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        # one process generates (rank 0 of a launch, the model gathered whole after FSDP2):
        # transformers would otherwise sync every token with ranks that are not generating
        stop = StoppingCriteriaList([_Settled(rows, ids.shape[1], decided)] if stop_early else [])
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=False,
            stopping_criteria=stop,
        )  # fmt: skip
        for i, new in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
            answers[i] = new[: budgets[i]]
    return answers


MIN_SHARED_PREFIX = 8  # below this, computing it apart costs more forwards than it saves


def _rows_problem(model: nn.Module) -> str | None:
    """Why the model cannot score a batch laid out around its shared prefix (explicit positions and
    a boolean 4-D mask), or None."""
    return bool_mask_problem(model) or shared_prefix_problem(model)


class _Settled(StoppingCriteria):
    """transformers' per-row stopping criterion for `generate_answers`' `settled` checks: rows
    `rows` of a batch whose prompts take `width` columns."""

    def __init__(self, rows: list[int], width: int, decided: Callable[[int, list[int]], bool]) -> None:
        self.rows, self.width, self.decided = rows, width, decided

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width :].tolist()
        flags = [self.decided(i, row) for i, row in zip(self.rows, new, strict=True)]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


def shared_prefix_problem(model: nn.Module) -> str | None:
    """Why the model cannot decode from a shared prefix's cache, or None. Its forward must take
    explicit positions, a padding mask and the cache; an adapter whose output depends on what else
    its row holds says so (`packing_problem`: aLoRA's invocation search, virtual tokens)."""
    for arg in ("position_ids", "attention_mask"):
        if not _accepts(model, arg):
            return f"{type(model).__name__}.forward takes no {arg}"
    if cache_argument(model) not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no KV cache"
    return adapters_row_problem(model)


def _greedy_shared_prefix(
    model: nn.Module,
    encoded: Sequence[list[int]],
    prefix: int,
    budgets: Sequence[int],
    batch_size: int,
    eos: list[int],
    pad_id: int | None,
    decided: Callable[[int, list[int]], bool] = lambda i, tokens: False,
) -> list[list[int]]:
    """Greedy decoding with the first `prefix` tokens (common to every prompt) computed once, at
    most `budgets[i]` tokens after prompt i.

    Its cache is copied to every row of a batch; a row then holds [prefix | padding | the prompt's
    rest], padding masked out and the rest's positions continuing from the prefix's, so each token
    sees exactly what it would see in a row of its own. A row leaves the batch (its cache rows
    dropped) when it reaches eos, its budget or `decided(prompt index, its tokens)` says it is
    settled, so the rows still going are the only ones computed. Only the last position's logits
    are computed where the model can be asked to (`logits_to_keep`)."""
    device = _device(model)
    cache_name = cache_argument(model)
    pad = pad_id if pad_id is not None else eos[0]
    last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    head = torch.tensor([encoded[0][:prefix]], device=device)
    shared = output_cache(model(input_ids=head, use_cache=True, **last))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[list[int]] = [[] for _ in encoded]
    stop = set(eos)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        rests = [encoded[i][prefix:] for i in rows]
        width = max(len(r) for r in rests)
        ids, mask = _left_pad(rests, pad, device)
        mask = torch.cat([torch.ones(len(rows), prefix, dtype=mask.dtype, device=device), mask], 1)
        lengths = torch.tensor([len(r) for r in rests], device=device)
        positions = (prefix + torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(
            min=prefix
        )
        cache = copy.deepcopy(shared)
        cache.batch_repeat_interleave(len(rows))
        for _ in range(max(budgets[i] for i in rows)):
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_name: cache}, **last,
            )  # fmt: skip
            cache = output_cache(out)
            token = out.logits[:, -1].argmax(-1)
            going = []
            for r, (i, t) in enumerate(zip(rows, token.tolist(), strict=True)):
                answers[i].append(t)
                if t not in stop and len(answers[i]) < budgets[i] and not decided(i, answers[i]):
                    going.append(r)
            if not going:
                break
            ids, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if len(going) < len(rows):  # finished rows leave the batch
                keep = torch.tensor(going, device=device)
                rows = [rows[r] for r in going]
                ids, positions, mask = ids[keep], positions[keep], mask[keep]
                cache.batch_select_indices(keep)
    return answers


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    score_fn: Callable[[str, str], bool],
    n_examples: int = 5,
    **generate_kw: Any,
) -> dict[str, Any]:
    """Accuracy of greedy answers under the caller's ``score_fn(prediction, reference)``.

    ``generate_kw`` goes to ``generate_answers`` (max_new_tokens, batch_size, autocast_dtype).
    A ``score_fn`` with a ``decided(partial, reference)`` attribute (``score_exact_match`` has
    one: the partial answer can no longer match) lets an answer stop as soon as its score is
    settled; the first ``n_examples`` answers, which the result shows, are always generated whole.
    """
    items = list(items)
    if not items:
        raise ValueError("exact_match got no items; expected at least one held-out example")
    pairs = [_item_fields(it) for it in items]
    decided = getattr(score_fn, "decided", None)
    settled = None
    if decided is not None:
        settled = [
            None if k < n_examples else (lambda partial, ref=ref: decided(partial, ref))
            for k, (_, ref) in enumerate(pairs)
        ]
    preds = generate_answers(model, tokenizer, [m for m, _ in pairs], settled=settled, **generate_kw)
    hits = [bool(score_fn(p, ref)) for p, (_, ref) in zip(preds, pairs, strict=True)]
    examples = [
        {"prompt": m[-1]["content"], "prediction": p, "answer": ref, "correct": h}
        for (m, ref), p, h in list(zip(pairs, preds, hits, strict=True))[:n_examples]
    ]
    correct = sum(hits)
    return {"accuracy": correct / len(items), "n": len(items), "correct": correct, "examples": examples}


# ----------------------------------------------------------------------------- losses


def answer_nll(
    model: nn.Module,
    samples: Sequence[Sample],
    collate: Collate | None = None,
    pad_id: int = 0,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    share_prefix: bool = True,
    greedy_starts: bool = False,
) -> dict[str, Any]:
    """Mean NLL (nats/token) of the labelled tokens of already-encoded samples; with `tokenizer`
    also per character of the labelled tokens' text (`nll_per_char`), which compares tokenizers.

    With `greedy_starts`, the same pass also reads how far greedy decoding would follow each
    sample's answer (its labelled tokens, one unbroken run after the prompt):
    `out["greedy_starts"]` maps a prompt's tokens to the answer's tokens up to the first one the
    model would not pick, then the one it picks (all of them when it picks every one), which
    `generate_answers(starts=...)` decodes on from instead of from the prompt. These are the
    tokens greedy decoding produces, computed in one batched forward instead of one token at a
    time. A pick counts only where it leads the runner-up by more than the rounding of another
    batch layout can move the two (`tie_margin`); at a closer call the start ends before it, and
    decoding decides it as it would have without a start.

    With `share_prefix` (the default) each batch is laid out as the trainer lays out a micro-batch
    (`batching.shared_prefix_collate`: the prompt prefix its samples share computed once, each
    sample's rest attending to it), where the collate only pads and the model allows it; the NLL
    is the padded batch's, from fewer tokens (~2.5x fewer on the default task).

    Samples (mappings, or objects like lorakit.data's ``Encoded``) hold ``input_ids`` and ``labels`` aligned with them (Hugging Face convention: the
    model predicts ``labels[t]`` from tokens ``< t``; ``-100`` = not scored). ``collate(samples,
    pad_id)`` must return tensors ``input_ids``, ``labels`` and optionally ``attention_mask``; the
    default right-pads. Only positions that predict a label reach the output layer, so the
    full-vocabulary logits of prompt tokens are never materialised.
    """
    collate = collate or right_pad_collate
    if share_prefix and pads_only(collate) and _rows_problem(model) is None:
        collate = shared_prefix_collate
    order = sorted(samples, key=lambda s: len(_field(s, "input_ids")))  # similar lengths per batch
    total, count = 0.0, 0
    starts: dict[tuple[int, ...], list[int]] = {}
    margin = tie_margin(model, autocast_dtype) if greedy_starts else None
    with torch.inference_mode(), _autocast(model, autocast_dtype):
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            nll_sum, n, picked = _labelled_nll_sum(model, collate(part, pad_id), margin)
            total, count = total + nll_sum, count + n
            if picked is not None:
                starts.update(_greedy_starts(part, *picked))
    if count == 0:
        raise ValueError("answer_nll found no labelled tokens; expected labels other than -100")
    out: dict[str, Any] = {"nll": total / count, "tokens": count}
    if greedy_starts:
        out["greedy_starts"] = starts
    if tokenizer is not None:
        chars = sum(len(tokenizer.decode([t for t in _field(s, "labels") if t != IGNORE])) for s in samples)
        out.update(chars=chars, nll_per_char=total / max(chars, 1))
    return out


def tie_margin(model: nn.Module, autocast_dtype: torch.dtype | None) -> float:
    """How far (in logits) the top pick must lead the runner-up for a teacher-forced pass to stand
    for decoding: in fp32 the two layouts differ by ~1e-5; under bf16 by far more (one default-task
    answer's first token led by 0.125 in the pass and lost in decoding)."""
    dtype = autocast_dtype or next(model.parameters()).dtype
    return 1e-2 if dtype in (torch.float32, torch.float64) else 1.0


def _labelled_nll_sum(
    model: nn.Module, batch: Mapping[str, torch.Tensor], margin: float | None = None
) -> tuple[float, int, tuple[list[int], list[int]] | None]:
    """The batch's summed NLL over its labelled tokens and their count; with a `margin`, the
    labelled tokens and the token the model picks at each of their positions (row by row, in
    order), -1 where the pick does not lead the runner-up by more than `margin`."""
    device = _device(model)
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    mask = batch.get("attention_4d", batch.get("attention_mask"))  # a laid-out batch's own mask
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
    targets = labels[:, 1:]  # (B, T-1): position t predicts labels[t + 1]
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)  # (K,) positions any row scores
    if keep.numel() == 0:
        return 0.0, 0, ([], []) if margin is not None else None
    if _accepts(model, "logits_to_keep"):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **extra).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, keep]
    targets = targets[:, keep]  # (B, K)
    scored = targets != IGNORE
    chosen = logits[scored].float()  # (labelled tokens, V)
    nll = F.cross_entropy(chosen, targets[scored], reduction="sum")
    picked = None
    if margin is not None:
        top = chosen.topk(2, -1)
        sure = top.values[:, 0] - top.values[:, 1] > margin
        picked = (targets[scored].tolist(), torch.where(sure, top.indices[:, 0], -1).tolist())
    return nll.item(), int(scored.sum()), picked


def _greedy_starts(
    samples: Sequence[Sample], targets: list[int], picked: list[int]
) -> dict[tuple[int, ...], list[int]]:
    """`answer_nll`'s greedy starts for a batch: `targets` are the labelled tokens as the collated
    batch held them and `picked` the model's token at each, in order (-1: too close to call, where
    the start ends). A sample whose labelled tokens are not one unbroken run after its prompt
    (several assistant turns) gives none; so do all when the batch's labelled tokens are not the
    samples' in order (a collate that reorders). What follows the run unlabelled (the template's
    newline after the end-of-turn) is ignored."""
    runs, every = [], []
    for s in samples:
        ids, labels = list(_field(s, "input_ids")), list(_field(s, "labels"))
        at = [t for t, label in enumerate(labels) if label != IGNORE]
        one_run = bool(at) and at[0] > 0 and at[-1] - at[0] + 1 == len(at)  # after a prompt, unbroken
        answer = labels[at[0] : at[-1] + 1] if one_run else None
        runs.append((ids[: at[0]] if at else [], answer if answer == ids[at[0] : at[-1] + 1] else None))
        every.append([labels[t] for t in at])
    if [t for labels in every for t in labels] != targets:
        return {}
    counts = [len(labels) for labels in every]
    out, at = {}, 0
    for (prompt, answer), n in zip(runs, counts, strict=True):
        mine, at = picked[at : at + n], at + n
        if answer is None:
            continue
        miss = next((j for j, (a, b) in enumerate(zip(answer, mine, strict=True)) if a != b), n)
        out[tuple(prompt)] = answer[:miss] + [t for t in mine[miss : miss + 1] if t >= 0]
    return out


def text_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_tokens: int = 8192,
    block: int = 256,
    batch_size: int = 4,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean NLL and perplexity on the first ``max_tokens`` tokens of general text.

    The texts are tokenized in order, joined by blank lines and cut into ``max_tokens // block``
    full blocks of ``block`` tokens; in each block every token after the first is scored. A fixed
    token budget keeps the cost fixed (seconds on a laptop CPU) whatever the corpus size.
    """
    blocks = _text_blocks(tokenizer, texts, max_tokens, block).to(_device(model))
    total = 0.0
    with torch.inference_mode(), _autocast(model, autocast_dtype):
        for chunk in blocks.split(batch_size):
            logits = model(input_ids=chunk).logits[:, :-1]  # (b, block-1, V)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
            total += nll.item()
    count = blocks.shape[0] * (block - 1)
    chars = sum(len(tokenizer.decode(row[1:].tolist())) for row in blocks)  # the scored tokens' text
    return {
        "nll": total / count,
        "perplexity": math.exp(total / count),
        "tokens": count,
        "nll_per_char": total / max(chars, 1),  # compares tokenizers (an extended vocabulary)
    }


def _text_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int, block: int
) -> torch.Tensor:
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for text in texts:  # tokenize only as much text as the budget needs
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if len(ids) >= max_tokens:
            break
    n_blocks = min(len(ids), max_tokens) // block
    if n_blocks == 0:
        if max_tokens < block:  # `lorakit train --general-tokens 128`: the budget, not the text
            raise ValueError(
                f"max_tokens={max_tokens} (lorakit train --general-tokens) is less than one block of {block} "
                f"tokens; pass at least {block}"
            )
        raise ValueError(
            f"text_nll got {len(ids)} tokens of text, fewer than one block of {block}; "
            "pass more text or a smaller block"
        )
    return torch.tensor(ids[: n_blocks * block]).view(n_blocks, block)


# ----------------------------------------------------------------------------- next-token KL


@dataclass
class NextTokenReference:
    """The base model's next-token distributions at every position of some prompts.

    Stored as the top-k log-probs plus the log of the remaining mass (k+1 buckets per position):
    k=256 on SmolLM2's 49k vocabulary costs 2 KB per position instead of 98 KB of fp16 log-probs
    and covers ~94% of the probability mass on general text (k=64: 88%, k=1024: 98%). It needs
    only the model's outputs, so it works for every method, including full fine-tuning.
    """

    input_ids: list[list[int]]  # the encoded prompts, to check the same tokens are scored later
    top_ids: torch.Tensor  # (P, k) int32, P = all positions of all prompts, in order
    top_logprobs: torch.Tensor  # (P, k) float32
    rest_logprob: torch.Tensor  # (P,) float32, log of the mass outside the top k

    @property
    def covered_mass(self) -> float:
        """Mean probability the top k hold; near 1 means the bucketed KL is close to the full one."""
        return self.top_logprobs.exp().sum(1).mean().item()


def reference_next_token_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    top_k: int = 256,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> NextTokenReference:
    """Take the reference from the BASE model, before training changes it (or its adapters do)."""
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    tops, top_lps, rests = [], [], []
    for logp in _position_logprobs(model, ids, tokenizer.pad_token_id, batch_size, autocast_dtype):
        top_lp, top = logp.topk(min(top_k, logp.shape[1]), dim=1)  # (n, k)
        tops.append(top.to(torch.int32).cpu())
        top_lps.append(top_lp.cpu())
        rests.append(_rest_logprob(logp, top).cpu())
    return NextTokenReference(ids, torch.cat(tops), torch.cat(top_lps), torch.cat(rests))


def next_token_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    reference: NextTokenReference,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean over positions of KL(base || tuned), in nats, on the reference's k+1 buckets.

    Direction: KL(base || tuned) is an expectation under the base distribution, so the top-k of
    the base is exactly what it needs; it grows when the tuned model drops what the base predicted
    (forgetting). Bucketing makes it a lower bound of the full KL, tight when ``covered_mass`` ~ 1.
    """
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    if ids != reference.input_ids:
        raise ValueError(
            "next_token_kl got prompts that encode differently from the reference's; expected the "
            "same prompts (and tokenizer) as reference_next_token_logprobs"
        )
    total, start = 0.0, 0
    for logq in _position_logprobs(model, ids, tokenizer.pad_token_id, batch_size, autocast_dtype):
        end = start + logq.shape[0]
        top = reference.top_ids[start:end].to(logq.device, torch.long)
        logp = torch.cat([reference.top_logprobs[start:end], reference.rest_logprob[start:end, None]], 1)
        logq = torch.cat([logq.gather(1, top), _rest_logprob(logq, top)[:, None]], 1)  # (n, k+1)
        logp = logp.to(logq.device)
        p = logp.exp()
        terms = torch.where(p > 0, p * (logp - logq), 0.0)  # 0 log 0 = 0 (an empty rest bucket)
        total += terms.sum(1).clamp_min(0).sum().item()
        start = end
    return total / start


def _position_logprobs(
    model: nn.Module,
    ids: list[list[int]],
    pad_id: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> Iterator[torch.Tensor]:
    """Yields fp32 log-softmax rows (n, V) for every real (unpadded) position, batch by batch."""
    with torch.inference_mode(), _autocast(model, autocast_dtype):
        for start in range(0, len(ids), batch_size):
            batch = [{"input_ids": x, "labels": x} for x in ids[start : start + batch_size]]
            enc = right_pad_collate(batch, pad_id)
            mask = enc["attention_mask"].to(_device(model))
            logits = model(input_ids=enc["input_ids"].to(mask.device), attention_mask=mask).logits
            yield logits[mask.bool()].float().log_softmax(-1)


def _rest_logprob(logp: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    # logsumexp over the entries outside the top k (no 1 - sum cancellation when the rest is tiny)
    return logp.scatter(1, top, float("-inf")).logsumexp(1)


# ----------------------------------------------------------------------------- helpers


def right_pad_collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100; add the attention mask."""
    seqs = [(_field(s, "input_ids"), _field(s, "labels")) for s in samples]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


right_pad_collate.pads_only = True  # type: ignore[attr-defined]  # see batching.pads_only


def _field(sample: Sample, name: str) -> Sequence[int]:
    return sample[name] if isinstance(sample, Mapping) else getattr(sample, name)


def _item_fields(item: object) -> tuple[Messages, str]:
    if hasattr(item, "messages"):
        return item.messages, item.reference
    return item.prompt, item.answer


def _left_pad(
    seqs: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The tokens generation starts from: the chat template up to the assistant's header."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Messages) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode_until(tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: list[int]) -> str:
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos plus any the model's generation config adds (e.g. end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=dtype)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _accepts(model: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters
