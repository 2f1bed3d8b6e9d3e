"""Every option of a run (`RunConfig`, plus the trainer's `TrainConfig`) and how the YAML keys and
flags become them: one flat dict in, two configs out, each value checked and named when it is bad.
The CLI builds its flags from these fields, so a flag and a YAML key are the same name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import api
from .methods import METHODS, loraplus_param_groups
from .train import TrainConfig
from .train.config import coerce_option


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
    recipe: str = field(
        default="auto",
        metadata=_help(
            "auto: on a CPU without native bf16 (training in fp32) LoRA's default run is the light "
            "recipe (100 steps at lr 2e-3, about three quarters of the standard run's time), elsewhere the "
            "standard one; standard; light (lorakit.recipe)"
        ),
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
            "training data, replacing the task's: JSONL, JSON, CSV, Parquet or a datasets folder, with "
            "OpenAI messages, prompt/completion, ShareGPT or Alpaca records (detected)"
        ),
    )
    eval_data: str | None = field(
        default=None,
        metadata=_help("held-out data, as --data; the last assistant turn is the reference answer"),
    )
    forgetting_data: str | None = field(
        default=None,
        metadata=_help(
            "a UTF-8 text file of general prose to measure forgetting on (default: Python's pydoc topics)"
        ),
    )
    replay: str | None = field(
        default="chatterbot:0.125",
        metadata=_help(
            "SOURCE:RATIO: mix general data into every batch against forgetting; SOURCE is chatterbot "
            "(chatterbot-corpus's English chat, trivia excluded) or a data file, RATIO the share of each "
            "batch in [0, 1), e.g. chatterbot:0.25; none to switch it off (docs/forgetting.md)"
        ),
    )
    add_tokens: str | None = field(
        default=None,
        metadata=_help(
            "extend the vocabulary: a file of tokens (one per line; a JSON string keeps spaces), or auto "
            "(the --vocab-max-new strings that save the most tokens on the training data, as `lorakit "
            "vocab` lists them); their embedding rows train with the method"
        ),
    )
    vocab_max_new: int = field(default=500, metadata=_help("--add-tokens auto: how many tokens to add"))
    vocab_min_count: int = field(
        default=5, metadata=_help("--add-tokens auto: a string must occur this often in the training data")
    )
    token_init: str = field(
        default="mean",
        metadata=_help(
            "new tokens' rows: mean (of the pieces each replaces), random (the embedding's spread) or "
            "average (of all rows)"
        ),
    )
    columns: str | None = field(
        default=None,
        metadata=_help(
            "read these keys from other columns: NAME=COLUMN,... (e.g. prompt=question,completion=answer)"
        ),
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
    general_questions: int = field(
        default=120,
        metadata=_help(
            "general trivia questions (chatterbot-corpus) scored before and after, a forgetting probe "
            "that is not perplexity; 0 = off"
        ),
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
    device: str = field(
        default="auto",
        metadata=_help(
            "where to train and evaluate: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
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
    virtual_tokens: int = field(
        default=20, metadata=_help("prompt / prefix tuning, mopeft's prefix expert: virtual tokens n")
    )
    prompt_init_text: str | None = field(
        default=None,
        metadata=_help("prompt tuning: initialise the prompt from this text (default: sampled vocabulary)"),
    )
    prefix_projection: int = field(
        default=0, metadata=_help("prefix tuning: hidden size of the reparameterisation MLP (0 = none)")
    )
    invocation: str | None = field(
        default=None,
        metadata=_help(
            "aLoRA: the text that switches the adapter on (default: the chat template's assistant "
            "header, so only answers are adapted)"
        ),
    )
    circuit_layers: int = field(
        default=2, metadata=_help("Quantum-PEFT: L, the entangling layers of each factor's circuit")
    )
    nonpow2: str = field(
        default="qr",
        metadata=_help("Quantum-PEFT: dimensions that are not powers of two: qr (orthonormal) or truncate"),
    )
    experts: str = field(
        default="lora,adapter",
        metadata=_help(
            "mopeft: the methods mixed in every layer, from lora, dora, adapter, prefix (comma-separated)"
        ),
    )
    gate: str = field(
        default="sigmoid",
        metadata=_help("mopeft: sigmoid (independent gates), softmax (with a null expert) or topk"),
    )
    top_k: int = field(default=1, metadata=_help("mopeft with --gate topk: slots kept per token"))
    balance_weight: float = field(
        default=0.01, metadata=_help("mopeft with softmax/topk gates: weight of the balancing loss")
    )
    quantize_embeddings: bool = field(
        default=False,
        metadata=_help("qlora: also store the embedding table (and the output head, tied or not) in NF4"),
    )
    modules_to_save: str | None = field(
        default=None,
        metadata=_help(
            "LoRA-family methods: modules trained whole beside the adapter, by PEFT's rule (names that "
            "module names end with, comma-separated, e.g. embed_tokens,norm; none: no module); longlora: embed_tokens,norm"
        ),
    )
    context: int = field(
        default=0,
        metadata=_help(
            "longlora: the new context window in tokens (position interpolation from the model's own); "
            "0 keeps the window"
        ),
    )
    rope: str = field(
        default="linear", metadata=_help("longlora: position interpolation, linear (the paper's) or yarn")
    )
    long_eval_lengths: str | None = field(
        default=None,
        metadata=_help(
            "--task wiki: perplexity and passkey lengths in tokens, comma-separated (default: the "
            "model's window and the training length)"
        ),
    )
    long_eval_tokens: int = field(
        default=0,
        metadata=_help(
            "--task wiki: held-out tokens scored at each length (default: one row of the longest)"
        ),
    )
    passkey_per_depth: int = field(
        default=1,
        metadata=_help(
            "--task wiki: passkey prompts per depth (10%%, 50%%, 90%%) and length; 0 skips the test"
        ),
    )
    s2_ratio: float = field(
        default=0.25,
        metadata=_help(
            "longlora: S2-Attn group size as a share of the sequence in training (0: dense attention)"
        ),
    )


# Run option -> the method-config fields that use it (any one of them; the first gets its value);
# the other run options are generic. `method_config` passes these on, `check_method_options`
# refuses one the chosen method has no field for.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "rank": ("rank",),
    "alpha": ("alpha",),
    "dropout": ("dropout",),
    "init": ("init",),
    "use_rslora": ("use_rslora",),
    "target_modules": ("target_modules",),
    "exclude_modules": ("exclude_modules",),
    "loraplus_ratio": ("loraplus_ratio", "rank"),  # any method with A/B factors
    "target_rank": ("target_rank",),
    "init_rank": ("init_rank",),
    "t_init": ("t_init",),
    "t_final": ("t_final",),
    "delta_t": ("delta_t",),
    "orth_reg_weight": ("orth_reg_weight",),
    "adalora_beta1": ("beta1",),
    "adalora_beta2": ("beta2",),
    "adapter_size": ("size",),
    "adapter_placement": ("placement",),
    "virtual_tokens": ("num_virtual_tokens",),
    "prompt_init_text": ("init_text",),
    "prefix_projection": ("projection_size",),
    "quantize_embeddings": ("quantize_embeddings",),
    "invocation": ("invocation",),
    "circuit_layers": ("layers",),
    "nonpow2": ("nonpow2",),
    "experts": ("experts",),
    "gate": ("gate",),
    "top_k": ("top_k",),
    "balance_weight": ("balance_weight",),
    "modules_to_save": ("modules_to_save",),
    "context": ("context",),
    "rope": ("rope",),
    "s2_ratio": ("s2_ratio",),
}


def name_value_pairs(text: str, flag: str) -> dict[str, str]:
    """A flag's NAME=VALUE,... as a dict; a malformed pair is an error naming the flag."""
    pairs = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{flag} takes NAME=VALUE pairs separated by commas, got {item!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def column_map(text: str | None) -> dict[str, str] | None:
    """--columns NAME=COLUMN,... as a dict (None when not given)."""
    return name_value_pairs(text, "--columns") if text else None


def method_config(cfg: RunConfig, tokenizer: Any = None, seed: int | None = None) -> Any:
    """The method's config object, built from the run options it understands; `seed` (the run's
    --seed) seeds the random init of methods that keep their own generator (prompt, prefix and
    Quantum-PEFT; the others draw from torch's global one, which the run seeds too)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    config_cls = METHODS[cfg.method]
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {fields[0]: getattr(cfg, option) for option, fields in METHOD_OPTIONS.items()}
    values.update(  # the options that are not passed on as they are
        target_modules=_targets(cfg.target_modules),
        exclude_modules=_targets(cfg.exclude_modules),
        modules_to_save=_module_list(cfg.modules_to_save),
        loraplus_ratio=cfg.loraplus_ratio or None,  # 0 = off
        target_rank=cfg.target_rank or cfg.rank,
        init_from="text" if cfg.prompt_init_text else None,
        tokenizer=tokenizer,
        seed=seed,
    )
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


def _module_list(spec: str | None) -> list[str] | None:
    """--modules-to-save: comma-separated names; "none" trains no whole module (longlora: LoRA only)."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return []
    return [m.strip() for m in spec.split(",") if m.strip()]


def _targets(spec: str | list[str] | None) -> str | list[str] | None:
    """ "all-linear" and regexes stay strings; "q_proj,v_proj" becomes a list of names."""
    if spec is None or isinstance(spec, list) or spec == "all-linear":
        return spec
    if "," in spec or spec.isidentifier():
        return [s.strip() for s in spec.split(",") if s.strip()]
    return spec


def split_options(values: dict[str, Any]) -> tuple[RunConfig, TrainConfig]:
    """One flat dict of options (YAML + flags) -> the two configs; unknown keys are an error, and so
    is a value of the wrong type or an option the chosen method does not use."""
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - run_names - train_names)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}; see `lorakit train --help`")
    hints = typing.get_type_hints(RunConfig)
    for name in ("target_modules", "exclude_modules"):  # YAML lists of module names
        if isinstance(values.get(name), list) and all(isinstance(v, str) for v in values[name]):
            values = {**values, name: ",".join(values[name])}
    given = [k for k in values if k in run_names]
    method_defaults = getattr(METHODS.get(values.get("method", "lora")), "run_defaults", {})
    values = {**method_defaults, **values}  # e.g. Quantum-PEFT's alpha 1 where LoRA's is 32
    run = RunConfig(**{k: coerce_option(k, v, hints[k]) for k, v in values.items() if k in run_names})
    check_method_options(run.method, given)
    train_values = {k: v for k, v in values.items() if k in train_names}
    method_lr = getattr(METHODS.get(run.method), "default_lr", None)
    if "lr" not in train_values and method_lr is not None:  # e.g. prompt tuning 3e-2, full 2e-5
        train_values["lr"] = method_lr
    return run, TrainConfig.from_dict(train_values)


def check_method_options(method: str, given: list[str]) -> None:
    """Refuse options the user set that `method` would ignore (--rank with --method norm, say)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(METHODS[method])}
    ignored = [
        name
        for name in given
        if name in METHOD_OPTIONS and not any(target in fields for target in METHOD_OPTIONS[name])
    ]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ValueError(
            f"{flags} {'does' if len(ignored) == 1 else 'do'} not apply to --method {method} "
            f"({METHODS[method].__name__} has no such setting) and would be ignored; remove "
            f"{'it' if len(ignored) == 1 else 'them'} or pick a method that uses "
            f"{'it' if len(ignored) == 1 else 'them'}"
        )
