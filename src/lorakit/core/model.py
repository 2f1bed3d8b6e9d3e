"""Adapters on a whole model: inject, activate, disable, merge, unmerge, unload, delete.

The model keeps one registry attribute, `_lorakit` (adapter name -> config, and the active names),
so any torch module works without being subclassed or wrapped in a model-level class.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .context import drop_contributor, holder_of
from .contract import AdaptedLayer, Delta, LayerMethodConfig, ModelAdapter, Role, TrainingHooks
from .copies import add_module_copies
from .target import find_targets


@dataclass
class Registry:
    configs: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # A vocabulary extension (lorakit.vocab.VocabularyExtension): `files()` -> {name: content} is
    # written into every saved adapter folder that trains token rows (its tokenizer and record).
    vocabulary: Any = None


def registry(model: nn.Module) -> Registry:
    reg = model.__dict__.get("_lorakit")
    if reg is None:
        reg = Registry()
        model.__dict__["_lorakit"] = reg
    return reg


def adapters_row_problem(model: nn.Module) -> str | None:
    """Why an adapter on `model` would not compute a row laid out as several samples, or as a
    shared prefix's cache plus a sample's rest, as it computes the sample alone (its config's
    `packing_problem`: aLoRA's invocation search, virtual tokens before each row), or None."""
    for name, config in registry(model).configs.items():
        reason = getattr(type(config), "packing_problem", None)
        if reason:
            return f"adapter {name!r} ({type(config).__name__}): {reason}"
    return None


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_deltas(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, AdaptedLayer, Delta]]:
    for path, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            yield path, layer, layer.adapters[adapter_name]


CONTAINER = "lorakit_adapters"  # the model's ModuleDict of model-level adapters


def model_adapters(model: nn.Module) -> Iterator[tuple[str, ModelAdapter]]:
    """Model-level adapters (prompt/prefix tuning, BitFit, norm tuning, full fine-tuning)."""
    container = model._modules.get(CONTAINER)
    yield from (container.items() if container is not None else ())


def add_adapter(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Add an adapter of any kind: model-level configs wire themselves (`apply_to`), layer configs
    are injected into their target modules."""
    apply_to = getattr(config, "apply_to", None)
    if callable(apply_to):
        apply_to(model, adapter_name)
    else:
        inject(model, config, adapter_name)


def attach_model_adapter(model: nn.Module, config: Any, adapter: ModelAdapter, adapter_name: str) -> None:
    """Register a model-level adapter under `adapter_name` and let it wire itself in."""
    check_new_name(model, adapter_name)
    if CONTAINER not in model._modules:
        model.add_module(CONTAINER, nn.ModuleDict())
    model._modules[CONTAINER][adapter_name] = adapter
    registry(model).configs[adapter_name] = config
    try:
        adapter.attach(model)
    except Exception:
        delete_adapter(model, adapter_name)
        raise


def _claimed_base_parameters(model: nn.Module) -> set[int]:
    """Base-model tensors that in-place methods (BitFit, full fine-tuning) train."""
    return {
        id(p)
        for _, adapter in model_adapters(model)
        for params in adapter.role_parameters().values()
        for p in params
    }


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def check_new_name(model: nn.Module, name: str) -> None:
    """A new adapter's name: unused, and a plain name, since it becomes a subfolder when saved (an
    absolute path or "../x" would write outside the output folder) and a module key (no dots)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not a plain name; use letters, digits, '_' and '-' (up to 64, "
            "not starting with '-'), e.g. 'default' or 'icd-lora'"
        )
    if name in registry(model).configs:
        raise ValueError(f"an adapter named {name!r} already exists; delete it or pick another name")


def _check_name(model: nn.Module, name: str) -> None:
    if name not in registry(model).configs:
        known = ", ".join(registry(model).configs) or "none"
        raise KeyError(f"no adapter named {name!r} on this model; adapters here: {known}")


def inject(model: nn.Module, config: LayerMethodConfig, adapter_name: str) -> list[str]:
    """Wrap the config's target modules and give each a delta named `adapter_name`."""
    check_new_name(model, adapter_name)
    select = getattr(config, "select_targets", None)  # a config whose parts target different layers
    if callable(select):
        paths = select(model)
    else:
        paths = find_targets(model, config.target_modules, getattr(config, "exclude_modules", None))
    registry(model).configs[adapter_name] = config
    try:
        for path in paths:
            module = model.get_submodule(path)
            layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module)
            if layer is not module:
                model.set_submodule(path, layer)
            delta = config.build(layer, path)
            layer.adapters[adapter_name] = delta
            # new modules start in training mode; follow the model's, or adapters on a model put
            # in eval() before apply() would run dropout (and skip eval caches) at inference
            layer.train(module.training)
            if delta.needs_context:
                _bind_context(model, config, adapter_name, layer, delta)
        copies = getattr(config, "modules_to_save", None)  # whole modules trained beside the deltas
        if copies:
            add_module_copies(model, adapter_name, copies, getattr(config, "ensure_weight_tying", True))
    except Exception:
        delete_adapter(model, adapter_name)
        raise
    return paths


def _bind_context(model: nn.Module, config: Any, name: str, layer: AdaptedLayer, delta: Delta) -> None:
    """Give a context-reading delta the model's per-forward context (core/context.py), and register
    what its config computes per call (`config.context_contributor(name)`, if it has one)."""
    holder = holder_of(model)
    delta.__dict__["_context_holder"] = holder  # outside the module tree: the model owns the holder
    delta.__dict__["_adapter_name"] = name
    holder.members.setdefault(name, []).append(delta)
    make = getattr(config, "context_contributor", None)
    if callable(make) and name not in holder.contributors:
        holder.contributors[name] = make(name)
        holder.is_on[name] = lambda: layer.enabled and name in layer.active and name not in layer.merged


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly these adapters active (their outputs add up); only active adapters train."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _check_name(model, name)
    registry(model).active = names
    for _, layer in adapted_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
        for adapter, delta in layer.adapters.items():
            delta.requires_grad_(adapter in names)
    for name, adapter in model_adapters(model):
        adapter.active = name in names
        adapter.set_trainable(name in names)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that does not belong to an adapter (a delta, a model-level adapter,
    or a base tensor an in-place method trains; `set_active` decides those)."""
    claimed = _claimed_base_parameters(model)
    for module in model.modules():
        if isinstance(module, (Delta, ModelAdapter)):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in claimed:
                p.requires_grad_(False)


def delete_adapter(model: nn.Module, adapter_name: str, keep_changes: bool = False) -> None:
    """Remove an adapter everywhere; a layer left with no adapter becomes the original module.
    In-place methods put the original tensors back unless `keep_changes` (they were never changed,
    say, because a load failed before copying anything in)."""
    for path, layer, delta in list(adapter_deltas(model, adapter_name)):
        if adapter_name in layer.merged:
            layer.unmerge(adapter_name)
        layer.restore_base_weight(delta)
        del layer.adapters[adapter_name]
        layer.active = [n for n in layer.active if n != adapter_name]
        if not layer.adapters:
            model.set_submodule(path, layer.base_layer)
    container = model._modules.get(CONTAINER)
    if container is not None and adapter_name in container:
        container[adapter_name].detach(model, keep_changes=keep_changes)
        del container[adapter_name]
        if not len(container):
            del model._modules[CONTAINER]
    reg = registry(model)
    reg.configs.pop(adapter_name, None)
    reg.active = [n for n in reg.active if n != adapter_name]
    drop_contributor(model, adapter_name)


@contextmanager
def weighted(model: nn.Module, weights: dict[str, float]) -> Iterator[None]:
    """Run layer adapters `weights` together, each one's output scaled by its weight (a weighted sum
    of their changes), then restore the active set. Merged or model-level adapters cannot be scaled
    per call and are refused."""
    for name in weights:
        _check_name(model, name)
    if any(name in dict(model_adapters(model)) for name in weights):
        raise ValueError("only layer adapters (LoRA, DoRA, ...) can be weighted; prompt/prefix tuning cannot")
    layers = [layer for _, layer in adapted_layers(model)]
    if any(name in layer.merged for layer in layers for name in weights):
        raise ValueError("a merged adapter cannot be weighted per call; unmerge it first")
    previous = list(registry(model).active)
    set_active(model, list(weights))
    for layer in layers:
        layer.weights = {n: float(w) for n, w in weights.items() if n in layer.adapters and w != 1.0}
    try:
        yield
    finally:
        for layer in layers:
            layer.weights = {}
        set_active(model, previous)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: merged adapters are unmerged for the duration, then merged back."""
    with ExitStack() as stack:
        for _, adapter in model_adapters(model):
            stack.enter_context(adapter.disabled())
        with _layers_disabled(model):
            yield


@contextmanager
def _layers_disabled(model: nn.Module) -> Iterator[None]:
    layers = [layer for _, layer in adapted_layers(model)]
    remerge = [(layer, list(layer.merged)) for layer in layers]
    for layer, names in remerge:
        for name in reversed(names):
            layer.unmerge(name)
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True
        for layer, names in remerge:
            for name in names:
                layer.merge(name)


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Fold the active (or named) adapters into the base weights; all or nothing.

    Every merged weight is computed and checked before any is written, so a NaN/Inf anywhere
    leaves the model bit-for-bit unchanged (subtracting a delta back would not be exact).
    """
    names = list(adapter_names) if adapter_names is not None else list(registry(model).active)
    for name in names:
        _check_name(model, name)
    for name, adapter in model_adapters(model):
        if name in names:
            raise adapter.merge_error()
    for name in names:
        for path, layer, delta in adapter_deltas(model, name):
            if name in layer.merged:
                raise RuntimeError(f"adapter {name!r} is already merged into {path}")
            if not torch.isfinite(delta.merged_weight(layer.weight_out_in())).all():
                raise ValueError(
                    f"merging adapter {name!r} would put NaN or Inf into {path}; nothing was changed "
                    "(check the adapter's weights for divergence)"
                )
    for name in names:
        for _, layer, _ in adapter_deltas(model, name):
            layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Undo every merge; raises if nothing is merged."""
    merged = [(layer, name) for _, layer in adapted_layers(model) for name in layer.merged]
    if not merged:
        raise RuntimeError("no adapter is merged into this model; nothing to unmerge")
    for layer, name in reversed(merged):
        layer.unmerge(name)


def unload(model: nn.Module) -> nn.Module:
    """Remove every lorakit module and return the plain model (in place).

    What is merged stays merged (so `merge` then `unload` gives a model with the adapter folded
    in); unmerged adapters are dropped and any base-weight edit of their init is undone.
    """
    for path, layer in list(adapted_layers(model)):
        for name, delta in layer.adapters.items():
            if name not in layer.merged:
                layer.restore_base_weight(delta)
        model.set_submodule(path, layer.base_layer)
    for _, adapter in model_adapters(model):
        adapter.detach(model, keep_changes=True)
        adapter.set_trainable(False)
    model._modules.pop(CONTAINER, None)
    for name in list(registry(model).configs):
        drop_contributor(model, name)
    model.__dict__.pop("_lorakit", None)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge what is unmerged, then unload. A model-level adapter whose change is not in the
    weights (prompt, prefix) would be silently dropped by unload, so it is refused instead."""
    for name, adapter in model_adapters(model):
        if name in registry(model).active and not adapter.in_weights:
            raise adapter.merge_error()
    merge(model, [n for n in registry(model).active if _has_unmerged(model, n)])
    return unload(model)


def _has_unmerged(model: nn.Module, name: str) -> bool:
    return any(name not in layer.merged for _, layer, _ in adapter_deltas(model, name))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    lr_ratios: dict[Role, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups by declared role: each role's lr is lr * lr_ratios.get(role, 1).

    Trainable parameters outside any delta (model-level methods, full fine-tuning) get Role.OTHER.
    """
    ratios = lr_ratios or {}
    by_role: dict[Role, list[nn.Parameter]] = {}
    claimed: set[int] = set()
    for module in model.modules():
        if isinstance(module, (Delta, ModelAdapter)):
            for role, params in module.role_parameters().items():
                # a delta made of deltas (MoPEFT's mixture and its experts) is met twice in the walk:
                # each parameter goes to the first role that claims it
                live = [p for p in params if p.requires_grad and id(p) not in claimed]
                by_role.setdefault(role, []).extend(live)
                claimed.update(id(p) for p in params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    if rest:
        by_role.setdefault(Role.OTHER, []).extend(rest)
    return [
        {
            "params": ps,
            "lr": lr * ratios.get(role, 1.0),
            "weight_decay": weight_decay,
            "role": role.value,
        }
        for role, ps in by_role.items()
        if ps
    ]


def training_hooks(model: nn.Module) -> list[TrainingHooks]:
    hooks = []
    for name, config in registry(model).configs.items():
        make = getattr(config, "training_hooks", None)
        hook = make(model, name) if callable(make) else None
        if hook is not None:
            hooks.append(hook)
    return hooks


def adapter_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each adapter's config as plain values (its type and every compared field), for a checkpoint
    to record and a resume to compare: a changed alpha or target list must not resume silently."""
    settings = {}
    for name, config in registry(model).configs.items():
        values: dict[str, Any] = {"type": type(config).__name__}
        if dataclasses.is_dataclass(config):
            for f in dataclasses.fields(config):
                if f.compare:
                    values[f.name] = _plain(getattr(config, f.name))
        settings[name] = values
    return settings


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "value", None) or repr(value)  # enums by value, the rest as text


def summary(model: nn.Module) -> str:
    """A readable account: adapters, which modules they adapt, trainable / total, adapter bytes."""
    trainable, total = trainable_parameters(model)
    lines = []
    for name, config in registry(model).configs.items():
        deltas = list(adapter_deltas(model, name))
        leaves = sorted({path.split(".")[-1] for path, _, _ in deltas})
        n_bytes = sum(p.numel() * p.element_size() for _, _, d in deltas for p in d.parameters())
        state = "active" if name in registry(model).active else "inactive"
        adapter = dict(model_adapters(model)).get(name)
        if adapter is not None:
            tensors = adapter.export_state().values()
            n_bytes = sum(t.numel() * t.element_size() for t in tensors)
            where = f"whole model ({len(tensors)} tensors)"
        else:
            where = f"{len(deltas)} modules [{', '.join(leaves)}]"
        lines.append(
            f"adapter {name!r} ({type(config).__name__}, {state}): {where}, "
            f"{n_bytes:,} bytes ({n_bytes / 2**20:.2f} MiB)"
        )
    pct = 100.0 * trainable / max(total, 1)
    lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable: {pct:.4f}%")
    return "\n".join(lines)
