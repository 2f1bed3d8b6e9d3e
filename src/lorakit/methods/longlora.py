"""LongLoRA (Chen, Qian, Tang, Lai, Liu, Han, Jia, ICLR 2024, arXiv 2309.12307): a longer context
for a trained model, cheaply.

Three parts, each its own piece of lorakit:
- position interpolation to the new window (lorakit.long.positions: linear, as the paper, or YaRN),
  set on the model before the adapter is built;
- LoRA on q, k, v and o plus the embedding and every norm trained whole (the paper's "LoRA+",
  not the LoRA+ learning-rate method): `modules_to_save`, core/copies.py. With tied embeddings the
  output head is the embedding, so it moves with it;
- shifted sparse attention in training only (lorakit.train.s2_attention, causal, unlike the
  authors' roll-based code); evaluation and generation keep full attention.

The adapter folder is a PEFT LoRA folder (`modules_to_save`, `ensure_weight_tying` when tied) plus
`context.json`, the position settings it was trained with. `lorakit eval/chat/merge` read that file
and extend the base the same way before loading (`extend_as_trained`); `lorakit.load_adapter`
refuses the folder on a model whose positions differ. PEFT cannot represent the positions: set
`rope_parameters` and `max_position_embeddings` from context.json on the base config first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..core.model import check_new_name, inject
from ..core.target import TargetSpec, find_targets
from ..long.positions import KINDS, ORIGINAL_WINDOW, extend_context, original_window, rope_of
from .lora import LoRAConfig

RECORD = "context.json"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINED_WHOLE = ["embed_tokens", "norm"]


@dataclass
class LongLoRAConfig(LoRAConfig):
    """LoRA on q/k/v/o (rank 8, alpha 16, as the paper), the embedding and norms trained whole, the
    positions interpolated to `context` tokens (0: keep the model's window) and S2-Attn with groups
    of `s2_ratio` of the sequence in training (0: dense attention, for comparison)."""

    rank: int = 8
    alpha: float = 16
    target_modules: TargetSpec = field(default_factory=lambda: list(QKVO))
    modules_to_save: list[str] | None = field(default_factory=lambda: list(TRAINED_WHOLE))
    context: int = 0
    rope: str = "linear"
    s2_ratio: float = 0.25

    peft_type: ClassVar[str] = "LORA"  # the folder is a LoRA folder; context.json holds the rest
    # below LoRA's 1e-3: the embedding and norms train whole (the paper used 2e-5 on 7B models);
    # not tuned here yet
    default_lr: ClassVar[float] = 2e-4
    fsdp_problem: ClassVar[str | None] = (
        "it trains the embedding and the norms whole beside the LoRA (modules_to_save), which are not "
        "sharded here; train it with DDP (leave out --fsdp)"
    )
    packing_problem: ClassVar[str | None] = (
        "S2-Attn groups a row's tokens by position, across the samples of a packed row; it trains "
        "long documents one per row anyway"
    )
    # the paper's LoRA settings, and activation checkpointing (it trains with it: from 4k tokens on
    # the activations are most of the memory)
    # `lorakit train --method longlora`: long Wikipedia articles packed into rows of --context tokens
    # (lorakit.long.run), one row per step (raise --batch-size to accumulate)
    run_defaults: ClassVar[dict[str, Any]] = {
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ",".join(QKVO),
        "gradient_checkpointing": True,
        "task": "wiki",
        "batch_size": 1,
        "micro_batch_size": 1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rope not in KINDS:
            raise ValueError(f"rope must be one of {', '.join(KINDS)}, got {self.rope!r}")
        if not (self.s2_ratio == 0 or 0 < self.s2_ratio <= 0.5):
            raise ValueError(f"s2_ratio must be 0 (dense attention) or in (0, 0.5], got {self.s2_ratio}")
        if self.context < 0:
            raise ValueError(f"context must be a number of tokens (0 = keep the window), got {self.context}")
        if self.context and self.s2_ratio and self.context % self.multiple:
            raise ValueError(
                f"--context {self.context} does not split into whole S2-Attn groups of {self.s2_ratio:g} "
                f"of the sequence with half-group shifts: use a multiple of {self.multiple} (e.g. "
                f"{self.context // self.multiple * self.multiple or self.multiple})"
            )

    @property
    def multiple(self) -> int:
        """Sequence lengths S2-Attn takes: whole, even groups of s2_ratio * N tokens."""
        return int(round(2 / self.s2_ratio)) if self.s2_ratio else 1

    def apply_to(self, model: nn.Module, adapter_name: str) -> None:
        """Interpolate the positions, switch training to S2-Attn, then inject; all or nothing: the
        model's positions and attention are put back if any part fails."""
        check_new_name(model, adapter_name)
        find_targets(model, self.target_modules, self.exclude_modules)
        config = model.config
        saved = (
            dict(config.rope_parameters or {}),
            config.max_position_embeddings,
            getattr(config, ORIGINAL_WINDOW, None),
            getattr(config, "_attn_implementation", None),
        )
        try:
            if self.context:
                self._extend(model)
            if self.s2_ratio:
                from ..train.s2_attention import use_s2_attention

                use_s2_attention(model, self.s2_ratio)
            inject(model, self, adapter_name)
        except BaseException:
            _restore(model, *saved)
            raise

    def _extend(self, model: nn.Module) -> None:
        config = model.config
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":  # extended already (a second adapter, say)
            if config.max_position_embeddings >= self.context and rope.get("rope_type") == self.rope:
                return
            raise ValueError(
                f"the model's positions are already extended ({rope.get('rope_type')}, factor "
                f"{rope.get('factor')}, window {config.max_position_embeddings}); --context {self.context} "
                f"with {self.rope} needs the base model's own positions: load it again"
            )
        extend_context(model, self.context, self.rope)

    def context_record(self, model: nn.Module) -> dict[str, Any]:
        return {
            **rope_of(model.config),
            "original_window": original_window(model.config),
            "context": self.context,
            "s2_ratio": self.s2_ratio,
        }

    def extra_files_for(self, model: nn.Module) -> dict[str, str]:
        """context.json, when the positions were extended (a LongLoRA run at the model's own window
        is an ordinary LoRA folder with modules_to_save)."""
        if not self.context:
            return {}
        return {RECORD: json.dumps(self.context_record(model), indent=2, sort_keys=True) + "\n"}


def _restore(model: nn.Module, rope: dict[str, Any], window: int, original: Any, attention: Any) -> None:
    from ..long.positions import rebuild_rotary

    config = model.config
    if dict(config.rope_parameters or {}) != rope:
        config.rope_parameters = rope
        config.max_position_embeddings = window
        if original is None and hasattr(config, ORIGINAL_WINDOW):
            delattr(config, ORIGINAL_WINDOW)
        rebuild_rotary(model)
    if attention is not None and getattr(config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's context.json, or None for a folder trained at the model's own positions."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        rope = dict(record["rope_parameters"])
        int(record["max_position_embeddings"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a lorakit context record ({type(err).__name__}: {err})") from None
    if rope.get("rope_type") not in KINDS:
        raise ValueError(
            f"{path}: rope_type {rope.get('rope_type')!r}; this lorakit reads {', '.join(KINDS)}"
        )
    return record


def positions_match(model: nn.Module, record: dict[str, Any]) -> bool:
    config = model.config
    return dict(getattr(config, "rope_parameters", None) or {}) == dict(
        record["rope_parameters"]
    ) and config.max_position_embeddings == int(record["max_position_embeddings"])


def check_positions(model: nn.Module, folder: str | os.PathLike) -> None:
    """Refuse a folder trained at extended positions on a model without them (the adapter would run
    at positions it never saw, inside the original window too)."""
    record = read_record(folder)
    if record is None or positions_match(model, record):
        return
    rope = record["rope_parameters"]
    raise ValueError(
        f"{folder} was trained with {rope.get('rope_type')} position interpolation (factor "
        f"{rope.get('factor')}, window {record['max_position_embeddings']}) and this model's positions "
        f"differ; extend it first: lorakit.methods.longlora.extend_as_trained(model, {str(folder)!r}) "
        "(lorakit eval/chat/merge and lorakit.load_as_trained do this)"
    )


def extend_as_trained(model: nn.Module, folder: str | os.PathLike) -> dict[str, Any] | None:
    """Give `model` the positions the folder was trained with (from its context.json); returns the
    record, or None when the folder has none. A model extended otherwise is refused."""
    record = read_record(folder)
    if record is None or positions_match(model, record):
        return record
    rope = dict(record["rope_parameters"])
    recorded, own = record.get("original_window"), original_window(model.config)
    if recorded and int(recorded) != own:
        raise ValueError(
            f"{folder} extends a model of window {recorded}; this one's is {own}: it is not the base "
            "the adapter was trained on"
        )
    extend_context(model, int(record["max_position_embeddings"]), str(rope["rope_type"]))
    if not positions_match(model, record):
        raise ValueError(f"{folder}: extending this model does not reproduce the recorded positions {rope}")
    return record
