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

from .copies import copy_settings
from .io import atomic_folder, non_finite
from .model import adapter_deltas, add_adapter, delete_adapter, model_adapters, registry, set_active
from .target import candidates
from .tokens import add_token_rows, layers_for_indices, peft_token_indices

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
    unknown = [n for n in names if n not in registry(model).configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r}; adapters here: {list(registry(model).configs)}")
    out = Path(out_dir)
    atomic_folder(out, lambda tmp: [_write_adapter(model, name, tmp) for name in names])
    return [out if name == "default" else out / name for name in names]


def _write_adapter(model: nn.Module, name: str, root: Path) -> None:
    """One adapter's folder under `root` (the "default" one at the root itself, as PEFT does)."""
    config = registry(model).configs[name]
    folder = root if name == "default" else root / name
    adapter = dict(model_adapters(model)).get(name)
    token_indices = peft_token_indices(model, name)  # a vocabulary extension's rows, if any
    extra = {}
    if token_indices is not None and registry(model).vocabulary is not None:
        extra = registry(model).vocabulary.files()  # the extended tokenizer and its record
    if adapter is not None:  # model-level: its own keys (PEFT's "prompt_embeddings") and config
        tensors = {
            k: t.detach().to("cpu", torch.float32).contiguous() for k, t in adapter.export_state().items()
        }
        peft_config = adapter.to_peft_dict()
    else:
        every = list(adapter_deltas(model, name))
        deltas = [(p, layer, d) for p, layer, d in every if d.is_target]
        peft_config = config.to_peft_dict()
        peft_config.update(copy_settings([d for *_, d in every], getattr(config, "modules_to_save", None)))
        peft_config["target_modules"] = _target_list(model, [p for p, _, _ in deltas])
        peft_config["exclude_modules"] = None
        if any(_stores_in_out(layer) for _, layer, _ in deltas):
            peft_config["fan_in_fan_out"] = True  # GPT-2 Conv1D stores its weight as (in, out)
        make_extra = getattr(config, "extra_files", None)  # e.g. QLoRA's record of its 4-bit base
        extra = {**extra, **(make_extra() if callable(make_extra) else {})}
        make_for = getattr(config, "extra_files_for", None)  # records of the model (LongLoRA's positions)
        extra = {**extra, **(make_for(model) if callable(make_for) else {})}
        tensors = {}
    tensors.update(adapter_tensors(model, name))
    if token_indices is not None:
        peft_config["trainable_token_indices"] = token_indices
    write_adapter_folder(folder, tensors, peft_config, extra)


def save_as_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    lora_config: Callable[[int], dict[str, Any]],
    adapter_name: str = "default",
) -> Path:
    """Write adapter `adapter_name` as a plain PEFT LoRA folder, for deltas that are a fixed rank-r
    change and say how (`delta.as_lora() -> (A (r, in), B (out, r))`, the change being B @ A):
    PEFT, vLLM and llama.cpp then serve it unchanged. `lora_config(r)` is the LoRA config dict
    (lora_alpha = r, so PEFT's scale is 1); target_modules are filled in here."""
    deltas = list(adapter_deltas(model, adapter_name))
    if not deltas:
        raise KeyError(
            f"no layer adapter named {adapter_name!r}; adapters here: {list(registry(model).configs)}"
        )
    missing = [path for path, _, d in deltas if not callable(getattr(d, "as_lora", None))]
    if missing:
        raise ValueError(
            f"{type(deltas[0][2]).__name__} has no LoRA form (e.g. {missing[0]}); nothing was written"
        )
    pairs = {}
    for path, layer, delta in deltas:
        if _stores_in_out(layer):
            raise ValueError(
                f"{path} stores its weight as (in, out) (GPT-2 Conv1D); export it from a Linear model"
            )
        pairs[path] = delta.as_lora()
    rank = max(1, *(a.shape[0] for a, _ in pairs.values()))  # smaller ones zero-padded: the same change
    tensors = {}
    for path, (a, b) in pairs.items():
        pad = rank - a.shape[0]
        a = torch.cat([a.detach(), a.new_zeros(pad, a.shape[1])]) if pad else a.detach()
        b = torch.cat([b.detach(), b.new_zeros(b.shape[0], pad)], 1) if pad else b.detach()
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.to("cpu", torch.float32).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.to("cpu", torch.float32).contiguous()
    config = {**lora_config(rank), "target_modules": _target_list(model, [p for p, _, _ in deltas])}
    out = Path(out_dir)
    atomic_folder(out, lambda tmp: write_adapter_folder(tmp, tensors, config))
    return out


def _stores_in_out(layer: Any) -> bool:
    """GPT-2's Conv1D stores (in, out), also when lorakit.quant holds it in 4 bits as (out, in)."""
    original_in_out = getattr(layer.base_layer, "from_conv1d", False)
    return original_in_out or (layer.weight_layout == "in_out" and not layer.is_embedding)


def write_adapter_folder(
    folder: Path,
    tensors: dict[str, Tensor],
    peft_config: dict[str, Any],
    extra: dict[str, str | bytes] | None = None,
) -> None:
    """Plain writes: the whole tree is swapped into place by `atomic_folder` once complete."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    for file_name, content in (extra or {}).items():
        if isinstance(content, bytes):
            (folder / file_name).write_bytes(content)
        else:
            (folder / file_name).write_text(content)


def _refuse_pickle(path: Path) -> None:
    raise AdapterLoadError(
        f"{path} is a pickle file; lorakit loads safetensors only, because unpickling can run "
        "arbitrary code. Convert it once where you trust it: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
    )


def read_adapter_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config dict and tensors of an adapter folder (or of its .safetensors file)."""
    config, weights = read_adapter_config(path)
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for bad headers and truncation
        raise AdapterLoadError(
            f"{weights} is not a readable safetensors file (corrupt or truncated?): {err}"
        ) from None
    bad = non_finite(tensors.items())
    if bad:
        raise AdapterLoadError(
            f"{weights} holds NaN or Inf values in {len(bad)} tensor(s), e.g. {bad[0]}: the run that "
            "wrote it diverged or the file is damaged; load an earlier checkpoint's adapter instead"
        )
    return config, tensors


def tensor_names(weights: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise AdapterLoadError(
            f"{weights} is not a readable safetensors file (corrupt or truncated?): {err}"
        ) from None


def read_adapter_config(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """An adapter folder's config dict and the path of its weights file, checked to exist; no tensor
    is read (a command that needs only the config or the names fails as clearly, and fast)."""
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
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_path} holds {type(config).__name__}, not a JSON object")
    return config, weights


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


def _roll_back(model: nn.Module, name: str, previous_active: list[str], copied: bool, err: Exception) -> None:
    """Remove the half-loaded adapter and give the model back as it was, or say why it cannot be."""
    try:
        delete_adapter(model, name, keep_changes=not copied)
    except RuntimeError as restore_error:  # an in-place method without a copy of the originals
        delete_adapter(model, name, keep_changes=True)
        raise AdapterLoadError(
            f"{err}; the load had already overwritten some base tensors, which cannot be restored "
            f"({restore_error}); load the base model again"
        ) from err
    finally:
        if previous_active:
            set_active(model, previous_active)


def _token_layers_fitting(model: nn.Module, spec: Any, path: Any) -> dict[str, list[int]]:
    """The folder's trainable token rows by layer, refused before anything changes when the model's
    vocabulary is too small for them (an adapter trained with added tokens, on the base without)."""
    try:
        layers = layers_for_indices(model, spec)
    except ValueError as err:
        raise AdapterLoadError(f"{path}: {err}") from None
    size = model.get_input_embeddings().weight.shape[0]
    highest = max((i for ids in layers.values() for i in ids), default=-1)
    if highest >= size:
        raise AdapterLoadError(
            f"{path} trains rows of tokens up to id {highest} (a vocabulary of at least {highest + 1}); "
            f"this model has {size} tokens: the adapter was trained with added tokens. Load its "
            "tokenizer and grow the model first: lorakit.vocab.prepare_for_adapter(model, tokenizer, "
            f"{str(path)!r}) (lorakit eval/chat/merge do this), or with PEFT: "
            "model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(FOLDER)))"
        )
    return layers


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    config_from_peft: Callable[[dict[str, Any]], Any],
    adapter_name: str = "default",
    trainable: bool = True,
) -> Any:
    """Build the adapter the folder's config describes and load its weights; all or nothing."""
    peft_config, tensors = read_adapter_folder(path)
    token_spec = peft_config.pop("trainable_token_indices", None)
    token_layers = _token_layers_fitting(model, token_spec, path) if token_spec is not None else None
    config = config_from_peft(peft_config)
    previous_active = list(registry(model).active)
    add_adapter(model, config, adapter_name)
    copying = False  # from here on, in-place methods (full fine-tuning) overwrite base tensors
    try:
        if token_layers is not None:  # activated with the rest below
            add_token_rows(model, adapter_name, token_layers)
        expected = _expected(model, adapter_name)
        _check_keys(expected, tensors)
        by_delta: dict[int, tuple[Any, dict[str, Tensor]]] = {}
        for key, (delta, suffix, _) in expected.items():
            by_delta.setdefault(id(delta), (delta, {}))[1][suffix] = tensors[key]
        copying = True
        for delta, state in by_delta.values():
            delta.import_state(state)
    except Exception as err:
        _roll_back(model, adapter_name, previous_active, copying, err)
        raise
    set_active(model, [adapter_name])
    if not trainable:
        for _, _, delta in adapter_deltas(model, adapter_name):
            delta.requires_grad_(False)
        for name, adapter in model_adapters(model):
            if name == adapter_name:
                adapter.set_trainable(False)
    return config
