"""The training options, one dataclass that the CLI turns into --flags and YAML fills by key.

Every field carries `metadata={"help": ...}` so the CLI can build its parser from the fields alone,
and `from_dict` refuses unknown keys so a typo in a YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "bf16", "fp32"]
Compile = Literal["auto", "on", "off"]
Allocator = Literal["fast", "lean"]

SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
COMPILES: tuple[str, ...] = typing.get_args(Compile)
ALLOCATORS: tuple[str, ...] = typing.get_args(Allocator)

# Options that change the numbers a run produces: a checkpoint written with other values cannot be
# resumed into a run that equals an uninterrupted one. The others (where and how often to log,
# micro-batching, activation checkpointing) may change between an interruption and its resume.
TRAJECTORY_FIELDS: tuple[str, ...] = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "schedule",
    "max_grad_norm",
    "seed",
    "precision",
    "kl_to_base",
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


REPORT_TO = ("none", "tensorboard")
SHARE_PREFIX = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Options of one supervised fine-tuning run; defaults fit a short LoRA run on a CPU."""

    steps: int = field(default=150, metadata=_help("number of optimizer steps to run"))
    batch_size: int = field(
        default=16, metadata=_help("samples per optimizer step (summed over micro-batches)")
    )
    micro_batch_size: int = field(
        default=8,
        metadata=_help("samples per forward/backward; batch_size / micro_batch_size = accumulation"),
    )
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (groups may set their own lr)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay"))
    warmup_ratio: float = field(
        default=0.05, metadata=_help("fraction of the steps with a linear warm-up from ~0 to lr")
    )
    schedule: Schedule = field(
        default="cosine", metadata=_help("decay after warm-up: cosine, linear or constant")
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_help("clip the global gradient norm to this; 0 disables clipping")
    )
    seed: int = field(
        default=0, metadata=_help("seed of the data order, dropout and the adapter's random init")
    )
    precision: Precision = field(
        default="auto",
        metadata=_help("auto (bf16 autocast where the device has fast bf16), bf16 or fp32"),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations in backward to save memory")
    )
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "under torchrun / accelerate launch: shard the frozen base and the adapter with FSDP2 "
            "(fully_shard per decoder layer) instead of DDP's whole copy per process; LoRA and DoRA"
        ),
    )
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "adamw, or paged_adamw: AdamW states in pinned host memory (CUDA) or a memory-mapped file (CPU), paged in per group at step"
        ),
    )
    checkpoint_every: int = field(
        default=50, metadata=_help("save a resumable checkpoint every N steps; 0 = only at the end")
    )
    keep_checkpoints: int = field(
        default=2, metadata=_help("how many recent checkpoints to keep; 0 keeps all")
    )
    eval_every: int = field(
        default=0, metadata=_help("call the evaluation every N steps; 0 = only at the end")
    )
    log_every: int = field(default=1, metadata=_help("write a log.jsonl line every N steps"))
    loss_chunk_size: int = field(
        default=0,
        metadata=_help("loss-token rows per lm_head chunk (bounds logits memory); 0 = about 24 MB of logits"),
    )
    fast_kernels: bool = field(
        default=True,
        metadata=_help(
            "lorakit's training preparation: grouped attention (CPU), RMSNorm outputs cast once, frozen "
            "linear weights stored in the autocast dtype, compiled decoder layers (lorakit.train.fast)"
        ),
    )
    compile: Compile = field(
        default="auto",
        metadata=_help(
            "torch.compile the decoder layers for training: auto = on a CPU with a C++ compiler, for "
            "models of 50M+ parameters and runs of 1,000+ forward/backward passes (the first step "
            "compiles: ~20 s with a warm cache, ~115 s cold on 2 cores); on; off"
        ),
    )
    allocator: Allocator = field(
        default="fast",
        metadata=_help(
            "CPU memory (glibc): fast keeps freed memory for reuse; lean hands blocks of 256 KB and "
            "more back to the OS when freed: on the default task's fp32 batches 0.87-0.90x the peak "
            "memory at 1.33-1.43x the step time as the lorakit command runs (0.77x at 1.33x with "
            "glibc's small-block caches on; docs/benchmarks.md)"
        ),
    )
    progress_bar: bool = field(default=True, metadata=_help("show a tqdm progress bar"))
    kl_to_base: float = field(
        default=0.0,
        metadata=_help(
            "weight of a KL(base || model) term on the positions that carry no task loss (prompts, and "
            "every position of replay samples); the base is the model with its adapters switched off"
        ),
    )
    packing: int = field(
        default=0,
        metadata=_help(
            "pack each micro-batch's samples into rows of up to N tokens (at least its longest sample), "
            "attention kept within each sample and positions restarting, instead of padding every "
            "sample to the longest; 0 = off"
        ),
    )
    share_prefix: str = field(
        default="auto",
        metadata=_help(
            "compute the prompt prefix a micro-batch's samples share (system prompt, instruction) once "
            "per row, every sample's rest attending to it: the same loss and gradients from fewer "
            "tokens; rows of up to --packing tokens (0: one row per micro-batch). auto: on unless the "
            "method, a custom collate or --kl-to-base rules it out (the run says which); on; off"
        ),
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "also log to: none, or tensorboard (event files in OUTPUT_DIR/tensorboard; needs tensorboard)"
        ),
    )
    output_dir: str = field(
        default="runs/lorakit", metadata=_help("folder for log.jsonl, loss.png and checkpoints")
    )
    resume: bool = field(
        default=False, metadata=_help("continue from the latest complete checkpoint in output_dir")
    )

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []
        for name in ("steps", "batch_size", "micro_batch_size", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)} must be at least 1")
        for name in (
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every",
            "max_grad_norm",
            "loss_chunk_size",
        ):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)} must be >= 0 (0 disables it)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            p.append(f"lr={self.lr} must be a positive number (with lr=0 the adapter would train nothing)")
        if self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size:
            p.append(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size="
                f"{self.micro_batch_size}; pick a micro_batch_size that divides it"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule={self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            p.append(f"precision={self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.compile not in COMPILES:
            p.append(f"compile={self.compile!r}; expected one of {', '.join(COMPILES)}")
        if self.allocator not in ALLOCATORS:
            p.append(f"allocator={self.allocator!r}; expected one of {', '.join(ALLOCATORS)}")
        if self.report_to not in REPORT_TO:
            p.append(f"report_to={self.report_to!r}; expected one of {', '.join(REPORT_TO)}")
        elif self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            p.append("report_to='tensorboard' needs the tensorboard package: pip install tensorboard")
        if not (self.kl_to_base >= 0 and math.isfinite(self.kl_to_base)):
            p.append(f"kl_to_base={self.kl_to_base}; expected a weight >= 0")
        if self.packing < 0:
            p.append(f"packing={self.packing}; expected a row length in tokens, or 0 for off")
        elif self.packing and self.kl_to_base:
            p.append("packing with kl_to_base: the KL term's base pass reads padded rows")
        if self.share_prefix not in SHARE_PREFIX:
            p.append(f"share_prefix={self.share_prefix!r}; expected one of {', '.join(SHARE_PREFIX)}")
        elif self.share_prefix == "on" and self.kl_to_base:
            p.append("share_prefix='on' with kl_to_base: the KL term's base pass reads padded rows")
        if self.optimizer not in ("adamw", "paged_adamw"):
            p.append(f"optimizer={self.optimizer!r}; expected adamw or paged_adamw")
        return p

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from YAML/CLI values; numbers written as strings ("1e-3" in YAML) are converted."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"unknown TrainConfig option(s): {', '.join(unknown)}; valid options are: {', '.join(names)}"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{k: coerce_option(k, v, hints[k]) for k, v in values.items()})


def coerce_option(name: str, value: Any, hint: Any, where: str = "option") -> Any:
    """`value` as the type `hint` names, or a ValueError naming the option, the value and the type.

    YAML gives loose types (1e-3 is a string in YAML 1.1, `on` a boolean); those convert. A value
    that does not fit (`rank: eight`, `steps: 2.5`, `lr: [1]`) is an error here, not later.
    """
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if typing.get_origin(hint) is Literal:
        if typing.get_args(hint) == COMPILES and isinstance(value, bool):
            return "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as a boolean
        return value  # the choices are checked where the option is used, with the list
    base = args[0] if args and typing.get_origin(hint) is not Literal else hint
    kind = getattr(base, "__name__", str(base))
    try:
        converted = _convert(value, base)
    except (ValueError, KeyError, TypeError, OverflowError):
        converted = None
    if converted is None:
        raise ValueError(
            f"{where} {name}={value!r} is not a valid {kind}; write it as {_EXAMPLES.get(kind, 'a ' + kind)}"
        )
    return converted


_EXAMPLES = {"int": "a whole number (e.g. 8)", "float": "a number (e.g. 1e-3)", "bool": "true or false"}


def _convert(value: Any, base: Any) -> Any:
    """The converted value, or None when it does not fit."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return {"true": True, "false": False, "1": True, "0": False}[value.strip().lower()]
        return None
    if isinstance(value, bool):
        return None  # True is an int in Python, not a number a user meant
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, str) else None
    if base is float:
        return float(value) if isinstance(value, (int, float, str)) else None
    if base is str:
        return value if isinstance(value, str) else None
    return value
