"""The run's record: one JSON line per logged step, and a loss curve drawn once at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorakit.core.io import atomic_write


class JsonlLog:
    """Append-only log.jsonl; on resume the lines after the checkpoint are dropped, since the
    resumed run writes those steps again."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else read_log(path, up_to_step=resume_step)
        self.kept = kept  # what a resumed run keeps of the interrupted one (its evaluations too)
        text = "".join(json.dumps(record) + "\n" for record in kept)
        atomic_write(path, lambda tmp: tmp.write_text(text))  # a crash here keeps the old log whole

        self.mirrors: list[Any] = []  # e.g. TensorBoard: each record is also sent there

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for mirror in self.mirrors:
            mirror.write(record)

    def close(self) -> None:
        for mirror in self.mirrors:
            mirror.close()


class TensorBoardLog:
    """log.jsonl's records as TensorBoard scalars (train/<field>, eval/<field>) in `folder`. A
    resumed run appends a new event file; TensorBoard shows the later value of a repeated step."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # TrainConfig checked the package is there

        self.writer = SummaryWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_log(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if up_to_step is None or record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per step, and eval loss where the log has it; Agg, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["task_loss"]) for r in records if "task_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    curves = {k: v for k, v in eval_curves(records).items() if k.endswith(("loss", "nll"))}  # nats only
    for key, points in curves.items():
        ax.plot(*zip(*points, strict=True), "o-", label=key.removeprefix("eval_").replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def eval_curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Every periodic evaluation in the log, by key (``eval_loss``, ``eval_answer_nll``, ...):
    the (step, value) points with a finite value."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("eval_") and _finite(value):
                curves.setdefault(key, []).append((record["step"], float(value)))
    return curves


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
