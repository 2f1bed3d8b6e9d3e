"""Whole modules trained beside an adapter: Hugging Face PEFT's `modules_to_save`.

An adapter may name modules to train whole (LongLoRA trains the embedding and every norm beside its
LoRA). Each gets a trainable copy of its parameters under the adapter's name, and while that adapter
is active the module computes with the copy instead of its own tensors; the base tensors are never
written, so disabling or deleting the adapter gives the base module back, and several adapters can
each keep their own copy (one of them active at a time, as in PEFT).

Names follow PEFT's rule for `modules_to_save`: a module is selected when its full name ends with
one of the given strings (a plain string suffix, so "norm" selects `input_layernorm` too). The folder
holds `base_model.model.<module>.weight` (and `.bias`) and `modules_to_save` in adapter_config.json.
With tied input and output embeddings, a copy of the embedding is also the head's weight, so the
head moves with it; the folder then says `ensure_weight_tying: true` and holds the head's key as
well (the same tensor: PEFT's loader asks for both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .contract import AdaptedLayer, Delta, Role
from .tokens import heads_tied, input_layer_path, output_layer_path

INTERNAL = ("lorakit_adapters", ".adapters.", ".base_layer", ".quantized_base")


class ModuleCopyDelta(Delta):
    """A trainable copy of one module's `weight` (and `bias`) that the module computes with while
    the adapter is active: its output replaces the base module's (`replaces_output`)."""

    is_target: ClassVar[bool] = False  # listed as `modules_to_save`, not as a target module
    replaces_output: ClassVar[bool] = True

    def __init__(self, layer: AdaptedLayer, path: str, tied_to: ModuleCopyDelta | None = None) -> None:
        super().__init__()
        base = layer.base_layer
        own = dict(base.named_parameters(recurse=False))
        if "weight" not in own or set(own) - {"weight", "bias"} or any(base.children()):
            raise ValueError(
                f"{path} ({type(base).__name__}) cannot be trained whole as a module to save: lorakit "
                "copies modules holding a weight (and a bias) and no submodules (embeddings, norms, "
                "linear layers); name those instead"
            )
        self.is_embedding = isinstance(base, nn.Embedding)
        self.__dict__["tied_to"] = tied_to  # outside the module tree: its tensors are the embedding's
        self._before_merge: Tensor | None = None
        role = Role.NORM if own["weight"].ndim == 1 else Role.FULL
        if tied_to is None:
            self.weight = nn.Parameter(own["weight"].detach().float().clone())
            self.bias = (
                None if own.get("bias") is None else nn.Parameter(own["bias"].detach().float().clone())
            )
            keys = {"weight": "weight"} | ({"bias": "bias"} if self.bias is not None else {})
            roles = {"weight": role} | ({"bias": Role.BIAS} if self.bias is not None else {})
        else:  # a tied head: the embedding's copy is its weight, trained and saved there
            if own.get("bias") is not None:
                raise ValueError(f"{path} has a bias; a head tied to the embedding cannot share it")
            self.bias = None
            keys, roles = {"weight": "weight"}, {}  # PEFT's loader wants the head's key too
        self.__dict__["peft_keys"] = keys
        self.__dict__["roles"] = roles

    @property
    def shares_weight(self) -> bool:
        """A tied head: merging writes nothing here, the embedding's merge writes the shared tensor."""
        return self.__dict__["tied_to"] is not None

    @property
    def values(self) -> Tensor:
        return self.__dict__["tied_to"].weight if self.shares_weight else self.weight

    def compute(self, layer: AdaptedLayer, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The module's output with the copy's tensors in place of its own."""
        base, weight = layer.base_layer, self.values
        if self.shares_weight or type(base) is nn.Linear:
            return F.linear(x, weight, self.bias)
        tensors = {"weight": weight} | ({"bias": self.bias} if self.bias is not None else {})
        return functional_call(base, tensors, (x, *args), kwargs)

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        return self.compute(layer, x) - base_out

    def replaced_weight(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) of a head computed from the copy: the fused training loss
        (lorakit.train.loss) uses them as the head's."""
        return self.values, self.bias

    def merged_weight(self, weight: Tensor) -> Tensor:
        self._before_merge = weight.clone()  # a copy replaces: the old value is lost
        value = self.values.detach()
        return (value.T if self.is_embedding else value).to(weight)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        before = self._before_merge
        if before is None:
            raise RuntimeError("this module copy was not merged")
        self._before_merge = None
        return before

    def export_state(self) -> dict[str, Tensor]:
        # a tied head's copy of the tensor: safetensors refuses two keys over one storage
        weight = self.values.detach()
        state = {"weight": weight.clone() if self.shares_weight else weight}
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state

    def import_state(self, state: dict[str, Tensor]) -> None:
        if self.shares_weight:
            return  # the embedding's copy, loaded there (the folder holds the same tensor twice)
        with torch.no_grad():
            self.weight.copy_(state["weight"])
            if self.bias is not None:
                self.bias.copy_(state["bias"])


def module_paths(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The model's modules that PEFT's `modules_to_save` rule selects: full names ending with one of
    `names` (lorakit's own wrappers and copies skipped); a name that selects nothing is an error."""
    modules = [
        (path, module)
        for path, module in model.named_modules()
        if path and not path.startswith(INTERNAL[0]) and not any(part in path for part in INTERNAL[1:])
    ]
    chosen: list[str] = []
    for name in names:
        hits = [p for p, _ in modules if p.endswith(name)]
        if not hits:
            raise ValueError(
                f"modules_to_save: no module name ends with {name!r} (e.g. 'embed_tokens', 'norm', 'lm_head')"
            )
        chosen += [p for p in hits if p not in chosen]
    return chosen


def add_module_copies(
    model: nn.Module, adapter_name: str, names: Sequence[str], tie_head: bool = True
) -> list[str]:
    """Give adapter `adapter_name` a trainable copy of each module `names` selects (PEFT's rule);
    with tied embeddings the head shares the embedding's copy (`tie_head=False`, a PEFT folder saved
    without `ensure_weight_tying`: the head keeps the base weight). Returns the paths given copies."""
    paths = module_paths(model, names)
    embed = input_layer_path(model)
    head = output_layer_path(model)
    tied = heads_tied(model) and tie_head
    if tied and head in paths and embed not in paths:
        raise ValueError(
            f"{head} shares its weight with the input embedding {embed}: train both as one by naming "
            f"the embedding ({embed.rsplit('.', 1)[-1]!r}) in modules_to_save"
        )
    copies: dict[str, ModuleCopyDelta] = {}
    for path in [p for p in paths if p != head or not tied] + ([head] if tied and embed in paths else []):
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
        if adapter_name in layer.adapters:
            raise ValueError(
                f"{path} is already a target of adapter {adapter_name!r}: a module is either adapted "
                "(LoRA, token rows, ...) or trained whole, not both"
            )
        tied_to = copies.get(embed) if tied and path == head else None
        delta = ModuleCopyDelta(layer, path, tied_to)
        if layer is not module:
            model.set_submodule(path, layer)
        layer.adapters[adapter_name] = delta
        layer.replaced = True
        layer.train(module.training)
        copies[path] = delta
    return list(copies)


def copy_settings(deltas: Sequence[Delta], names: Sequence[str] | None) -> dict[str, Any]:
    """adapter_config.json fields for an adapter's deltas: `modules_to_save` (the names it was given)
    and PEFT's `ensure_weight_tying` when the head shares the embedding's copy; {} without copies."""
    copies = [d for d in deltas if isinstance(d, ModuleCopyDelta)]
    if not copies:
        return {}
    return {"modules_to_save": list(names or []), "ensure_weight_tying": any(d.shares_weight for d in copies)}
