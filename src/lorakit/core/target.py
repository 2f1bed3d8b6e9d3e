"""Which modules a method adapts: target_modules / exclude_modules, with errors that help.

Rules (the same as Hugging Face PEFT's, except that mistakes are errors here, not silence):
- a list of names: an entry matches a module whose full name equals it or ends with "." + entry;
  every entry must match at least one module (PEFT ignores unknown entries);
- a string: a regular expression that must match the full module name (re.fullmatch);
- "all-linear": every linear layer (nn.Linear, GPT-2 Conv1D) except the output head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

TargetSpec = str | Sequence[str] | None

ALL_LINEAR = "all-linear"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    if getattr(module, "is_quantized_linear", False):  # lorakit.quant.Linear4bit (core imports no quant)
        return True
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_supported(module: nn.Module) -> bool:
    """Layers a low-rank delta can wrap: linear layers and embeddings."""
    return is_linear(module) or isinstance(module, nn.Embedding)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head, which "all-linear" leaves alone (it is tied or huge)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}


def _entry_matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Adaptable modules by full name; an already wrapped layer counts under its own name."""
    from .contract import AdaptedLayer  # local: contract does not import target

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            found[name] = module.base_layer
        elif is_supported(module) and ".base_layer" not in f".{name}":
            found[name] = module
    return found


def _linear_summary(model: nn.Module, limit: int = 12) -> str:
    leaves: list[str] = []
    for name, _ in sorted(candidates(model).items(), key=lambda kv: not is_linear(kv[1])):
        leaf = name.split(".")[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    shown = ", ".join(leaves[:limit]) + (", ..." if len(leaves) > limit else "")
    return shown or "(none: the model has no nn.Linear, Conv1D or nn.Embedding)"


def _select(model: nn.Module, spec: TargetSpec, what: str, candidates: dict[str, nn.Module]) -> set[str]:
    if spec is None:
        return set()
    if isinstance(spec, str):
        if spec.lower() == ALL_LINEAR:
            heads = output_head_names(model)
            return {n for n, m in candidates.items() if is_linear(m) and n not in heads}
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what}={spec!r} is not a valid regular expression: {err}") from err
        return {n for n in candidates if pattern.fullmatch(n)}
    chosen: set[str] = set()
    for entry in spec:
        hits = {n for n in candidates if _entry_matches(entry, n)}
        if not hits:
            other = [n for n, _ in model.named_modules() if n and _entry_matches(entry, n)]
            kind = (
                f" (it names a {type(model.get_submodule(other[0])).__name__}, which cannot be adapted)"
                if other
                else ""
            )
            raise ValueError(
                f"{what} entry {entry!r} matched no module{kind}; "
                f"adaptable modules here include: {_linear_summary(model)}"
            )
        chosen |= hits
    return chosen


def find_targets(
    model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec = None
) -> list[str]:
    """Full names of the modules to adapt, in model order; raises if nothing matches."""
    found = candidates(model)
    chosen = _select(model, target_modules, "target_modules", found)
    chosen -= _select(model, exclude_modules, "exclude_modules", found)
    if not chosen:
        raise ValueError(
            f"no module matched target_modules={target_modules!r}"
            + (f" minus exclude_modules={exclude_modules!r}" if exclude_modules else "")
            + f"; adaptable modules here include: {_linear_summary(model)}. "
            'Use a list of names (e.g. ["q_proj", "v_proj"]), a full-match regex, or "all-linear".'
        )
    return [name for name in found if name in chosen]
