"""The public functions (re-exported by `lorakit`): apply, merge, save and load adapters."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .core import model as core
from .core import state
from .methods import LoRAConfig, config_from_peft
from .methods.longlora import check_positions


def apply(model: nn.Module, config: Any, adapter_name: str = "default") -> nn.Module:
    """Add the method `config` describes to `model` in place, make it the active adapter, and
    freeze everything else. Returns the same model."""
    core.add_adapter(model, config, adapter_name)  # model-level configs wire themselves (apply_to)
    core.freeze_base(model)
    core.set_active(model, [adapter_name])
    return model


def save_adapter(
    model: nn.Module, out_dir: str | os.PathLike, adapter_names: Sequence[str] | None = None
) -> list[Path]:
    """Write adapters as Hugging Face PEFT folders (the "default" one at the root)."""
    return state.save_adapter(model, out_dir, adapter_names)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = True
) -> Any:
    """Load a lorakit or PEFT adapter folder onto a plain (or already adapted) model.

    Builds the adapter its config describes, checks every key and shape, and leaves the model as
    it was if anything does not fit. The adapter is active and, unlike PEFT's default, trainable.
    """
    check_positions(model, path)  # a LongLoRA folder needs the positions it was trained with
    config = state.load_adapter(model, path, config_from_peft, adapter_name, trainable)
    core.freeze_base(model)
    return config


def load_as_trained(model: nn.Module, tokenizer: Any, folder: str | os.PathLike) -> tuple[Any, bool]:
    """Load an adapter folder onto the base it was trained on, frozen, as eval, chat and merge do: a
    QLoRA folder's `quantization.json` puts the model in NF4 first (scoring a QLoRA adapter on the
    full-precision base would score a model that was never trained), and a folder with added tokens
    grows the model and brings its tokenizer; a LongLoRA folder's `context.json` extends the
    positions as in training. Returns the tokenizer to use and whether the base was
    quantized."""
    from .methods.longlora import extend_as_trained
    from .methods.qlora import quantize_as_trained
    from .vocab import prepare_for_adapter

    tokenizer = prepare_for_adapter(model, tokenizer, folder)
    extend_as_trained(model, folder)  # a LongLoRA folder's position interpolation
    quantized = quantize_as_trained(model, folder) is not None
    load_adapter(model, folder, trainable=False)
    return tokenizer, quantized


def export_lora(model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write a fixed low-rank adapter (Quantum-PEFT) as a plain PEFT LoRA folder with the same change."""
    return state.save_as_lora(
        model, out_dir, lambda r: LoRAConfig(rank=r, alpha=r).to_peft_dict(), adapter_name
    )


def set_active(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    core.set_active(model, adapter_names)


merge = core.merge
unmerge = core.unmerge
unload = core.unload
merge_and_unload = core.merge_and_unload
delete_adapter = core.delete_adapter
disable_adapters = core.disable_adapters
weighted_adapters = core.weighted
trainable_parameters = core.trainable_parameters
param_groups = core.param_groups
training_hooks = core.training_hooks
summary = core.summary


def adapter_names(model: nn.Module) -> list[str]:
    return list(core.registry(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(core.registry(model).active)
