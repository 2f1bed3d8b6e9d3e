"""Run the arena: one `lorakit train` child per method x seed, its latency child, a status per run.

A run folder is complete when it holds `status.json`; anything else in it is a run that was
interrupted (resumed from its checkpoints with `--resume`). A failed run is recorded with its error
and the arena goes on; `--retry-failed` runs the failed ones again.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lorakit.core.io import atomic_write_json, run_child

from .arms import Arm, resolve_arms

# what every arm shares. The full default: 16 arms x 3 seeds in under about an hour on 2 cores;
# --quick: one seed and fewer steps, under about ten minutes (docs/arena.md has the measured times)
FULL = {"seeds": 3, "steps": 24, "batch_size": 8, "micro_batch_size": 8, "eval_limit": 40,
        "general_questions": 30, "general_tokens": 2048, "kl_prompts": 8, "latency_tokens": 24}  # fmt: skip
QUICK = {"seeds": 1, "steps": 8, "batch_size": 8, "micro_batch_size": 8, "eval_limit": 16,
         "general_questions": 12, "general_tokens": 1024, "kl_prompts": 4, "latency_tokens": 16}  # fmt: skip
# every setting but the seeds changes what a run computes: an arena folder resumes only with the same


@dataclass
class ArenaConfig:
    methods: str = "all"
    out: str = "arena"
    quick: bool = False
    seeds: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    micro_batch_size: int | None = None
    eval_limit: int | None = None
    general_questions: int | None = None
    general_tokens: int | None = None
    kl_prompts: int | None = None
    latency_tokens: int | None = None
    model: str | None = None
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    train_args: str = ""  # more `lorakit train` options for every run, e.g. "--max-length 128"
    match_params: int | None = None  # each arm sized to train about this many parameters (matching.py)
    retry_failed: bool = False
    progress_bar: bool = True
    settings: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        base = QUICK if self.quick else FULL
        self.settings = {
            k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()
        }
        for k in ("model", "task", "data", "eval_data", "train_args", "match_params"):
            self.settings[k] = getattr(self, k) or None
        for k in ("seeds", "steps", "batch_size", "micro_batch_size", "latency_tokens"):
            if self.settings[k] < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {self.settings[k]}")
        if self.settings["batch_size"] % self.settings["micro_batch_size"]:
            raise ValueError("--batch-size must be a multiple of --micro-batch-size")
        shlex.split(self.train_args)  # unbalanced quotes fail here, not in the first child
        if self.match_params is not None and self.match_params < 1:
            raise ValueError(f"--match-params must be a positive parameter count, got {self.match_params}")


def run_id(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def plan(cfg: ArenaConfig) -> list[tuple[Arm, int]]:
    """Every arm x seed, seeds outermost: an interrupted arena has every arm at its first seed."""
    arms = resolve_arms(cfg.methods)
    return [(arm, seed) for seed in range(cfg.settings["seeds"]) for arm in arms]


def train_command(
    cfg: ArenaConfig, arm: Arm, seed: int, folder: Path, resume: bool, sized: tuple[str, ...] = ()
) -> list[str]:
    s = cfg.settings
    command = [sys.executable, "-m", "lorakit", "train", *arm.args, *sized,
               "--seed", str(seed), "--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]),
               "--micro-batch-size", str(s["micro_batch_size"]), "--eval-limit", str(s["eval_limit"]),
               "--general-questions", str(s["general_questions"]), "--general-tokens", str(s["general_tokens"]),
               "--kl-prompts", str(s["kl_prompts"]), "--no-progress-bar", "--output-dir", str(folder)]  # fmt: skip
    for key in ("model", "task", "data", "eval_data"):
        if s[key]:
            command += [f"--{key.replace('_', '-')}", str(s[key])]
    command += shlex.split(s["train_args"] or "")
    return command + (["--resume"] if resume else [])


def latency_command(cfg: ArenaConfig, adapter: Path | None, out: Path) -> list[str]:
    command = [sys.executable, "-m", "lorakit.arena.latency", "--out", str(out),
               "--tokens", str(cfg.settings["latency_tokens"])]  # fmt: skip
    if cfg.settings["model"]:
        command += ["--model", cfg.settings["model"]]
    return command + (["--adapter", str(adapter)] if adapter is not None else [])


def machine() -> dict[str, Any]:
    """What every figure was measured on: `lorakit bench`'s machine record (CPU model, logical CPUs,
    memory, threads, load, versions, date), with the CPU flags that decide bf16 speed and the GPU."""
    import torch

    from lorakit.bench.report import machine_info

    try:
        flags = next(
            (set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")), set())  # fmt: skip
    except OSError:
        flags = set()
    return {
        **machine_info(torch.get_num_threads()),
        "bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}) or "none (bf16 emulated: slow)",
        "avx512": "avx512f" in flags,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def commit() -> str:
    """The lorakit commit the arena ran (with +dirty when src/ had uncommitted changes); 'unknown'
    outside a git checkout."""
    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _begin(cfg: ArenaConfig, root: Path) -> dict[str, Any]:
    """Write (or check, on a resume) OUT/arena.json: the shared settings, commit, machine, date."""
    path = root / "arena.json"
    now = {k: v for k, v in cfg.settings.items() if k != "seeds"}
    if path.is_file():
        header = json.loads(path.read_text())
        changed = [f"{k}={header['settings'].get(k)!r} there, {now[k]!r} here" for k in now
                   if header["settings"].get(k) != now[k]]  # fmt: skip
        if changed:
            raise ValueError(
                f"{root} holds an arena with other settings ({'; '.join(changed)}); use the same settings "
                "to resume it, or another --out"
            )
        header.setdefault("resumed", []).append(_stamp())
    else:
        header = {"settings": now, "started": _stamp()}
    header.update(commit=commit(), machine=machine(), seeds=cfg.settings["seeds"], methods=cfg.methods)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, header)
    return header


def _stamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _error(log: Path, code: int) -> str:
    """The error a failed child printed: its `error:` line (lorakit's one-line errors), else its last
    lines."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "lorakit: error"))]
    if errors:
        return errors[-1]
    tail = " | ".join(lines[-3:])
    return f"exit code {code}: {tail}" if tail else f"exit code {code}, no output"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_one(cfg: ArenaConfig, arm: Arm, seed: int, root: Path, sized: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one arm at one seed, then time its decoding; write and return its status."""
    folder = root / "runs" / run_id(arm, seed)
    resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "run.log"
    code, wall, peak = run_child(train_command(cfg, arm, seed, folder, resume, sized), log)
    status: dict[str, Any] = {"arm": arm.name, "seed": seed, "args": [*arm.args, *sized], "wall_s": wall,
                              "peak_rss_mb": peak, "returncode": code, "resumed": resume, "finished": _stamp()}  # fmt: skip
    if code != 0 or not (folder / "metrics.json").is_file():
        status.update(status="failed", error=_error(log, code))
    else:
        adapter = folder / "adapter"
        status.update(status="done", adapter_bytes=folder_bytes(adapter) if adapter.is_dir() else None)
        lat_code, lat_wall, _ = run_child(latency_command(cfg, adapter, folder / "latency.json"), log)
        status["latency_wall_s"] = lat_wall
        if lat_code != 0:
            status["latency_error"] = _error(log, lat_code)
    atomic_write_json(folder / "status.json", status)
    return status


def run_arena(cfg: ArenaConfig, say: Any = print) -> dict[str, Any]:
    """Run every arm x seed not yet done (resuming an interrupted one), then write the report."""
    from .report import write_report

    root = Path(cfg.out)
    runs = plan(cfg)  # refuses unknown arms before anything is written
    header = _begin(cfg, root)
    sizes = header.get("matched") or {}
    if cfg.settings["match_params"] and any(arm.name not in sizes for arm, _ in runs):
        from .matching import matched_args

        arms = list({arm.name: arm for arm, _ in runs}.values())
        sizes.update(matched_args(arms, cfg.settings["match_params"], cfg.settings["model"]))
        header["matched"] = sizes
        atomic_write_json(root / "arena.json", header)
    say(
        f"arena: {len(runs)} runs ({cfg.methods}, {cfg.settings['seeds']} seed(s)) in {root}; commit {header['commit']}"
    )
    base_latency = root / "base_latency.json"
    if not base_latency.is_file():
        code, _, _ = run_child(latency_command(cfg, None, base_latency), root / "base_latency.log")
        if code != 0:
            say(f"base latency: {_error(root / 'base_latency.log', code)}")
    todo = []
    for arm, seed in runs:
        status = root / "runs" / run_id(arm, seed) / "status.json"
        done = status.is_file() and not (
            cfg.retry_failed and json.loads(status.read_text())["status"] == "failed"
        )
        if not done:
            todo.append((arm, seed))
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="arena", disable=not cfg.progress_bar,
               dynamic_ncols=True)  # fmt: skip
    with bar:
        for arm, seed in todo:
            bar.set_postfix_str(run_id(arm, seed))
            status = run_one(cfg, arm, seed, root, tuple(sizes.get(arm.name, {}).get("args", ())))
            if status["status"] == "failed":
                bar.write(f"{run_id(arm, seed)} failed: {status['error']}")
            bar.update(1)
    result = write_report(root)
    failed = sum(len(arm["failed"]) for arm in result["arms"].values())
    say(
        f"arena: {len(runs) - failed} of {len(runs)} runs done; report: {root / 'report.html'}, {root / 'report.md'}"
    )
    return result
