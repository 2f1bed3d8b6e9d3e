"""Training measurement: one AdamW step on a 4 x 256 batch, causal-LM loss on every token.

lorakit's cases first get what the trainer does before its first step
(`lorakit.train.fast.prepare_for_training`: its attention kernel, RMSNorm outputs cast once, frozen
linear weights in bf16, the allocator setting; the `_compiled` cases also compiled decoder layers,
whose compilation falls in the warm-up steps) and the trainer's AdamW (torch's fused kernel); PEFT's
run the model as loaded with torch's default AdamW, as PEFT's examples do.
lorakit's cases use its chunked loss (`lorakit.train.loss.chunked_causal_lm_loss`), which never
builds fp32 logits for the whole batch; PEFT's cases call `model(input_ids, labels=...)` as PEFT
users do. The `lora_model_loss_*` cases run lorakit with that same plain loss, so a reader can
tell how much of a difference comes from the loss and how much from the adapter layers.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.device import peak_memory_mb, peak_reserved_mb, reset_peak_memory

from .cases import TASK_BATCH, TASK_BATCHES, TASK_MICRO, TASK_PACKING, TRAIN_BATCH, TRAIN_SEQ, Case
from .timing import measure, peak_rss_since_reset_mb, reset_peak_rss

LR = 1e-4
WEIGHT_DECAY = 0.01  # torch's AdamW default, for both libraries

LossFn = Callable[[nn.Module, Tensor], Tensor]


def run_train(
    model: nn.Module,
    case: Case,
    warmup: int,
    steps: int,
    tokenizer: Any = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One case's timed steps; `sync` waits for a GPU's queued work (`timing.measure`)."""
    model.train()
    device = next(model.parameters()).device
    prepared: list[str] = []
    if case.library == "lorakit":  # what `lorakit train` does before its first step
        from lorakit.train.fast import prepare_for_training

        amp = torch.bfloat16 if case.dtype == "bf16" else None
        prepared = prepare_for_training(model, amp, case.compile, allocator=case.allocator)
        if case.checkpointing:  # `lorakit train --gradient-checkpointing`
            from lorakit.train.trainer import enable_activation_checkpointing

            enable_activation_checkpointing(model)
            prepared.append("activation checkpointing per decoder layer")
    if case.attention == "s2":  # LongLoRA's shifted sparse attention (training only)
        from lorakit.train.s2_attention import use_s2_attention

        use_s2_attention(model)
        prepared.append("attention: lorakit_s2 (shifted sparse, groups of N/4)")
    elif case.attention:
        model.set_attn_implementation(case.attention)
        prepared.append(f"attention: {case.attention}")
    if case.data:
        return _run_task(model, case, warmup, steps, tokenizer, prepared, sync)
    ids = _batch(model, case.seq, case.rows).to(device)
    loss_fn, loss_name = _loss_fn(case.loss)
    optimizer = _optimizer(model, case, ids.device, prepared)
    losses: list[float] = []

    def step() -> None:
        with _autocast(case.dtype, device):
            loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    reset = _reset_peaks(device)  # the training peak, not the model load's (an fp32 model before NF4)
    timing = measure(step, warmup, steps, sync)
    timing["tokens_per_s"] = ids.numel() / timing["median_s"]
    result = {
        "step": timing,
        "loss": loss_name,
        "losses": losses,
        "batch": list(ids.shape),
        "prepared": prepared,
    }
    return _with_peaks(result, reset, device)


def _reset_peaks(device: torch.device) -> bool:
    """Restart the peak counters (the process's RSS; the GPU's allocated memory there)."""
    reset_peak_memory(device)
    return reset_peak_rss()


def _with_peaks(result: dict[str, Any], rss_reset: bool, device: torch.device) -> dict[str, Any]:
    """The steps' own peaks: RSS where it could be reset; the GPU's allocated memory on a GPU."""
    if rss_reset:
        result["step_peak_rss_mb"] = peak_rss_since_reset_mb()
    gpu = peak_memory_mb(device)
    if gpu is not None:
        result["step_peak_gpu_mb"] = gpu
        result["step_peak_gpu_reserved_mb"] = peak_reserved_mb(device)
    return result


def _optimizer(
    model: nn.Module, case: Case, device: torch.device, prepared: list[str]
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if case.library != "lorakit":  # what PEFT's examples write
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    from lorakit.train.config import TrainConfig  # the trainer's AdamW (fused where torch has the kernel)
    from lorakit.train.optim import build_optimizer

    optimizer = build_optimizer([{"params": params}], TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY), device)
    prepared.append(f"optimizer: {type(optimizer).__name__}, fused={optimizer.defaults.get('fused')}")
    return optimizer


def task_batches(tokenizer: Any, layout: str) -> tuple[list[list[dict[str, Tensor]]], int, int]:
    """TASK_BATCHES optimizer batches of the default task's training samples, as `lorakit train` forms
    them (TASK_BATCH samples, sorted by length into micro-batches of TASK_MICRO), laid out as asked;
    with the samples' real tokens and loss tokens per batch (the same for every layout)."""
    import random

    from lorakit.data import build_sft_dataset, load_task
    from lorakit.train.batching import default_collate, loss_token_count, micro_batches

    samples = build_sft_dataset(tokenizer, load_task().train, 512).samples
    picked = random.Random(0).sample(range(len(samples)), TASK_BATCH * TASK_BATCHES)
    packing = TASK_PACKING if layout == "packed" else 0
    batches = [
        micro_batches(
            samples,
            picked[b * TASK_BATCH : (b + 1) * TASK_BATCH],
            TASK_MICRO,
            default_collate,
            tokenizer.pad_token_id,
            packing=packing,
            share_prefix=layout == "shared",
        )  # fmt: skip
        for b in range(TASK_BATCHES)
    ]
    tokens = sum(len(samples[i].input_ids) for i in picked) // TASK_BATCHES
    loss_tokens = sum(loss_token_count(m["labels"]) for batch in batches for m in batch) // TASK_BATCHES
    return batches, tokens, loss_tokens


def _run_task(
    model: nn.Module,
    case: Case,
    warmup: int,
    steps: int,
    tokenizer: Any,
    prepared: list[str],
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One optimizer step on real batches, rotating through TASK_BATCHES of them: lorakit's chunked
    loss as the trainer computes it (the sum over the batch's loss tokens over their count); PEFT's
    `model(input_ids, attention_mask, labels=...)` per micro-batch, averaged, as its users train."""
    from lorakit.train.batching import loss_token_count, model_mask
    from lorakit.train.loss import chunked_causal_lm_loss

    device = next(model.parameters()).device
    batches, tokens, loss_tokens = task_batches(tokenizer, case.data)
    batches = [[{k: v.to(device) for k, v in m.items()} for m in batch] for batch in batches]
    optimizer = _optimizer(model, case, device, prepared)
    losses: list[float] = []
    turn = [0]

    def step() -> None:
        batch = batches[turn[0] % len(batches)]
        turn[0] += 1
        count = sum(loss_token_count(m["labels"]) for m in batch)
        total = 0.0
        for micro in batch:
            with _autocast(case.dtype, device):
                if case.library == "lorakit":
                    part, _ = chunked_causal_lm_loss(
                        model, micro["input_ids"], model_mask(micro), micro["labels"],
                        position_ids=micro.get("position_ids"),
                    )  # fmt: skip
                    loss = part / count
                else:
                    loss = model(
                        input_ids=micro["input_ids"],
                        attention_mask=micro["attention_mask"],
                        labels=micro["labels"],
                    ).loss / len(batch)
            loss.backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)

    reset = _reset_peaks(device)
    timing = measure(step, warmup, steps, sync)
    timing["tokens_per_s"] = tokens / timing["median_s"]
    timing["loss_tokens_per_s"] = loss_tokens / timing["median_s"]
    rows = [m["input_ids"].shape for batch in batches for m in batch]
    result = {
        "step": timing,
        "loss": "lorakit chunked_causal_lm_loss"
        if case.library == "lorakit"
        else "model(..., labels=...).loss",
        "losses": losses,
        "batch": [TASK_BATCH, tokens // TASK_BATCH],
        "layout": {
            "kind": case.data,
            "positions_per_step": sum(r[0] * r[1] for r in rows) // len(batches),
            "real_tokens_per_step": tokens,
            "loss_tokens_per_step": loss_tokens,
        },  # fmt: skip
        "prepared": prepared,
    }
    return _with_peaks(result, reset, device)


def _batch(model: nn.Module, seq: int = 0, rows: int = 1) -> Tensor:
    """A fixed pseudo-random (TRAIN_BATCH, TRAIN_SEQ) batch, or `rows` rows of `seq` tokens; timing
    does not depend on the text."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(4321)
    shape = (rows, seq) if seq else (TRAIN_BATCH, TRAIN_SEQ)
    return torch.randint(0, vocab, shape, generator=generator)


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_fn(kind: str) -> tuple[LossFn, str]:
    """The loss a case asked for; falls back to the model's own loss if the chunked one is absent."""
    if kind == "chunked" and importlib.util.find_spec("lorakit.train.loss") is not None:
        return _chunked_loss, "lorakit chunked_causal_lm_loss"
    return _model_loss, "model(input_ids, labels=input_ids).loss"


def _model_loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss


def _chunked_loss(model: nn.Module, ids: Tensor) -> Tensor:
    from lorakit.train.loss import chunked_causal_lm_loss

    total, count = chunked_causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    return total / count
