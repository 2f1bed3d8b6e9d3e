"""lorakit: the LoRA family and the other PEFT schools in one small, readable PyTorch library."""

from __future__ import annotations

from typing import Any

from .api import (
    active_adapters,
    adapter_names,
    apply,
    delete_adapter,
    disable_adapters,
    export_lora,
    load_adapter,
    load_as_trained,
    merge,
    merge_and_unload,
    param_groups,
    save_adapter,
    set_active,
    summary,
    trainable_parameters,
    training_hooks,
    unload,
    unmerge,
    weighted_adapters,
)
from .combine import merge_adapters
from .core.contract import AdaptedLayer, Delta, ModelAdapter, NotMergeableError, Role, TrainingHooks
from .core.state import AdapterLoadError
from .methods import (
    METHODS,
    AdaLoRAConfig,
    AdaLoRAScheduleError,
    AdapterConfig,
    ALoRAConfig,
    BitFitConfig,
    DoRAConfig,
    FullFinetuneConfig,
    LoRAConfig,
    LoRAPlusConfig,
    NormTuningConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    loraplus_lr_ratios,
    loraplus_optimizer,
)
from .methods.longlora import LongLoRAConfig
from .methods.mopeft import MoPEFTConfig
from .methods.qlora import QLoRAConfig
from .methods.quantum import QuantumPEFTConfig

__version__ = "0.1.0"


def load_model(path: str | None = None, **kwargs: Any) -> Any:
    """(model, tokenizer): the default SmolLM2-135M-Instruct, or a local Hugging Face folder."""
    from .models import load_model as _load  # transformers is imported only when needed

    return _load(path, **kwargs)


__all__ = [
    "METHODS",
    "AdaLoRAConfig",
    "ALoRAConfig",
    "AdaLoRAScheduleError",
    "AdapterConfig",
    "BitFitConfig",
    "FullFinetuneConfig",
    "ModelAdapter",
    "NormTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "DoRAConfig",
    "LoRAPlusConfig",
    "QLoRAConfig",
    "QuantumPEFTConfig",
    "MoPEFTConfig",
    "LongLoRAConfig",
    "export_lora",
    "merge_adapters",
    "loraplus_lr_ratios",
    "loraplus_optimizer",
    "AdaptedLayer",
    "AdapterLoadError",
    "Delta",
    "LoRAConfig",
    "NotMergeableError",
    "Role",
    "TrainingHooks",
    "active_adapters",
    "adapter_names",
    "apply",
    "delete_adapter",
    "disable_adapters",
    "weighted_adapters",
    "load_adapter",
    "load_as_trained",
    "load_model",
    "merge",
    "merge_and_unload",
    "param_groups",
    "save_adapter",
    "set_active",
    "summary",
    "trainable_parameters",
    "training_hooks",
    "unload",
    "unmerge",
]
