"""End-to-end runs behind the command line: train (with before/after evaluation), eval, merge.

This is the one module besides `cli` that imports every part: model loading, data, a method from
the table in `lorakit.methods`, the trainer, and evaluation. Every option is a field of `RunConfig`
(or of `TrainConfig`), so the CLI flags and the YAML keys are the same names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api
from .core.contract import NotMergeableError
from .core.io import atomic_write
from .data import (
    EvalItem,
    build_sft_dataset,
    collate,
    general_prompts,
    general_texts,
    load_task,
    read_examples,
    score_exact_match,
)
from .methods import METHODS, loraplus_param_groups
from .train import TrainConfig, Trainer
from .train import evaluate as ev
from .train.checkpoint import refuse_existing_run
from .train.optim import autocast_dtype

log = logging.getLogger("lorakit")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RunConfig:
    """What to fine-tune, with which method, on which data, and how to evaluate it."""

    model: str | None = field(
        default=None, metadata=_help("local Hugging Face model folder; default: SmolLM2-135M-Instruct")
    )
    method: str = field(
        default="lora",
        metadata=_help("the PEFT method: " + ", ".join(METHODS) + " (each sets its own default --lr)"),
    )
    rank: int = field(default=16, metadata=_help("LoRA rank r"))
    alpha: float = field(
        default=32.0,
        metadata=_help("LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)"),
    )
    dropout: float = field(default=0.0, metadata=_help("dropout on the adapter input"))
    target_modules: str = field(
        default="all-linear",
        metadata=_help('"all-linear", a full-match regex, or comma-separated module names'),
    )
    exclude_modules: str | None = field(
        default=None, metadata=_help("modules to leave alone (same forms as target_modules)")
    )
    init: str = field(
        default="kaiming", metadata=_help("adapter init: kaiming (as PEFT), gaussian, or pissa")
    )
    use_rslora: bool = field(
        default=False, metadata=_help("scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    )
    task: str = field(
        default="icd10-chapter", metadata=_help("built-in task (real data from installed packages)")
    )
    data: str | None = field(
        default=None,
        metadata=_help(
            "JSONL training data ({'messages': [...]} or prompt/completion); replaces the task's training set"
        ),
    )
    eval_data: str | None = field(
        default=None, metadata=_help("JSONL held-out data; the last assistant turn is the reference answer")
    )
    max_length: int = field(
        default=256,
        metadata=_help(
            "truncate samples to this many tokens (samples left without an answer are skipped and counted)"
        ),
    )
    last_turn_only: bool = field(default=False, metadata=_help("train on the last assistant turn only"))
    eval_max_new_tokens: int = field(
        default=24, metadata=_help("greedy tokens generated per held-out question")
    )
    eval_limit: int = field(default=0, metadata=_help("score only the first N held-out items (0 = all)"))
    general_tokens: int = field(
        default=8192, metadata=_help("tokens of general English text (pydoc_data) for the forgetting NLL")
    )
    kl_prompts: int = field(
        default=16, metadata=_help("general prompts for the next-token KL against the base model")
    )
    skip_eval: bool = field(default=False, metadata=_help("train only; no before/after evaluation"))
    base_eval_cache: bool = field(
        default=True,
        metadata=_help(
            "reuse the base model's scores from an earlier run with the same weights, data and evaluation options"
        ),
    )
    loraplus_ratio: float = field(
        default=0.0,
        metadata=_help(
            "LoRA+: B's learning rate = lr * ratio (0 = off; --method loraplus defaults to 16); works with any method that has A/B factors"
        ),
    )
    attention: str = field(
        default="auto",
        metadata=_help(
            "attention kernel: auto (lorakit on CPU, sdpa on GPU), lorakit (grouped-matmul training "
            "kernel, sdpa without gradients), eager, or sdpa"
        ),
    )
    target_rank: int | None = field(
        default=None,
        metadata=_help(
            "AdaLoRA: average rank per layer at the end (default: --rank, so the final budget is LoRA's)"
        ),
    )
    init_rank: int | None = field(
        default=None, metadata=_help("AdaLoRA: rank of every layer at the start (default: 1.5 x target rank)")
    )
    t_init: int | None = field(
        default=None,
        metadata=_help("AdaLoRA: steps before the budget starts to fall (default: max(1, steps // 10))"),
    )
    t_final: int | None = field(
        default=None,
        metadata=_help("AdaLoRA: last steps trained at the fixed final ranks (default: 3 * steps // 10)"),
    )
    delta_t: int | None = field(
        default=None,
        metadata=_help("AdaLoRA: reallocate the ranks every N steps (default: steps // 30, >= 1)"),
    )
    orth_reg_weight: float | None = field(
        default=None,
        metadata=_help("AdaLoRA: weight gamma of the orthogonality penalty on P and Q (default: 0.1)"),
    )
    adalora_beta1: float | None = field(
        default=None, metadata=_help("AdaLoRA: EMA factor of the sensitivity |w * grad| (default: 0.85)")
    )
    adalora_beta2: float | None = field(
        default=None, metadata=_help("AdaLoRA: EMA factor of its uncertainty (default: 0.85)")
    )
    adapter_size: int = field(default=64, metadata=_help("bottleneck adapters: the bottleneck width m"))
    adapter_placement: str = field(
        default="houlsby",
        metadata=_help("bottleneck adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP)"),
    )
    virtual_tokens: int = field(default=20, metadata=_help("prompt / prefix tuning: virtual tokens n"))
    prompt_init_text: str | None = field(
        default=None,
        metadata=_help("prompt tuning: initialise the prompt from this text (default: sampled vocabulary)"),
    )
    prefix_projection: int = field(
        default=0, metadata=_help("prefix tuning: hidden size of the reparameterisation MLP (0 = none)")
    )
    quantize_embeddings: bool = field(
        default=False,
        metadata=_help("qlora: also store the embedding table (and the output head, tied or not) in NF4"),
    )


def method_config(cfg: RunConfig, tokenizer: Any = None) -> Any:
    """The method's config object, built from the run options it understands."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    config_cls = METHODS[cfg.method]
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "init": cfg.init,
        "use_rslora": cfg.use_rslora,
        "target_modules": _targets(cfg.target_modules),
        "exclude_modules": _targets(cfg.exclude_modules),
        "loraplus_ratio": cfg.loraplus_ratio or None,
        "target_rank": cfg.target_rank or cfg.rank,
        "init_rank": cfg.init_rank,
        "t_init": cfg.t_init,
        "t_final": cfg.t_final,
        "delta_t": cfg.delta_t,
        "orth_reg_weight": cfg.orth_reg_weight,
        "beta1": cfg.adalora_beta1,
        "beta2": cfg.adalora_beta2,
        "size": cfg.adapter_size,
        "placement": cfg.adapter_placement,
        "num_virtual_tokens": cfg.virtual_tokens,
        "init_from": "text" if cfg.prompt_init_text else None,
        "init_text": cfg.prompt_init_text,
        "tokenizer": tokenizer,
        "projection_size": cfg.prefix_projection,
        "quantize_embeddings": cfg.quantize_embeddings,
    }
    return config_cls(**{k: v for k, v in values.items() if k in names and v is not None})


def optimizer_groups(
    model: nn.Module, config: Any, cfg: RunConfig, train_cfg: TrainConfig
) -> list[dict[str, Any]]:
    """AdamW groups by role; a method's own lr ratios (LoRA+) or --loraplus-ratio set them."""
    make_ratios = getattr(config, "lr_ratios", None)
    ratios = make_ratios() if callable(make_ratios) else {}
    if cfg.loraplus_ratio and not ratios:
        return loraplus_param_groups(model, train_cfg.lr, cfg.loraplus_ratio, train_cfg.weight_decay)
    return api.param_groups(model, train_cfg.lr, train_cfg.weight_decay, ratios)


def _targets(spec: str | list[str] | None) -> str | list[str] | None:
    """ "all-linear" and regexes stay strings; "q_proj,v_proj" becomes a list of names."""
    if spec is None or isinstance(spec, list) or spec == "all-linear":
        return spec
    if "," in spec or spec.isidentifier():
        return [s.strip() for s in spec.split(",") if s.strip()]
    return spec


@dataclass
class EvalData:
    items: list[EvalItem]
    answer_samples: list[Any]
    texts: list[str]
    prompts: list[str]


def read_data(cfg: RunConfig, seed: int) -> tuple[list[Any], list[EvalItem]]:
    """Training conversations and held-out items; read (and validated) before any model loads,
    so a malformed data line fails in milliseconds, not after the model load."""
    task = load_task(cfg.task, seed=seed) if cfg.data is None or cfg.eval_data is None else None
    train_convs = read_examples(cfg.data) if cfg.data else task.train
    items = _eval_items(cfg.eval_data) if cfg.eval_data else task.eval
    return train_convs, items[: cfg.eval_limit] if cfg.eval_limit else items


def build_data(
    cfg: RunConfig, tokenizer: Any, conversations: tuple[list[Any], list[EvalItem]]
) -> tuple[Any, EvalData]:
    train_convs, items = conversations
    train = build_sft_dataset(tokenizer, train_convs, cfg.max_length, cfg.last_turn_only)
    answers = build_sft_dataset(
        tokenizer,
        [[*it.messages, {"role": "assistant", "content": it.reference}] for it in items],
        cfg.max_length,
    )
    if train.skipped:
        log.warning(
            "skipped %d training sample(s) whose answer was truncated away (max_length=%d)",
            train.skipped,
            cfg.max_length,
        )
    return train, EvalData(items, answers.samples, general_texts(), general_prompts(cfg.kl_prompts))


def _eval_items(path: str) -> list[EvalItem]:
    items = []
    for conv in read_examples(path):
        if conv[-1]["role"] != "assistant":
            raise ValueError(
                f"{path}: every held-out conversation must end with the reference assistant turn"
            )
        items.append(EvalItem(messages=conv[:-1], reference=conv[-1]["content"]))
    return items


def evaluate(
    model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig, reference: Any = None
) -> dict[str, Any]:
    """Task score and forgetting of `model` as it is now."""
    amp = eval_autocast(model)
    started = time.perf_counter()
    match = ev.exact_match(
        model,
        tokenizer,
        data.items,
        score_exact_match,
        max_new_tokens=cfg.eval_max_new_tokens,
        autocast_dtype=amp,
    )
    out: dict[str, Any] = {
        "exact_match": match["accuracy"],
        "correct": match["correct"],
        "n": match["n"],
        "answer_nll": ev.answer_nll(
            model, data.answer_samples, collate, tokenizer.pad_token_id, autocast_dtype=amp
        )["nll"],
        "general_nll": ev.text_nll(
            model, tokenizer, data.texts, max_tokens=cfg.general_tokens, autocast_dtype=amp
        )["nll"],
    }
    out["general_ppl"] = float(torch.tensor(out["general_nll"]).exp())
    if reference is not None:
        out["kl_from_base"] = ev.next_token_kl(model, tokenizer, data.prompts, reference, autocast_dtype=amp)
    out["examples"] = match["examples"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def eval_autocast(model: nn.Module) -> torch.dtype | None:
    """The evaluation dtype: bf16 autocast where the model's device runs it fast. The KL reference
    and the later KL must use the same one, so both come from here."""
    return autocast_dtype("auto", next(model.parameters()).device)


def evaluate_merged(
    model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig, reference: Any
) -> dict[str, Any]:
    """Evaluate with the adapter merged where the method allows it (generation at base speed);
    merging is exact to fp32 rounding, and the model is unmerged again afterwards."""
    try:
        api.merge(model)
    except NotMergeableError:
        return evaluate(model, tokenizer, data, cfg, reference)
    try:
        return evaluate(model, tokenizer, data, cfg, reference)
    finally:
        api.unmerge(model)


def split_options(values: dict[str, Any]) -> tuple[RunConfig, TrainConfig]:
    """One flat dict of options (YAML + flags) -> the two configs; unknown keys are an error."""
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - run_names - train_names)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}; see `lorakit train --help`")
    hints = typing.get_type_hints(RunConfig)
    run = RunConfig(**{k: _coerce(v, hints[k]) for k, v in values.items() if k in run_names})
    train_values = {k: v for k, v in values.items() if k in train_names}
    method_lr = getattr(METHODS.get(run.method), "default_lr", None)
    if "lr" not in train_values and method_lr is not None:  # e.g. prompt tuning 3e-2, full 2e-5
        train_values["lr"] = method_lr
    return run, TrainConfig.from_dict(train_values)


def _coerce(value: Any, hint: Any) -> Any:
    if hint in (float, int) and isinstance(value, str):
        return hint(value)
    return value


def train_run(cfg: RunConfig, train_cfg: TrainConfig, say: Any = print) -> dict[str, Any]:
    """Fine-tune, evaluate before and after, write the adapter, metrics.json and the loss plot."""
    torch.manual_seed(train_cfg.seed)
    out_dir = Path(train_cfg.output_dir)
    if not train_cfg.resume:  # before the model loads; the trainer checks again for library users
        refuse_existing_run(out_dir / "checkpoints")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    conversations = read_data(cfg, train_cfg.seed)
    model, tokenizer = api_load(cfg.model, cfg.attention)
    train, data = build_data(cfg, tokenizer, conversations)
    say(
        f"data: {len(train)} training samples ({train.skipped} skipped: answer truncated away), {len(data.items)} held-out"
    )
    method = method_config(cfg, tokenizer)
    validate = getattr(method, "validate", None)  # e.g. BitFit on a model without biases
    if callable(validate):  # fails before the base evaluation (a minute or more), not after
        validate(model)
    before, reference = _before(model, tokenizer, data, cfg, out_dir, train_cfg.resume, say)
    api.apply(model, method)
    say(api.summary(model))
    trainer = Trainer(
        model,
        train.samples,
        train_cfg,
        collate,
        tokenizer.pad_token_id,
        param_groups=optimizer_groups(model, method, cfg, train_cfg),
        hooks=api.training_hooks(model),
        eval_fn=_held_out_loss(data, tokenizer) if train_cfg.eval_every else None,
        log=say,
    )
    result = trainer.train()
    adapter_dir = api.save_adapter(model, out_dir / "adapter")[0]
    after = None if cfg.skip_eval else evaluate_merged(model, tokenizer, data, cfg, reference)
    metrics = _metrics(
        cfg, train_cfg, before, after, result, train, model, adapter_dir, time.perf_counter() - started
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    say(format_table(before, after))
    say(f"adapter: {adapter_dir}  metrics: {out_dir / 'metrics.json'}  loss plot: {result.plot_path}")
    return metrics


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


def api_load(path: str | None, attention: str = "auto") -> tuple[nn.Module, Any]:
    from .models import load_model

    model, tokenizer = load_model(path)
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


def _before(model, tokenizer, data, cfg, out_dir, resume, say) -> tuple[dict | None, Any]:
    """Base-model metrics and the KL reference. On resume they are read back from the run folder;
    otherwise from the base-evaluation cache when an earlier run evaluated the same weights on the
    same data with the same options (the evaluation is deterministic, so this only saves time:
    about 70 s of every default run). The KL reference is cheap and always recomputed."""
    if cfg.skip_eval:
        return None, None
    cached = out_dir / "metrics_before.json"
    say("evaluating the base model (task score, general-text NLL, KL reference)...")
    reference = ev.reference_next_token_logprobs(
        model, tokenizer, data.prompts, autocast_dtype=eval_autocast(model)
    )
    if resume and cached.is_file():
        return json.loads(cached.read_text()), reference
    shared = base_eval_cache_file(model, tokenizer, data, cfg) if cfg.base_eval_cache else None
    if shared is not None and shared.is_file():
        say(f"base-model scores from the cache {shared} (--no-base-eval-cache to recompute)")
        before = json.loads(shared.read_text())
    else:
        before = evaluate(model, tokenizer, data, cfg)
        if shared is not None:
            atomic_write(shared, lambda tmp: tmp.write_text(json.dumps(before, indent=2) + "\n"))
    cached.write_text(json.dumps(before, indent=2) + "\n")
    return before, reference


def base_eval_cache_file(model: nn.Module, tokenizer: Any, data: EvalData, cfg: RunConfig) -> Path:
    """Where the base evaluation of exactly this model, data and options is cached. The key hashes
    every parameter and buffer (names, shapes, dtypes, bytes), the chat template, the held-out
    items, the general texts and prompts, every evaluation option, the device, the autocast dtype
    and the torch / transformers versions: anything that could change a figure changes the key."""
    import transformers

    from .models import cache_root

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    options = {
        "items": [dataclasses.asdict(it) for it in data.items],
        "texts": data.texts,
        "prompts": data.prompts,
        "template": getattr(tokenizer, "chat_template", None),
        "vocab": len(tokenizer),
        "eval": [cfg.eval_max_new_tokens, cfg.general_tokens, cfg.max_length, _attention_name(model, cfg)],
        "device": str(next(model.parameters()).device),
        "autocast": str(eval_autocast(model)),
        "versions": [torch.__version__, transformers.__version__, _version()],
    }
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    return cache_root().parent / "base-eval" / f"{digest.hexdigest()[:32]}.json"


def _attention_name(model: nn.Module, cfg: RunConfig) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or cfg.attention)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


def _metrics(cfg, train_cfg, before, after, result, train, model, adapter_dir, seconds) -> dict[str, Any]:
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
            "skipped_batches": result.skipped_batches,
            "held_out_curve": result.evals,
            "skipped_samples": train.skipped,
            "samples": len(train),
            "trainable_params": trainable,
            "total_params": total,
        },
        "adapter": str(adapter_dir),
        "total_seconds": round(seconds, 1),
    }


ROWS = [
    ("held-out exact match", "exact_match", "{:.1%}"),
    ("held-out answer NLL (nats/token)", "answer_nll", "{:.3f}"),
    ("general-text NLL (forgetting)", "general_nll", "{:.3f}"),
    ("general-text perplexity", "general_ppl", "{:.2f}"),
    ("next-token KL from the base", "kl_from_base", "{:.4f}"),
]


def format_table(before: dict | None, after: dict | None) -> str:
    if before is None and after is None:
        return "(evaluation skipped)"
    lines = [f"{'metric':<34} {'before':>10} {'after':>10}", "-" * 56]
    for label, key, fmt in ROWS:
        cells = [fmt.format(m[key]) if m and key in m else "-" for m in (before, after)]
        if key == "kl_from_base" and before is not None:
            cells[0] = "0 (base)"
        lines.append(f"{label:<34} {cells[0]:>10} {cells[1]:>10}")
    return "\n".join(lines)
