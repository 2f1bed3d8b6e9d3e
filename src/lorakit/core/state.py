"""Adapter folders in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<suffix>` (e.g. `...q_proj.lora_A.weight`); the adapter
named "default" is written at the folder's root and any other in a subfolder of its name, as PEFT
does. Loading is all or nothing: every key and shape is checked before the model keeps anything,
and pickle files are refused (unpickling can run arbitrary code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .io import atomic_write
from .model import adapter_deltas, add_adapter, delete_adapter, model_adapters, registry, set_active
from .target import candidates

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded; the model was left as it was."""


def _target_list(model: nn.Module, paths: list[str]) -> list[str]:
    """The shortest PEFT `target_modules` list that selects exactly `paths`."""
    leaves = sorted({p.split(".")[-1] for p in paths})
    selected = {name for name in candidates(model) if name.split(".")[-1] in leaves}
    return leaves if selected == set(paths) else sorted(paths)


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    return {
        f"{PREFIX}{path}.{suffix}": tensor.detach().to("cpu", torch.float32).contiguous()
        for path, _, delta in adapter_deltas(model, adapter_name)
        for suffix, tensor in delta.export_state().items()
    }


def save_adapter(
    model: nn.Module, out_dir: str | os.PathLike, adapter_names: Sequence[str] | None = None
) -> list[Path]:
    """Save adapters as PEFT folders; returns the folders written."""
    names = list(adapter_names) if adapter_names is not None else list(registry(model).configs)
    if not names:
        raise ValueError("this model has no lorakit adapter to save; call lorakit.apply first")
    written = []
    for name in names:
        config = registry(model).configs.get(name)
        if config is None:
            raise KeyError(f"no adapter named {name!r}; adapters here: {list(registry(model).configs)}")
        folder = Path(out_dir) if name == "default" else Path(out_dir) / name
        adapter = dict(model_adapters(model)).get(name)
        if adapter is not None:  # model-level: its own keys (PEFT's "prompt_embeddings") and config
            tensors = {
                k: t.detach().to("cpu", torch.float32).contiguous() for k, t in adapter.export_state().items()
            }
            _write_folder(folder, tensors, adapter.to_peft_dict())
            written.append(folder)
            continue
        deltas = list(adapter_deltas(model, name))
        peft_config = config.to_peft_dict()
        peft_config["target_modules"] = _target_list(model, [p for p, _, _ in deltas])
        peft_config["exclude_modules"] = None
        if any(_stores_in_out(layer) for _, layer, _ in deltas):
            peft_config["fan_in_fan_out"] = True  # GPT-2 Conv1D stores its weight as (in, out)
        make_extra = getattr(config, "extra_files", None)  # e.g. QLoRA's record of its 4-bit base
        extra = make_extra() if callable(make_extra) else {}
        _write_folder(folder, adapter_tensors(model, name), peft_config, extra)
        written.append(folder)
    return written


def _stores_in_out(layer: Any) -> bool:
    """GPT-2's Conv1D stores (in, out), also when lorakit.quant holds it in 4 bits as (out, in)."""
    original_in_out = getattr(layer.base_layer, "from_conv1d", False)
    return original_in_out or (layer.weight_layout == "in_out" and not layer.is_embedding)


def _write_folder(
    folder: Path, tensors: dict[str, Tensor], peft_config: dict[str, Any], extra: dict[str, str] | None = None
) -> None:
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    for file_name, content in (extra or {}).items():
        atomic_write(folder / file_name, lambda tmp, content=content: Path(tmp).write_text(content))


def _refuse_pickle(path: Path) -> None:
    raise AdapterLoadError(
        f"{path} is a pickle file; lorakit loads safetensors only, because unpickling can run "
        "arbitrary code. Convert it once where you trust it: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
    )


def read_adapter_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config dict and tensors of an adapter folder (or of its .safetensors file)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights = path if path.suffix == ".safetensors" else folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {folder} does not exist")
    if not weights.is_file():
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(pickles[0])
        raise AdapterLoadError(f"{folder} has no {WEIGHTS_NAME}; is it an adapter folder?")
    config_path = folder / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterLoadError(f"{folder} has no {CONFIG_NAME}; an adapter folder needs both files") from None
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{config_path} is not valid JSON: {err}") from None
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for bad headers and truncation
        raise AdapterLoadError(
            f"{weights} is not a readable safetensors file (corrupt or truncated?): {err}"
        ) from None
    return config, tensors


def _expected(model: nn.Module, name: str) -> dict[str, tuple[Any, str, torch.Size]]:
    adapter = dict(model_adapters(model)).get(name)
    if adapter is not None:
        return {key: (adapter, key, tensor.shape) for key, tensor in adapter.export_state().items()}
    return {
        f"{PREFIX}{path}.{suffix}": (delta, suffix, tensor.shape)
        for path, _, delta in adapter_deltas(model, name)
        for suffix, tensor in delta.export_state().items()
    }


def _check_keys(expected: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    for key in sorted(set(expected) & set(tensors)):
        want = tuple(expected[key][2])
        if tuple(tensors[key].shape) != want:
            module = key.removeprefix(PREFIX).rsplit(".", 2)[0]
            problems.append(
                f"shape mismatch in {module}: {key} is {tuple(tensors[key].shape)} in the file, the model expects {want}"
            )
            break
    if problems:
        raise AdapterLoadError("the adapter does not fit this model: " + "; ".join(problems))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    config_from_peft: Callable[[dict[str, Any]], Any],
    adapter_name: str = "default",
    trainable: bool = True,
) -> Any:
    """Build the adapter the folder's config describes and load its weights; all or nothing."""
    peft_config, tensors = read_adapter_folder(path)
    config = config_from_peft(peft_config)
    previous_active = list(registry(model).active)
    add_adapter(model, config, adapter_name)
    try:
        expected = _expected(model, adapter_name)
        _check_keys(expected, tensors)
        by_delta: dict[int, tuple[Any, dict[str, Tensor]]] = {}
        for key, (delta, suffix, _) in expected.items():
            by_delta.setdefault(id(delta), (delta, {}))[1][suffix] = tensors[key]
        for delta, state in by_delta.values():
            delta.import_state(state)
    except Exception:
        delete_adapter(model, adapter_name)
        set_active(model, previous_active) if previous_active else None
        raise
    set_active(model, [adapter_name])
    if not trainable:
        for _, _, delta in adapter_deltas(model, adapter_name):
            delta.requires_grad_(False)
        for name, adapter in model_adapters(model):
            if name == adapter_name:
                adapter.set_trainable(False)
    return config
