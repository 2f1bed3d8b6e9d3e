"""The method contract: a wrapper that holds the original layer, and the deltas methods add to it.

`AdaptedLayer` wraps a module by composition (`base_layer` is the untouched original), so any torch
model works without edits. Each method contributes a `Delta` per wrapped layer; the layer computes

    out = base_layer(x) + sum(delta(x, base_out, layer) for each active, unmerged delta)

Deltas declare their parameters by role, so optimizer groups (LoRA+), freezing and saving never
match substrings of parameter names.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


class Role(str, Enum):
    """What a trainable tensor is for; optimizers and savers dispatch on this."""

    A = "A"  # down-projection (rank x in)
    B = "B"  # up-projection (out x rank)
    MAGNITUDE = "magnitude"  # DoRA's per-output-unit magnitude
    SINGULAR = "singular"  # AdaLoRA's singular values, Quantum-PEFT's lambda
    ANGLE = "angle"  # Quantum-PEFT's circuit angles
    PROMPT = "prompt"  # virtual-token embeddings / prefixes
    BIAS = "bias"
    NORM = "norm"
    GATE = "gate"  # mixtures: router weights
    FULL = "full"  # a whole base weight (full fine-tuning)
    TOKENS = "tokens"  # rows of the embedding / output head for chosen tokens (vocabulary extension)
    OTHER = "other"


class NotMergeableError(RuntimeError):
    """Raised when merging a method whose output is not a fixed weight change."""


class Delta(nn.Module):
    """One method's contribution to one wrapped layer.

    Subclasses set `roles` (attribute -> Role) and `peft_keys` (attribute -> the key suffix that
    Hugging Face PEFT writes, e.g. "lora_A.weight"), and implement `forward`. Mergeable deltas also
    implement `merged_weight` / `unmerged_weight` on the weight in (out, in) layout.
    """

    roles: ClassVar[dict[str, Role]] = {}
    peft_keys: ClassVar[dict[str, str]] = {}
    mergeable: ClassVar[bool] = True
    # True if the delta needs the base weight kept at full precision (PiSSA adds its principal part
    # back on unwrap): the trainer then leaves that weight in fp32 instead of storing it in bf16
    # (lorakit.train.fast). DoRA reads W0 for its norms but takes them in fp32 from any dtype.
    keeps_base_precision: ClassVar[bool] = False
    # True if the output depends on where each token is (aLoRA's activation start, a router's
    # signal): `core.model.inject` then binds the delta to the model's per-forward context
    # (core/context.py), which `self.context` returns inside forward.
    needs_context: ClassVar[bool] = False
    # False for deltas that are not a PEFT target module (trainable token rows, core/tokens.py):
    # saving leaves them out of `target_modules`.
    is_target: ClassVar[bool] = True

    def forward(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        raise NotImplementedError

    @property
    def context(self) -> Any:
        """The `ForwardContext` of the current decoder call (only for `needs_context` deltas)."""
        holder = self.__dict__.get("_context_holder")
        current = None if holder is None else holder.current
        if current is None:
            raise RuntimeError(
                f"{type(self).__name__} needs to know which tokens it sees, and no decoder call has "
                "set the per-forward context: call the model (or its decoder, model.base_model) "
                "rather than a layer on its own"
            )
        return current

    @property
    def context_value(self) -> Any:
        """What this delta's adapter computed for the current call (its contributor's value)."""
        return self.context.values.get(self.__dict__["_adapter_name"])

    def add_to(self, out: Tensor, x: Tensor, base_out: Tensor, layer: AdaptedLayer) -> Tensor:
        """`out` plus this delta's output; a method may fuse the addition into its last op."""
        return out + self(x, base_out, layer)

    def gated(self, x: Tensor, base_out: Tensor, layer: AdaptedLayer, gate: Tensor) -> Tensor:
        """This delta's output scaled per token by `gate` (..., 1), a mixture's router output
        (methods/mopeft.py); a method may apply it to a smaller tensor inside (LoRA: the rank-r one)."""
        return self(x, base_out, layer) * gate.to(base_out.dtype)

    def prepare_compiled(self, layer: AdaptedLayer) -> None:
        """Called eagerly right before each compiled training call of the decoder layer holding this
        delta (`lorakit.train.compiled`): compute here, outside the traced code, what the forward
        needs and the compiler handles badly (DoRA's weight norms, with their version-keyed caches).
        Whatever it leaves must be dropped by `finish_compiled`. Default: nothing."""

    def finish_compiled(self) -> None:
        """Called after that compiled call (also when it raised): drop what `prepare_compiled` left,
        so no later call reads it stale. Default: nothing."""

    def merged_weight(self, weight: Tensor) -> Tensor:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weight")

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")

    def restore_base(self, weight: Tensor) -> Tensor:
        """The original base weight, for inits that rewrite it (PiSSA). Default: unchanged."""
        return weight

    def base_correction(self, x: Tensor, layer: AdaptedLayer) -> Tensor | None:
        """What to add while this delta is inactive or disabled so the layer computes the original
        base function, for inits that rewrite the base weight (PiSSA). Default: nothing."""
        return None

    def export_state(self) -> dict[str, Tensor]:
        """Tensors to save, keyed by PEFT's suffix (a method may convert them, e.g. PiSSA)."""
        return {suffix: getattr(self, attr).detach() for attr, suffix in self.peft_keys.items()}

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Copy saved tensors in; `core.state` has already checked keys and shapes."""
        with torch.no_grad():
            for attr, suffix in self.peft_keys.items():
                getattr(self, attr).copy_(state[suffix])

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        groups: dict[Role, list[nn.Parameter]] = {}
        for attr, role in self.roles.items():
            groups.setdefault(role, []).append(getattr(self, attr))
        return groups


class AdaptedLayer(nn.Module):
    """A linear-like module (nn.Linear, GPT-2 Conv1D, nn.Embedding) plus named deltas.

    `weight_layout` says how the base stores its weight: "out_in" (nn.Linear) or "in_out"
    (GPT-2's Conv1D, and nn.Embedding whose (num_embeddings, dim) rows act as the input side).
    Deltas always see and return the weight in (out, in) layout.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.weights: dict[str, float] = {}  # adapter -> scale of its output (set by core.weighted)
        self.merged: list[str] = []
        self.enabled = True
        self.replaced = False  # an adapter holds a whole copy of this module (core/copies.py)
        self.weight_layout = _layout(base_layer)
        # A quantized base (lorakit.quant.Linear4bit) is swapped for its full-precision layer while
        # merged (merging into 4 bits would re-quantize); the 4-bit original waits here for unmerge.
        self.register_module("quantized_base", None)
        # A bf16/fp16 base weight cannot take W + dW - dW back exactly; its pre-merge value waits here.
        self._premerge_weight: Tensor | None = None

    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.weight_layout == "out_in" else w.shape[0]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.weight_layout == "out_in" else w.shape[1]

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.base_layer, nn.Embedding)

    @property
    def is_quantized(self) -> bool:
        return callable(getattr(self.base_layer, "dequantized_module", None))

    def weight_out_in(self) -> Tensor:
        """The base weight as an (out, in) fp32 tensor (a copy-free view where possible)."""
        if self.is_quantized:
            return self.base_layer.dequantize(torch.float32)
        w = self.base_layer.weight.detach()
        return (w if self.weight_layout == "out_in" or w.ndim == 1 else w.T).float()

    def set_weight_out_in(self, weight: Tensor) -> None:
        if self.is_quantized:
            raise NotMergeableError(
                "this layer's base weight is stored in 4 bits; writing into it would re-quantize it. "
                "lorakit.merge swaps in the full-precision layer for you, or call "
                "lorakit.quant.dequantize_model(model) first"
            )
        target = self.base_layer.weight
        value = weight if self.weight_layout == "out_in" or weight.ndim == 1 else weight.T
        with torch.no_grad():
            target.copy_(value.to(target.dtype))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        modules = self._modules  # read directly: a decoded token's whole LoRA branch takes ~10 us
        deltas, merged = modules["adapters"]._modules, self.merged
        if len(merged) == len(deltas):  # all folded in: exactly the base layer's cost
            return modules["base_layer"](x, *args, **kwargs)
        active = self.active if self.enabled else ()
        replacing = self._replacing(deltas, active, merged) if self.replaced else None
        if replacing is None:
            out = modules["base_layer"](x, *args, **kwargs)
        else:  # an active adapter's own copy of this module stands in for it (core/copies.py)
            out = deltas[replacing].compute(self, x, *args, **kwargs)
        base_out = out
        weights = self.weights
        for name, delta in deltas.items():
            if name in merged or name == replacing:
                continue
            if name in active:
                if name in weights:  # a per-input router's weighting (lorakit.routing)
                    out = out + weights[name] * delta(x, base_out, self)
                else:
                    out = delta.add_to(out, x, base_out, self)
            elif (correction := delta.base_correction(x, self)) is not None:
                out = out + correction
        return out

    def _replacing(self, deltas: dict[str, Any], active: Any, merged: list[str]) -> str | None:
        """The active, unmerged adapter whose copy of this module computes in its place, if any."""
        live = [n for n in active if n not in merged and getattr(deltas[n], "replaces_output", False)]
        if len(live) > 1:
            raise RuntimeError(
                f"adapters {live} each train their own copy of this module (modules_to_save); "
                "activate one of them at a time"
            )
        if live and live[0] in self.weights:
            raise ValueError(
                f"adapter {live[0]!r} trains a whole copy of this module, which cannot be scaled by a "
                "weight; route or combine adapters without modules_to_save"
            )
        return live[0] if live else None

    def merge(self, name: str) -> None:
        """Fold delta `name` into the base weight; refuses (changing nothing) on NaN/Inf."""
        if name in self.merged:
            raise RuntimeError(f"adapter '{name}' is already merged into this layer")
        if getattr(self.adapters[name], "shares_weight", False):  # a tied head: the embedding's merge
            self.merged.append(name)  # writes the tensor both layers hold
            return
        new = self.adapters[name].merged_weight(self.weight_out_in())
        if not torch.isfinite(new).all():
            raise ValueError(
                f"merging adapter '{name}' would put NaN or Inf into the base weight; "
                "nothing was changed (check the adapter's weights for divergence)"
            )
        if self.is_quantized:
            self.quantized_base = self.base_layer
            self._set_base(self.base_layer.dequantized_module(torch.float32))
        elif not self.merged and self.base_layer.weight.dtype in (torch.bfloat16, torch.float16):
            self._premerge_weight = self.base_layer.weight.detach().clone()
        self.set_weight_out_in(new)
        self.merged.append(name)

    def _set_base(self, module: nn.Module) -> None:
        self.base_layer = module
        self.weight_layout = _layout(module)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            raise RuntimeError(f"adapter '{name}' is not merged into this layer")
        if getattr(self.adapters[name], "shares_weight", False):
            self.merged.remove(name)
            return
        if self.quantized_base is not None and self.merged == [name]:  # back to the exact 4-bit original
            self._set_base(self.quantized_base)
            self.quantized_base = None
        elif self._premerge_weight is not None and self.merged == [name]:  # back to the exact bf16 original
            with torch.no_grad():
                self.base_layer.weight.copy_(self._premerge_weight)
            self._premerge_weight = None
        else:
            self.set_weight_out_in(self.adapters[name].unmerged_weight(self.weight_out_in()))
        self.merged.remove(name)

    def restore_base_weight(self, delta: Delta) -> None:
        """Undo an init-time edit of the base weight (PiSSA); writes nothing when there was none."""
        weight = self.weight_out_in()
        restored = delta.restore_base(weight)
        if restored is not weight:
            self.set_weight_out_in(restored)

    def unwrap(self) -> nn.Module:
        """The original module: merged deltas are unmerged and init-time base edits undone."""
        for name in list(self.merged):
            self.unmerge(name)
        for delta in self.adapters.values():
            self.restore_base_weight(delta)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"


def _layout(base_layer: nn.Module) -> str:
    declared = getattr(base_layer, "weight_layout", None)  # quantized layers say so
    return declared or ("out_in" if isinstance(base_layer, nn.Linear) else "in_out")


@runtime_checkable
class LayerMethodConfig(Protocol):
    """What core needs from a layer method's config (LoRA, DoRA, AdaLoRA, ...)."""

    target_modules: Any
    exclude_modules: Any

    def build(self, layer: AdaptedLayer, path: str) -> Delta: ...

    def to_peft_dict(self) -> dict[str, Any]: ...


class TrainingHooks:
    """Optional callbacks a method gives the trainer; see docs/architecture.md for when each runs.

    A method overrides only what it needs. Extra losses are returned, never added to
    `outputs.loss` behind the user's back, so the trainer can log each term.
    """

    def on_step_start(self, model: nn.Module, step: int) -> None:
        pass

    def micro_batch_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """Terms of what the micro-batch's forward just computed (a router's balance, a gate's
        entropy), called after each forward and before its backward, so their graphs are alive.
        Each is a mean over the micro-batch; the trainer weights it by the micro-batch's share of
        the step's loss tokens, as the task loss, and logs the step's sum under the term's name."""
        return {}

    def extra_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """Terms of the parameters alone (AdaLoRA's orthogonality), once per optimizer step after
        the micro-batches' backward."""
        return {}

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        pass

    def on_train_end(self, model: nn.Module, total_steps: int) -> None:
        pass


class ModelAdapter(nn.Module):
    """A method that acts on the whole model rather than on wrapped layers.

    Two kinds exist: methods that add their own tensors and reach the model through a forward hook
    (prompt and prefix tuning: key/value prefixes in the cache), and methods that train the base
    model's own tensors in place (BitFit, norm tuning, full fine-tuning; `in_weights = True`, their
    change *is* the weights). The adapter lives in the model's `lorakit_adapters` ModuleDict, so its
    own parameters are model parameters that the trainer and checkpoints see by name. `core.model`
    calls `attach` / `detach`, `set_trainable`, `disabled`, and `core.state` calls `export_state` /
    `import_state` / `to_peft_dict`; nothing else is asked of it.
    """

    in_weights: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.enabled = True

    def attach(self, model: nn.Module) -> None:
        """Wire into `model` (register hooks); called once, after the adapter joined the model."""

    def detach(self, model: nn.Module, keep_changes: bool) -> None:
        """Unwire. `keep_changes=False` (delete) must also undo in-place edits of base tensors."""

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        raise NotImplementedError

    def set_trainable(self, trainable: bool) -> None:
        for params in self.role_parameters().values():
            for p in params:
                p.requires_grad_(trainable)

    def disabled(self) -> Any:
        """A context manager during which the model computes its base function."""
        return _Disabled(self)

    def merge_error(self) -> NotMergeableError:
        return NotMergeableError(
            f"{type(self).__name__} cannot be merged: its output is not a fixed change of the base "
            "weights, so it stays a separate module (use lorakit.disable_adapters for the base model)"
        )

    def export_state(self) -> dict[str, Tensor]:
        """Tensors to save, keyed exactly as they are written in the adapter file."""
        raise NotImplementedError

    def import_state(self, state: dict[str, Tensor]) -> None:
        """Copy saved tensors in; `core.state` has already checked keys and shapes."""
        with torch.no_grad():
            for key, tensor in self.export_state().items():
                tensor.copy_(state[key])

    def to_peft_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class _Disabled:
    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter

    def __enter__(self) -> None:
        self.adapter.enabled = False

    def __exit__(self, *exc: object) -> None:
        self.adapter.enabled = True
