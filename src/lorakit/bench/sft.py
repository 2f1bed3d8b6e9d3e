"""The whole fine-tuning run against TRL's SFTTrainer + PEFT (issue 26): the default task, the same
model, training conversations, chat template, assistant-only loss (TRL: prompt-completion data,
`completion_only_loss`), steps, batch, micro-batch, lr, schedule, warm-up, clipping and LoRA
(rank 16, alpha 32, every linear layer), bf16 autocast exactly where lorakit would pick it.

    python -m lorakit.bench.sft --out DIR [--steps 150] [--lorakit-args "--share-prefix"]

Each training run is a child process (peak RSS from wait4, wall time around it); replay is off in
lorakit's run (TRL has none), gradient checkpointing off in both (lorakit's default). Both adapters
are then scored by the same `lorakit eval --adapter` (held-out exact match, answer NLL). Writes
DIR/sft.json and prints a table. TRL is a bench-only dependency: `make bench-trl` installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RANK, ALPHA = 16, 32


def _child(command: list[str], log: Path, as_command: bool = False) -> dict[str, Any]:
    """Run a child to the end in a fresh `log`; its wall time and peak RSS. `as_command`: in the
    environment the `lorakit` command gives itself (`lorakit_launcher`), else in this one without it
    (TRL's arm runs as a Python program would)."""
    import lorakit_launcher
    from lorakit.core.io import run_child

    log.unlink(missing_ok=True)
    code, wall, peak = run_child(command, log, lorakit_launcher.child_environment(os.environ, as_command))
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({code}); end of {log}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": peak}


def train_trl(out: Path, steps: int, model_path: str | None) -> None:
    """The TRL arm, in its own process: writes out/adapter and out/trl.json."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import lorakit as lk
    from lorakit.data import load_task
    from lorakit.train.config import TrainConfig
    from lorakit.train.optim import precision_choice

    defaults = TrainConfig()
    model, tokenizer = lk.load_model(model_path)
    bf16 = precision_choice("auto", torch.device("cpu"))[0] is not None
    rows = [{"prompt": conv[:-1], "completion": conv[-1:]} for conv in load_task(seed=defaults.seed).train]
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=defaults.micro_batch_size,
        gradient_accumulation_steps=defaults.batch_size // defaults.micro_batch_size,
        learning_rate=defaults.lr,
        lr_scheduler_type=defaults.schedule,
        warmup_steps=round(defaults.warmup_ratio * steps),
        weight_decay=defaults.weight_decay,
        max_grad_norm=defaults.max_grad_norm,
        seed=defaults.seed,
        bf16=bf16,
        use_cpu=True,
        gradient_checkpointing=False,
        completion_only_loss=True,
        max_length=512,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
    )
    peft = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft,
    )
    result = trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    history = trainer.state.log_history
    stats = {
        "train_seconds": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "num_tokens": next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None),
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "bf16": bf16,
        "versions": {m: __import__(m).__version__ for m in ("trl", "peft", "transformers", "torch")},
    }
    (out / "trl.json").write_text(json.dumps(stats, indent=2) + "\n")


def _score(adapter: Path, log: Path, model_path: str | None, limit: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "eval",
        "--adapter",
        str(adapter),
        "--json",
        "--eval-limit",
        str(limit),
    ]
    if model_path:
        command += ["--model", model_path]
    _child(command, log, as_command=True)
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))["model"]  # `lorakit eval --json`: {"base": ..., "model": ...}


def run(
    out: Path, steps: int, lorakit_args: list[str], model_path: str | None, limit: int = 0
) -> dict[str, Any]:
    import torch

    from lorakit.bench.report import machine_info

    out.mkdir(parents=True, exist_ok=True)
    model = ["--model", model_path] if model_path else []
    ours = out / "lorakit"
    command = [sys.executable, "-m", "lorakit", "train", "--replay", "none", "--steps", str(steps), "--skip-eval",
               "--no-progress-bar", "--output-dir", str(ours), *model, *lorakit_args]  # fmt: skip
    arms: dict[str, Any] = {
        "lorakit": {
            "command": shlex.join(command[2:]),
            **_child(command, out / "lorakit.log", as_command=True),
        }
    }
    metrics = json.loads((ours / "metrics.json").read_text())["train"]
    log = [json.loads(line) for line in (ours / "log.jsonl").read_text().splitlines()]
    arms["lorakit"].update(
        train_seconds=metrics["train_seconds"], steps=metrics["steps"], final_loss=metrics.get("final_loss"),
        num_tokens=sum(r.get("tokens", 0) for r in log if "loss" in r),
    )  # fmt: skip
    trl_dir = out / "trl"
    trl_dir.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "lorakit.bench.sft", "--trl-child", "--out", str(trl_dir), "--steps", str(steps),
               *model]  # fmt: skip
    arms["trl"] = {
        "command": "SFTTrainer + PEFT LoraConfig (lorakit.bench.sft.train_trl)",
        **_child(command, out / "trl.log"),
    }
    arms["trl"].update(json.loads((trl_dir / "trl.json").read_text()))
    for name, adapter in (("lorakit", ours / "adapter"), ("trl", trl_dir / "adapter")):
        scores = _score(adapter, out / f"eval-{name}.log", model_path, limit)
        arms[name]["scores"] = {k: scores.get(k) for k in ("exact_match", "n", "answer_nll", "general_ppl")}
    for arm in arms.values():
        arm["s_per_step"] = arm["train_seconds"] / arm["steps"]
    result = {
        "machine": machine_info(torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": steps,
        "arms": arms,
        "speed_ratio": arms["trl"]["train_seconds"] / arms["lorakit"]["train_seconds"],
        "memory_ratio": arms["lorakit"]["peak_rss_mb"] / arms["trl"]["peak_rss_mb"],
    }
    (out / "sft.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        "| run | train s | s/step | peak RSS MB | held-out EM | answer NLL | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in result["arms"].items():
        s = arm["scores"]
        lines.append(
            f"| {name} | {arm['train_seconds']:.0f} | {arm['s_per_step']:.2f} | {arm['peak_rss_mb']:.0f} | "
            f"{100 * s['exact_match']:.1f}% ({s['n']}) | {s['answer_nll']:.3f} | {arm['final_loss']:.3f} |"
        )
    lines.append(
        f"\nTRL train time / lorakit's: {result['speed_ratio']:.2f}x; lorakit peak RSS / TRL's: {result['memory_ratio']:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-sft")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--eval-limit", type=int, default=0, help="score the first N held-out items (0 = all)"
    )
    parser.add_argument(
        "--lorakit-args", default="", help="extra `lorakit train` options, e.g. --share-prefix"
    )
    parser.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child:
        train_trl(Path(args.out), args.steps, args.model)
        return 0
    result = run(Path(args.out), args.steps, shlex.split(args.lorakit_args), args.model, args.eval_limit)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
