"""The key/value cache of a Hugging Face model, named as the installed transformers names it.

transformers 5.24 renamed the decoder's `past_key_values` argument and output field to `cache`.
The old argument is a deprecated alias that is *dropped* when both are given (5.24's
`LlamaForCausalLM` always passes `cache=`, so a pre-hook that adds `past_key_values` was silently
ignored), and the old output field warns. Nothing here relies on the deprecated names: each call
asks the module it talks to which name its own `forward` declares.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# Newest first: the first name a forward declares is the one it reads.
CACHE_ARGUMENTS = ("cache", "past_key_values")
# What a decoder layer may receive the cache as (older releases and GPT-2 used the last two).
LAYER_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_argument(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes the KV cache ("cache" from transformers 5.24)."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return "past_key_values"  # a forward of **kwargs only (tests' fakes, wrappers)


def output_cache(output: Any) -> Any:
    """The cache a forward returned: the `cache` field from 5.24 on, `past_key_values` before."""
    fields = getattr(output, "__dataclass_fields__", None) or {}
    if "cache" in fields:
        return output.cache
    return output.past_key_values
