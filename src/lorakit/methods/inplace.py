"""Methods that train the base model's own tensors in place: BitFit, norm tuning, full fine-tuning.

- BitFit (Ben Zaken, Ravfogel, Goldberg, ACL 2022, arXiv 2106.10199): only the bias terms train
  (every linear and LayerNorm bias). Llama-family models have no bias anywhere, so BitFit on them
  is refused with an explanation rather than silently training nothing.
- Norm tuning: only the normalization weights (and biases) train: LayerNorm / RMSNorm. It is the
  nearest bias-like knob a Llama model has (a per-channel scale after every norm); PEFT calls it
  LN tuning (Qi et al., "Parameter-efficient tuning ... via LayerNorm", arXiv 2403.20284).
- Full fine-tuning: every parameter trains; the baseline every PEFT method is compared with.

Nothing is added to the forward pass, so generation costs exactly what the base model costs. The
change *is* the weights: there is nothing to merge (`lorakit.merge` says so), `lorakit.unload`
returns the tuned model, and the adapter file holds the trained tensors under PEFT-style keys
(`base_model.model.<parameter name>`). BitFit and norm tuning keep a copy of the original tensors
(tiny), so `disable_adapters` and `delete_adapter` give the base model back; full fine-tuning keeps
none (it would double the model's memory), so those two raise instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.contract import ModelAdapter, NotMergeableError, Role
from ..core.model import attach_model_adapter
from ..core.state import PREFIX

Select = Callable[[nn.Module], list[tuple[str, nn.Parameter]]]


class InPlaceAdapter(ModelAdapter):
    """Trains `params` (named base-model parameters) where they are; see the module docstring."""

    in_weights: ClassVar[bool] = True

    def __init__(
        self, method: str, role: Role, params: list[tuple[str, nn.Parameter]], keep_original: bool
    ) -> None:
        super().__init__()
        self.method, self.role, self.keep_original = method, role, keep_original
        self.names = [name for name, _ in params]
        self._params = [p for _, p in params]  # a plain list: the base model owns these tensors
        for i, (_, p) in enumerate(params):
            if keep_original:
                self.register_buffer(f"original_{i}", p.detach().clone(), persistent=False)

    def role_parameters(self) -> dict[Role, list[nn.Parameter]]:
        return {self.role: list(self._params)}

    def _originals(self) -> list[Tensor]:
        if not self.keep_original:
            raise RuntimeError(
                f"{self.method} changes the base weights in place and keeps no copy of them (that "
                "would double the model's memory), so there is no base model to switch back to; "
                "load a second copy of the base model to compare with"
            )
        return [getattr(self, f"original_{i}") for i in range(len(self._params))]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        originals = self._originals()
        tuned = [p.detach().clone() for p in self._params]
        self._copy_in(originals)
        try:
            yield
        finally:
            self._copy_in(tuned)

    def _copy_in(self, values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self._params, values, strict=True):
                p.copy_(value)

    def detach(self, model: nn.Module, keep_changes: bool) -> None:
        if not keep_changes:  # delete_adapter: the base model comes back
            self._copy_in(self._originals())

    def merge_error(self) -> NotMergeableError:
        return NotMergeableError(
            f"{self.method} trains the base model's tensors in place: its change is already in the "
            "weights, so there is nothing to merge (lorakit.unload(model) returns the tuned model)"
        )

    def export_state(self) -> dict[str, Tensor]:
        return {f"{PREFIX}{name}": p.detach() for name, p in zip(self.names, self._params, strict=True)}

    def to_peft_dict(self) -> dict[str, Any]:
        return {"peft_type": self.method_type, "task_type": "CAUSAL_LM", "tensors": len(self.names)}

    @property
    def method_type(self) -> str:
        return {"BitFit": "BITFIT", "norm tuning": "NORM_TUNING", "full fine-tuning": "FULL"}[self.method]


def _unique_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, attribute, parameter); tied tensors once, lorakit's own skipped."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if module_name.split(".")[0] == "lorakit_adapters":
            continue
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{module_name}.{attr}" if module_name else attr, module, attr, p


def _is_norm(module: nn.Module) -> bool:
    # transformers defines one RMSNorm class per architecture (LlamaRMSNorm, ...), so go by type name
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm")
    )


@dataclass
class BitFitConfig:
    """Train only the bias terms (linear and LayerNorm biases); refuses models with none."""

    peft_type: ClassVar[str] = "BITFIT"
    in_place: ClassVar[bool] = True  # the base weights themselves train: no base to compare with
    default_lr: ClassVar[float] = 1e-3  # BitFit's paper searched 1e-4..1e-3 for BERT

    def validate(self, model: nn.Module) -> None:
        """Raise, before any work, if the model has no bias to train."""
        self._biases(model)

    def _biases(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        params = [(n, p) for n, _, attr, p in _unique_parameters(model) if attr == "bias"]
        if not params:
            norms = sum(p.numel() for _, m, _, p in _unique_parameters(model) if _is_norm(m))
            raise ValueError(
                f"BitFit trains only bias terms, and this {type(model).__name__} has none (Llama-"
                "family models use no bias in their linear layers or RMSNorms), so it would train "
                f"nothing. Tune the normalization weights instead: --method norm "
                f"(lorakit.NormTuningConfig, {norms:,} parameters here), or use a method that adds "
                "parameters (LoRA, bottleneck adapters)"
            )
        return params

    def apply_to(self, model: nn.Module, name: str) -> None:
        params = self._biases(model)
        attach_model_adapter(
            model, self, InPlaceAdapter("BitFit", Role.BIAS, params, keep_original=True), name
        )


@dataclass
class NormTuningConfig:
    """Train only the normalization layers' weights and biases (LayerNorm, RMSNorm)."""

    peft_type: ClassVar[str] = "NORM_TUNING"
    in_place: ClassVar[bool] = True  # the base weights themselves train: no base to compare with
    default_lr: ClassVar[float] = 1e-3

    def apply_to(self, model: nn.Module, name: str) -> None:
        params = [(n, p) for n, m, _, p in _unique_parameters(model) if _is_norm(m)]
        if not params:
            raise ValueError(
                f"norm tuning found no LayerNorm / RMSNorm module in {type(model).__name__}; "
                "nothing would train"
            )
        attach_model_adapter(
            model, self, InPlaceAdapter("norm tuning", Role.NORM, params, keep_original=True), name
        )


@dataclass
class FullFinetuneConfig:
    """Train every parameter (tied tensors once): the baseline for every PEFT method."""

    peft_type: ClassVar[str] = "FULL"
    in_place: ClassVar[bool] = True  # the base weights themselves train: no base to compare with
    default_lr: ClassVar[float] = 2e-5  # full fine-tuning of a 135M chat model: ~50x below LoRA's

    def apply_to(self, model: nn.Module, name: str) -> None:
        params = [(n, p) for n, _, _, p in _unique_parameters(model)]
        attach_model_adapter(
            model, self, InPlaceAdapter("full fine-tuning", Role.FULL, params, keep_original=False), name
        )


IN_PLACE = {"BITFIT": BitFitConfig, "NORM_TUNING": NormTuningConfig, "FULL": FullFinetuneConfig}
