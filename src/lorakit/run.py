"""End-to-end runs behind the command line: train (with before/after evaluation), eval, merge.

This is the one module besides `cli` that imports every part: model loading, data, a method from
the table in `lorakit.methods`, the trainer, and evaluation. The run's options are `options.py`,
its data `run_data.py`, its scoring `run_eval.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api, vocab
from .core.io import atomic_write_json
from .data import collate
from .device import describe, peak_memory_mb
from .methods import METHODS
from .models import load_tokenizer
from .options import RunConfig, method_config, optimizer_groups
from .run_data import EvalData, build_data, build_replay, read_data, read_replay
from .run_eval import base_scores, eval_autocast, evaluate_merged, format_table
from .serving import train_warnings
from .train import TrainConfig, Trainer, distributed
from .train import evaluate as ev
from .train.checkpoint import refuse_existing_run

log = logging.getLogger("lorakit")


# RunConfig fields that only decide how the run is scored or computed, not what it trains: they may
# change between an interruption and its --resume. Every other field must stay the same.
SCORING_ONLY = (
    "eval_data",
    "eval_max_new_tokens",
    "eval_limit",
    "general_tokens",
    "kl_prompts",
    "forgetting_data",
    "general_questions",
    "skip_eval",
    "base_eval_cache",
    "attention",
    "device",
    "long_eval_lengths",
    "long_eval_tokens",
    "passkey_per_depth",
)


def train_run(cfg: RunConfig, train_cfg: TrainConfig, say: Any = print) -> dict[str, Any]:
    """Fine-tune, evaluate before and after, write the adapter, metrics.json and the loss plot.

    Everything that can be checked without the model is checked first (options, data, the
    tokenised samples), and the output folder is created only then. Long-document tasks (`--task
    wiki`) train and score differently: lorakit.long.run."""
    from .long.run import DOCUMENT_TASKS, train_documents_run

    if cfg.task in DOCUMENT_TASKS and not cfg.data:
        return train_documents_run(cfg, train_cfg, say)
    world, say = launch(train_cfg, say)
    torch.manual_seed(train_cfg.seed)
    out_dir = Path(train_cfg.output_dir)
    if not train_cfg.resume:  # before the model loads; the trainer checks again for library users
        refuse_existing_run(out_dir / "checkpoints")
    started = time.perf_counter()
    conversations = read_data(cfg, train_cfg.seed, say)
    replay_data = read_replay(cfg)
    in_place = getattr(METHODS.get(cfg.method), "in_place", False)
    if train_cfg.kl_to_base and in_place:
        raise ValueError(
            f"--kl-to-base needs the base model, and --method {cfg.method} changes its weights in place; "
            "use an adapter method (lora, dora, ...)"
        )
    tokenizer = load_tokenizer(cfg.model)
    extension = vocab.for_run(cfg, tokenizer, conversations[0], in_place, say)  # --add-tokens
    if extension is not None:
        tokenizer = extension.tokenizer
    method = method_config(cfg, tokenizer, train_cfg.seed)
    for line in train_warnings(method):
        say(line)
    train, data = build_data(cfg, tokenizer, conversations)
    replay = build_replay(cfg, tokenizer, replay_data)
    if replay is not None:
        say(
            f"replay: {len(replay.samples)} samples of {cfg.replay.rpartition(':')[0]}, {replay.ratio:.1%} of each batch"
        )
    say(
        f"data: {len(train)} training samples ({train.skipped} skipped: answer truncated away), {len(data.items)} held-out"
    )
    model, base_tokenizer = api_load(cfg.model, cfg.attention, cfg.device)
    say(f"device: {describe(next(model.parameters()).device)}")
    if extension is None:
        tokenizer = base_tokenizer
    else:
        vocab.extend_model(model, extension, cfg.token_init, train_cfg.seed)
    validate = getattr(method, "validate", None)  # e.g. BitFit on a model without biases
    if callable(validate):  # fails before the base evaluation (a minute or more), not after
        validate(model)
    distributed.join(world, next(model.parameters()).device)
    before, reference = None, None
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        before, reference = base_scores(model, tokenizer, data, cfg, out_dir, train_cfg.resume, say)
    distributed.barrier()
    api.apply(model, method)
    if extension is not None:
        vocab.train_new_tokens(model, extension)
    say(api.summary(model))
    trainer = Trainer(
        model,
        train.samples,
        train_cfg,
        collate,
        tokenizer.pad_token_id,
        param_groups=optimizer_groups(model, method, cfg, train_cfg),
        hooks=api.training_hooks(model),
        eval_fn=_held_out_loss(data, tokenizer) if train_cfg.eval_every and data.answer_samples else None,
        log=say,
        run_options={k: v for k, v in dataclasses.asdict(cfg).items() if k not in SCORING_ONLY},
        replay=replay,
    )
    result = trainer.train()
    if not world.main:
        return other_rank_done(world, result)
    adapter_dir = api.save_adapter(model, out_dir / "adapter")[0]
    after = None if cfg.skip_eval else evaluate_merged(model, tokenizer, data, cfg, reference)
    metrics = _metrics(
        cfg, train_cfg, before, after, result, train, model, adapter_dir, time.perf_counter() - started
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    say(format_table(before, after))
    say(f"adapter: {adapter_dir}  metrics: {out_dir / 'metrics.json'}  loss plot: {result.plot_path}")
    distributed.barrier()
    return metrics


def launch(train_cfg: TrainConfig, say: Any) -> tuple[distributed.World, Any]:
    """This process's place in a torchrun / accelerate launch (one process: rank 0 of 1), with the
    batch checked on every rank before any collective; `say` prints on rank 0 only."""
    world = distributed.World.from_env()
    distributed.check_batch(train_cfg.batch_size, train_cfg.micro_batch_size, world)
    return world, say if world.main else _quiet


def other_rank_done(world: distributed.World, result: Any) -> dict[str, Any]:
    """What a rank other than 0 returns after training: rank 0 writes the adapter (whole: every rank
    holds every tensor) and scores; this one waits for it at the final barrier."""
    distributed.barrier()
    return {"rank": world.rank, "train": {"steps": result.steps, "final_loss": result.final_loss}}


def _quiet(*_: Any) -> None:
    """`say` on ranks other than 0."""


def _held_out_loss(data: EvalData, tokenizer: Any) -> Any:
    """The trainer's periodic evaluation (``--eval-every N``): held-out answer NLL, a forward pass
    only (no generation), so a learning curve costs seconds per point; written to log.jsonl as
    ``eval_answer_nll``."""

    def held_out(model: nn.Module) -> dict[str, float]:
        amp = eval_autocast(model)
        return {
            "answer_nll": ev.answer_nll(
                model, data.answer_samples, collate, tokenizer.pad_token_id, autocast_dtype=amp
            )["nll"]
        }

    return held_out


def api_load(path: str | None, attention: str = "auto", device: str = "cpu") -> tuple[nn.Module, Any]:
    """The model on `device` (a `--device` value: auto, cpu, cuda, cuda:N) with its attention kernel."""
    from .device import resolve_device
    from .models import load_model

    where = resolve_device(device)  # a GPU asked for and not there fails before the load
    model, tokenizer = load_model(path)
    if where.type != "cpu":
        model.to(where)
    set_attention(model, attention)
    return model, tokenizer


def set_attention(model: nn.Module, attention: str) -> None:
    """Pick the attention kernel. On CPU, PyTorch's flash kernel is the slowest choice at fine-tuning
    lengths; `lorakit` (lorakit.train.attention) computes eager attention's values with batched
    matmuls and keeps no probabilities for backward, and hands no-gradient calls to SDPA. On GPU,
    SDPA is the better choice."""
    if attention not in ("auto", "lorakit", "eager", "sdpa"):
        raise ValueError(f"attention must be auto, lorakit, eager or sdpa, got {attention!r}")
    if attention == "auto":
        attention = "sdpa" if next(model.parameters()).is_cuda else "lorakit"
    if attention == "lorakit":
        from .train.attention import register

        register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attention)


def _metrics(cfg, train_cfg, before, after, result, train, model, adapter_dir, seconds) -> dict[str, Any]:
    extra = {
        # the device's peak of allocated memory over the whole run (evaluation included); None on a CPU
        "peak_gpu_mb": peak_memory_mb(next(model.parameters()).device),
        "skipped_batches": result.skipped_batches,
        "held_out_curve": result.evals,
        "skipped_samples": train.skipped,
        "samples": len(train),
    }
    return run_metrics(cfg, train_cfg, before, after, result, model, adapter_dir, seconds, extra)


def run_metrics(cfg, train_cfg, before, after, result, model, adapter_dir, seconds, extra) -> dict[str, Any]:
    """metrics.json of a training run (`extra`: the run kind's own training fields)."""
    trainable, total = api.trainable_parameters(model)
    return {
        "run": dataclasses.asdict(cfg),
        "train_config": train_cfg.to_dict(),
        "before": before,
        "after": after,
        "train": {
            "steps": result.steps,
            "final_loss": result.final_loss,
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": round(result.elapsed_s, 1),
            **extra,
            "trainable_params": trainable,
            "total_params": total,
        },
        "adapter": str(adapter_dir),
        "total_seconds": round(seconds, 1),
    }
