"""`lorakit train --task wiki`: fine-tune on long documents packed into rows of N tokens (LongLoRA's
setting; `--method longlora --context N` also stretches the positions to N), evaluated on held-out
documents before and after: perplexity at several lengths and passkey retrieval, full attention.

N is `--context` when it is set (the new window) and `--max-length` otherwise. Every other part is
the ordinary run: options, method table, trainer, checkpoints and resume, the adapter folder.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..core.io import atomic_write_json
from ..data import collate
from ..models import load_tokenizer
from ..options import RunConfig, method_config, optimizer_groups
from ..run import (
    SCORING_ONLY,
    api_load,
    launch,
    other_rank_done,
    run_metrics,
)  # run.py imports this module only inside train_run
from ..run_data import replay_on
from ..run_eval import eval_autocast
from ..train import TrainConfig, Trainer, distributed
from ..train.checkpoint import refuse_existing_run
from .documents import document_ids, pack, split, wiki_articles
from .evaluate import long_perplexity, passkey_accuracy
from .positions import original_window

DOCUMENT_TASKS = ("wiki",)


def eval_lengths(cfg: RunConfig, window: int, length: int) -> list[int]:
    """--long-eval-lengths, else the original window and the training length (and twice the window
    between them when the extension is 4x or more)."""
    if cfg.long_eval_lengths:
        return sorted({int(x) for x in cfg.long_eval_lengths.split(",") if x.strip()})
    picks = {min(window, length), length}
    if length >= 4 * window:
        picks.add(2 * window)
    return sorted(picks)


def train_documents_run(cfg: RunConfig, train_cfg: TrainConfig, say: Any = print) -> dict[str, Any]:
    torch.manual_seed(train_cfg.seed)
    out_dir = Path(train_cfg.output_dir)
    if not train_cfg.resume:
        refuse_existing_run(out_dir / "checkpoints")
    started = time.perf_counter()
    world, say = launch(train_cfg, say)  # torchrun: as run.train_run, rank 0 evaluates and writes
    if cfg.data or cfg.eval_data:
        raise ValueError(
            "--task wiki trains on the Wikipedia articles it ships with; --data/--eval-data are for chat data"
        )
    if replay_on(cfg):
        say("replay: not used on document runs (the rows are long text already, not chat turns)")
    tokenizer = load_tokenizer(cfg.model)
    method = method_config(cfg, tokenizer, train_cfg.seed)
    length = cfg.context or cfg.max_length
    multiple = getattr(method, "multiple", 1)
    if length % multiple:
        raise ValueError(
            f"rows of {length} tokens do not split into S2-Attn's groups: use a multiple of {multiple}"
        )
    train_docs, held_docs = split(wiki_articles())
    rows = pack(document_ids(tokenizer, train_docs), length)
    held_ids = document_ids(tokenizer, held_docs)
    say(
        f"data: {len(train_docs)} Wikipedia articles packed into {len(rows)} rows of {length:,} tokens; "
        f"{len(held_docs)} held-out articles ({len(held_ids):,} tokens)"
    )
    model, _ = api_load(cfg.model, cfg.attention, cfg.device)
    window = original_window(model.config)
    lengths = eval_lengths(cfg, window, length)
    distributed.join(world, next(model.parameters()).device)
    before = None
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.skip_eval:
            before = _evaluate(model, tokenizer, held_ids, lengths, window, cfg, say, "before")
    distributed.barrier()
    api.apply(model, method)
    say(api.summary(model))
    trainer = Trainer(
        model,
        rows,
        train_cfg,
        collate,
        tokenizer.pad_token_id,
        param_groups=optimizer_groups(model, method, cfg, train_cfg),
        hooks=api.training_hooks(model),
        log=say,
        run_options={k: v for k, v in dataclasses.asdict(cfg).items() if k not in SCORING_ONLY},
    )
    result = trainer.train()
    if not world.main:
        return other_rank_done(world, result)
    adapter_dir = api.save_adapter(model, out_dir / "adapter")[0]
    after = (
        None if cfg.skip_eval else _evaluate(model, tokenizer, held_ids, lengths, window, cfg, say, "after")
    )
    seconds = time.perf_counter() - started
    metrics = run_metrics(
        cfg, train_cfg, before, after, result, model, adapter_dir, seconds, {"rows": len(rows)}
    )
    metrics["window"] = {"original": window, "trained": length, "now": model.config.max_position_embeddings}
    atomic_write_json(out_dir / "metrics.json", metrics)
    say(format_long_table(before, after))
    say(f"adapter: {adapter_dir}  metrics: {out_dir / 'metrics.json'}  loss plot: {result.plot_path}")
    distributed.barrier()
    return metrics


def _evaluate(model, tokenizer, held_ids, lengths, window, cfg, say, when) -> dict[str, Any]:
    started = time.perf_counter()
    amp = eval_autocast(model)
    budget = cfg.long_eval_tokens or max(lengths)
    result: dict[str, Any] = {"perplexity": long_perplexity(model, held_ids, lengths, window, budget, amp)}
    if cfg.passkey_per_depth:
        result["passkey"] = passkey_accuracy(
            model, tokenizer, lengths, PASSKEY_DEPTHS, cfg.passkey_per_depth, autocast_dtype=amp
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    say(f"evaluated {when} training in {result['seconds']:.0f} s")
    return result


PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def format_long_table(before: dict | None, after: dict | None) -> str:
    if before is None and after is None:
        return "(evaluation skipped)"
    some = after or before
    lines = [f"{'metric':<40} {'before':>10} {'after':>10}", "-" * 62]
    for length in some["perplexity"]:
        for key, label in (
            ("ppl", "perplexity"),
            ("ppl_past_window", "  past the original window"),
            ("ppl_last_quarter", "  last quarter"),
        ):
            if key not in some["perplexity"][length]:
                continue
            cells = [f"{m['perplexity'][length][key]:.2f}" if m else "-" for m in (before, after)]
            lines.append(
                f"{label + (f' at {int(length):,}' if key == 'ppl' else ''):<40} {cells[0]:>10} {cells[1]:>10}"
            )
    for length in some.get("passkey", {}):
        cells = [f"{m['passkey'][length]['accuracy']:.0%}" if m else "-" for m in (before, after)]
        lines.append(f"{f'passkey at {int(length):,} tokens':<40} {cells[0]:>10} {cells[1]:>10}")
    return "\n".join(lines)
