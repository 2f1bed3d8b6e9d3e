"""The family members, each a config class; this table is where names from the CLI, YAML and
adapter_config.json become types (strings stay at the edges)."""

from __future__ import annotations

from typing import Any

from .adalora import AdaLoRAConfig
from .adalora_budget import AdaLoRAScheduleError, RankAllocator
from .adapter import AdapterConfig
from .alora import ALoRAConfig
from .dora import DoRAConfig
from .inplace import IN_PLACE, BitFitConfig, FullFinetuneConfig, NormTuningConfig
from .longlora import LongLoRAConfig
from .lora import LoRAConfig
from .loraplus import LoRAPlusConfig, loraplus_lr_ratios, loraplus_optimizer, loraplus_param_groups
from .mopeft import MoPEFTConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .qlora import QLoRAConfig
from .quantum import QuantumPEFTConfig

# CLI / YAML method name -> config class. Later members add one line each.
METHODS: dict[str, type] = {
    "lora": LoRAConfig,
    "dora": DoRAConfig,
    "loraplus": LoRAPlusConfig,
    "adalora": AdaLoRAConfig,
    "alora": ALoRAConfig,
    "qlora": QLoRAConfig,
    "adapter": AdapterConfig,
    "prompt": PromptTuningConfig,
    "prefix": PrefixTuningConfig,
    "bitfit": BitFitConfig,
    "norm": NormTuningConfig,
    "full": FullFinetuneConfig,
    "quantum": QuantumPEFTConfig,
    "mopeft": MoPEFTConfig,
    "longlora": LongLoRAConfig,
}


def config_from_peft(d: dict[str, Any]) -> Any:
    """The lorakit config an `adapter_config.json` (PEFT's or ours) describes."""
    peft_type = str(d.get("peft_type", "")).upper()
    if peft_type == "LORA":
        if d.get("alora_invocation_tokens"):
            if d.get("use_dora"):
                raise ValueError("this adapter combines aLoRA and DoRA; lorakit's aLoRA is LoRA-based")
            return ALoRAConfig.from_peft_dict(d)
        return (DoRAConfig if d.get("use_dora") else LoRAConfig).from_peft_dict(d)
    if peft_type == "ADALORA":
        return AdaLoRAConfig.from_peft_dict(d)
    if peft_type in IN_PLACE:
        return IN_PLACE[peft_type]()
    other = {
        c.peft_type: c
        for c in (AdapterConfig, PromptTuningConfig, PrefixTuningConfig, QuantumPEFTConfig, MoPEFTConfig)
    }
    if peft_type in other:
        return other[peft_type].from_peft_dict(d)
    supported = ", ".join(["LORA", "ADALORA", *other, *IN_PLACE])
    raise ValueError(
        f"adapter_config.json has peft_type={d.get('peft_type')!r}; this lorakit reads: {supported}"
    )


__all__ = [
    "METHODS",
    "AdaLoRAConfig",
    "ALoRAConfig",
    "AdaLoRAScheduleError",
    "RankAllocator",
    "AdapterConfig",
    "BitFitConfig",
    "FullFinetuneConfig",
    "NormTuningConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "DoRAConfig",
    "LoRAConfig",
    "LoRAPlusConfig",
    "QLoRAConfig",
    "QuantumPEFTConfig",
    "MoPEFTConfig",
    "config_from_peft",
    "loraplus_lr_ratios",
    "loraplus_optimizer",
    "loraplus_param_groups",
]
