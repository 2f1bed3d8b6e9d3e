"""Compare finished runs, grouped by method: mean and spread over seeds, and learning speed.

``lorakit compare lora='runs/lora-s*' loraplus='runs/loraplus-s*'`` reads each run's
``metrics.json`` (written by ``lorakit train``) and prints one Markdown table: final scores and
held-out loss with their spread over the runs of a group, and the optimizer steps each run needed
before its held-out answer NLL (the ``--eval-every`` curve) first reached a target. By default the
target is the highest of the groups' mean final held-out losses, a loss every group reaches, so
"steps to target" answers "how many steps did each method need to get as good as the slowest one
ends up". Runs without a curve (trained without ``--eval-every``) still give the final scores.
"""

from __future__ import annotations

import glob
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CURVE_KEY = "answer_nll"  # what run._held_out_loss writes at every --eval-every step


@dataclass
class Run:
    path: Path
    seed: int | None
    exact_match: float | None
    answer_nll: float | None
    general_ppl: float | None
    kl_from_base: float | None
    trainable_params: int | None
    seconds_per_step: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)

    def steps_to(self, target: float) -> int | None:
        """The first evaluated step whose held-out loss is at or below `target`; None if never."""
        return next((step for step, value in self.curve if value <= target), None)


def load_run(path: str | Path) -> Run:
    """A finished run folder (its ``metrics.json``); a clear error for anything else."""
    folder = Path(path)
    file = folder / "metrics.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no metrics.json: not a finished `lorakit train` run")
    try:
        metrics = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    after = metrics.get("after") or {}
    train = metrics.get("train") or {}
    steps, seconds = train.get("steps"), train.get("train_seconds")
    curve = [
        (int(point["step"]), float(point[f"eval_{CURVE_KEY}"]))
        for point in train.get("held_out_curve") or []
        if f"eval_{CURVE_KEY}" in point
    ]
    return Run(
        path=folder,
        seed=(metrics.get("train_config") or {}).get("seed"),
        exact_match=after.get("exact_match"),
        answer_nll=after.get("answer_nll"),
        general_ppl=after.get("general_ppl"),
        kl_from_base=after.get("kl_from_base"),
        trainable_params=train.get("trainable_params"),
        seconds_per_step=seconds / steps if steps and seconds else None,
        curve=curve,
    )


def parse_groups(specs: list[str]) -> dict[str, list[Run]]:
    """``NAME=GLOB`` (or ``NAME=DIR,DIR``) to the runs of each group, in sorted path order."""
    groups: dict[str, list[Run]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"expected NAME=GLOB (e.g. lora='runs/lora-s*'), got {spec!r}")
        paths = sorted({p for part in pattern.split(",") for p in (glob.glob(part) or [part])})
        groups.setdefault(name, []).extend(load_run(p) for p in paths)
    return groups


def compare(groups: dict[str, list[Run]], targets: list[float] | None = None) -> dict[str, Any]:
    """Per group: mean, standard deviation, min and max of each final figure, and steps to target."""
    if not groups:
        raise ValueError("nothing to compare: give at least one NAME=GLOB group")
    if not targets:
        finals = [_stats([r.curve[-1][1] for r in runs if r.curve]) for runs in groups.values()]
        reached = [f["mean"] for f in finals if f]
        targets = [max(reached)] if reached else []
    table: dict[str, Any] = {}
    for name, runs in groups.items():
        row: dict[str, Any] = {"runs": [str(r.path) for r in runs], "seeds": [r.seed for r in runs]}
        for key in (
            "exact_match",
            "answer_nll",
            "general_ppl",
            "kl_from_base",
            "trainable_params",
            "seconds_per_step",
        ):
            row[key] = _stats([getattr(r, key) for r in runs])
        row["final_held_out_nll"] = _stats([r.curve[-1][1] for r in runs if r.curve])
        row["steps_to_target"] = {}
        for target in targets:
            steps = [r.steps_to(target) for r in runs if r.curve]
            row["steps_to_target"][f"{target:.4g}"] = {
                "per_run": steps,
                **(_stats([s for s in steps if s is not None]) or {}),
                "not_reached": sum(s is None for s in steps),
            }
        table[name] = row
    return {"targets": targets, "groups": table}


def _stats(values: list[Any]) -> dict[str, float] | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def render(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table: mean ± standard deviation (n runs)."""
    columns = [
        ("exact match", "exact_match", 100, "{:.1f}%"),
        ("answer NLL", "answer_nll", 1, "{:.3f}"),
        ("general ppl", "general_ppl", 1, "{:.2f}"),
        ("KL from base", "kl_from_base", 1, "{:.3f}"),
        ("final held-out NLL", "final_held_out_nll", 1, "{:.3f}"),
        ("s/step", "seconds_per_step", 1, "{:.2f}"),
    ]
    targets = [f"{t:.4g}" for t in result["targets"]]
    head = ["method", "runs", *(c[0] for c in columns), *(f"steps to NLL ≤ {t}" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["groups"].items():
        cells = [name, str(len(row["runs"]))]
        for _, key, scale, fmt in columns:
            cells.append(_cell(row[key], scale, fmt))
        for t in targets:
            entry = row["steps_to_target"][t]
            per_run = "/".join("–" if s is None else str(s) for s in entry["per_run"])
            cells.append(f"{entry['mean']:.0f} ({per_run})" if "mean" in entry else f"never ({per_run})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Mean ± standard deviation over the runs of each group. Steps to target: the mean over runs "
        "of the first `--eval-every` step whose held-out answer NLL is at or below the target, "
        "each run's step in brackets (– where a run never got there)."
    )
    return "\n".join(lines) + "\n"


def _cell(stats: dict[str, float] | None, scale: float, fmt: str) -> str:
    if stats is None:
        return "–"
    mean = fmt.format(stats["mean"] * scale)
    return mean if stats["n"] == 1 else f"{mean} ± {fmt.format(stats['std'] * scale).rstrip('%')}"
