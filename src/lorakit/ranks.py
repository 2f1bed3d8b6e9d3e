"""Where an adapter's rank went: rank per adapted module, read from the folder alone (no model).

Works for any low-rank folder lorakit or PEFT writes. For LoRA / DoRA the rank is the first
dimension of `lora_A`; for AdaLoRA it is the number of singular values `lora_E` that were kept, out
of `init_r` (PEFT and lorakit save the tensors sliced to the kept triplets of `rank_pattern`).
Backs `lorakit inspect ADAPTER`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .core.state import PREFIX, read_adapter_folder

RANK_KEYS = {"lora_E": 0, "lora_A.weight": 0, "lora_embedding_A": 0}  # suffix -> its rank dimension
_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleRank:
    path: str
    rank: int
    initial: int  # the rank it started with (AdaLoRA's init_r; the rank itself otherwise)
    params: int  # trainable numbers the saved module holds

    @property
    def layer(self) -> int | None:
        """The block index in the path (model.layers.3.mlp.up_proj -> 3), None outside blocks."""
        match = _INDEX.search(f".{self.path}.")
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def adapter_ranks(folder: str | os.PathLike) -> tuple[str, list[ModuleRank]]:
    """(peft_type, one ModuleRank per adapted module, in path order)."""
    config, tensors = read_adapter_folder(folder)
    peft_type = str(config.get("peft_type", "?"))
    adaptive = peft_type.upper() == "ADALORA"
    initial = int(config.get("init_r") or 0)
    modules: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        path, suffix = _split(key.removeprefix(PREFIX))
        entry = modules.setdefault(path, {"params": 0})
        entry["params"] += tensor.numel()
        if suffix in RANK_KEYS and (suffix == "lora_E" or not adaptive):
            entry["rank"] = tensor.shape[RANK_KEYS[suffix]]
    rows = [
        ModuleRank(path, m["rank"], initial if adaptive else m["rank"], m["params"])
        for path, m in sorted(modules.items(), key=lambda kv: _order(kv[0]))
        if "rank" in m
    ]
    if not rows:
        raise ValueError(f"{folder} holds no low-rank factors (lora_A / lora_E); nothing to inspect")
    return peft_type, rows


def _split(key: str) -> tuple[str, str]:
    for suffix in (*RANK_KEYS, "lora_B.weight", "lora_B", "lora_embedding_B", "lora_magnitude_vector"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    path, _, last = key.rpartition(".")
    return path, last


def _order(path: str) -> tuple:
    """Numeric order of block indices (layers.10 after layers.9)."""
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


def format_ranks(peft_type: str, rows: list[ModuleRank]) -> str:
    """One line per block: each module's rank (and /initial for AdaLoRA), then the totals."""
    kinds = list(dict.fromkeys(r.kind for r in rows))
    adaptive = any(r.initial != r.rank for r in rows) or peft_type.upper() == "ADALORA"
    width = max(8, *(len(k) for k in kinds)) + 1
    lines = [f"{'layer':<8}" + "".join(f"{k:>{width}}" for k in kinds)]
    by_layer: dict[str, dict[str, ModuleRank]] = {}
    for r in rows:
        label = "-" if r.layer is None else str(r.layer)
        by_layer.setdefault(label, {})[r.kind] = r
    for label, cells in by_layer.items():
        text = [
            (
                ""
                if k not in cells
                else f"{cells[k].rank}/{cells[k].initial}"
                if adaptive
                else str(cells[k].rank)
            )
            for k in kinds
        ]
        lines.append(f"{label:<8}" + "".join(f"{t:>{width}}" for t in text))
    total, start = sum(r.rank for r in rows), sum(r.initial for r in rows)
    lines.append(
        f"{peft_type}: {len(rows)} modules, total rank {total} (mean {total / len(rows):.2f})"
        + (f" of {start} at the start" if adaptive else "")
        + f", {sum(r.params for r in rows):,} saved parameters"
    )
    return "\n".join(lines)


def plot_rank_heatmap(rows: list[ModuleRank], path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of rank: blocks (rows) x module types (columns); Agg, no pyplot global state."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r.kind for r in rows))
    layers = sorted({r.layer for r in rows}, key=lambda x: -1 if x is None else x)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for r in rows:
        grid[layers.index(r.layer), kinds.index(r.kind)] = r.rank
    fig = Figure(figsize=(2 + 0.9 * len(kinds), max(3.0, 1.5 + 0.28 * len(layers))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(r.initial for r in rows)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    if len(layers) * len(kinds) <= 400:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                color = "k" if value > 0.6 * top else "w"  # readable on viridis' light end
                ax.text(j, i, int(value), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title or "rank per module")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
