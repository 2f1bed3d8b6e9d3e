"""Position interpolation: a model trained on a window of W tokens, stretched to N = s * W.

RoPE rotates query/key pair i at position p by p * f_i. Linear interpolation (Chen et al. 2023, the
one LongLoRA uses) divides every frequency by s, so position p of the longer window looks like p / s
of the trained one; YaRN (Peng et al. 2023) scales low frequencies only and tempers attention.
transformers computes the frequencies when the rotary module is built, from
`config.rope_parameters`; `extend_context` writes the new parameters there (rope_theta kept) and
rebuilds every rotary module of the model, so a model already loaded is extended the same way as one
built from the edited config. `rope_of(config)` is what an adapter folder records so the same
model is rebuilt on load.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

KINDS = ("linear", "yarn")
ORIGINAL_WINDOW = "lorakit_original_window"  # on the config (and so in config.json)


def original_window(config: Any) -> int:
    """The window the model was trained on, before any extension recorded in its config."""
    recorded = getattr(config, ORIGINAL_WINDOW, None)  # set by extend_context (linear keeps no record)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return int(recorded or rope.get("original_max_position_embeddings") or config.max_position_embeddings)


def extend_context(model: nn.Module, length: int, kind: str = "linear") -> float:
    """Stretch `model`'s RoPE positions to `length` tokens; returns the factor s = length / window
    (rounded up to a whole number, as LongLoRA's code does). A length inside the window is refused."""
    if kind not in KINDS:
        raise ValueError(f"position interpolation must be one of {', '.join(KINDS)}, got {kind!r}")
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope or "rope_theta" not in rope:
        raise ValueError(f"{type(model).__name__} has no rotary position parameters to interpolate")
    if rope.get("rope_type", "default") not in ("default", *KINDS):
        raise ValueError(
            f"the model already uses {rope['rope_type']!r} positions; extend it from its original config"
        )
    window = original_window(config)
    if length <= window:
        raise ValueError(
            f"--context {length} is not beyond the model's window of {window} tokens; extension needs "
            f"a longer one (e.g. {2 * window} or {4 * window})"
        )
    factor = float(math.ceil(length / window))
    new = {"rope_theta": rope["rope_theta"], "rope_type": kind, "factor": factor}
    if kind == "yarn":
        new["original_max_position_embeddings"] = window
    config.rope_parameters = new
    setattr(config, ORIGINAL_WINDOW, window)
    config.max_position_embeddings = int(window * factor)
    rebuild_rotary(model)
    return factor


def rebuild_rotary(model: nn.Module) -> None:
    """Rebuild every rotary-embedding module from the model's (edited) config, on its device."""
    found = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                device = child.inv_freq.device
                parent.add_module(name, type(child)(model.config).to(device))
                found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to rebuild")


def rope_of(config: Any) -> dict[str, Any]:
    """The position settings an extended model's adapter folder records."""
    return {
        "rope_parameters": dict(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
    }
