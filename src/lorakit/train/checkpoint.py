"""Resumable checkpoints, written so that a crash at any moment never leaves a half file in view.

Layout: `<output_dir>/checkpoints/step-000050/` holding
- `trainable.safetensors`: the trainable parameters by name (works for every method, no per-method
  code: LoRA factors, prompt embeddings, or the whole model),
- `state.pt`: optimizer, scheduler, RNG states, data position, step, config, hook states,
- `manifest.json`: sha256 and size of both, written last.

Each file goes to a hidden temporary name in the same folder, is fsynced, then `os.replace`d into
place, so a reader sees the old file or the new one, never a prefix. A folder without a manifest is
a save that did not finish; a manifest whose hashes do not match is a corrupt checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lorakit.core.io import atomic_write

WEIGHTS, STATE, MANIFEST = "trainable.safetensors", "state.pt", "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, incomplete, or belongs to another model or configuration."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(folder: Path, weights: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write one checkpoint; the manifest goes last and is what marks the folder complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # a rewrite is incomplete until it finishes
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, str(p)))
    atomic_write(folder / STATE, lambda p: torch.save(state, p))
    manifest = {
        "step": state["step"],
        "files": {
            name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in (WEIGHTS, STATE)
        },
    }
    atomic_write(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))


def refuse_existing_run(root: Path) -> None:
    """A fresh run must not write over another run's checkpoints; raise before anything loads."""
    existing = list_checkpoints(root)
    if existing:
        raise FileExistsError(
            f"{root} already holds checkpoints (latest {existing[-1][1].name}); pass resume=True "
            "(--resume) to continue that run exactly, or choose another output_dir (--output-dir); "
            "nothing was overwritten"
        )


def list_checkpoints(root: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every step-N folder, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child, (child / MANIFEST).is_file()))
    return sorted(found)


def latest_complete(root: Path) -> tuple[Path | None, list[Path]]:
    """The newest folder with a manifest, and the newer folders skipped because they have none."""
    partial: list[Path] = []
    for _, folder, complete in reversed(list_checkpoints(root)):
        if complete:
            return folder, partial
        partial.append(folder)
    return None, partial


def load_checkpoint(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verify the manifest's hashes, then read the weights and the state."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {folder} is incomplete (no {MANIFEST}): its save was interrupted; delete "
            "the folder to resume from an earlier checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({err})") from err
    for name in (WEIGHTS, STATE):
        _verify_file(folder, name, expected.get(name))
    try:
        weights = load_file(str(folder / WEIGHTS))
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # hashes matched, so the writer itself produced a bad file
        raise CheckpointError(f"checkpoint {folder} cannot be read: {err}") from err
    return weights, state


def _verify_file(folder: Path, name: str, expected: dict | None) -> None:
    path = folder / name
    advice = "delete this folder to resume from an earlier checkpoint, or start with resume=False"
    if expected is None or not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing; {advice}")
    size = path.stat().st_size
    if size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {name} ({size} bytes) does not match the sha256/size "
            f"in {MANIFEST} ({expected.get('bytes')} bytes); {advice}"
        )


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (0 keeps every complete one), and every
    incomplete folder (a save that was interrupted) older than the newest complete checkpoint:
    nothing can resume from it, and a run killed often would otherwise fill the disk with them."""
    found = list_checkpoints(root)
    complete = [folder for _, folder, ok in found if ok]
    if not complete:
        return
    newest = max(step for step, _, ok in found if ok)
    doomed = [folder for step, folder, ok in found if not ok and step < newest]
    if keep > 0:
        doomed += complete[:-keep]
    for folder in doomed:
        (folder / MANIFEST).unlink(missing_ok=True)  # incomplete first, never "complete but half"
        shutil.rmtree(folder, ignore_errors=True)


def check_compatible(saved: dict[str, Tensor], current: dict[str, Tensor], folder: Path) -> None:
    """Refuse a checkpoint whose trainable parameters differ by name or shape, naming them."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in sorted(set(saved) & set(current))
        if saved[k].shape != current[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"trainable in the model but not in the checkpoint: {_few(missing)}")
    if unexpected:
        parts.append(f"in the checkpoint but not trainable in the model: {_few(unexpected)}")
    if shapes:
        parts.append(f"shapes differ: {_few(shapes)}")
    raise CheckpointError(
        f"checkpoint {folder} was written for another model or adapter setup; "
        + "; ".join(parts)
        + ". Resume with the same model and adapter config, or use a fresh output_dir"
    )


def _few(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
