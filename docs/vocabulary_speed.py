"""Generation speed with and without an extended vocabulary, in characters per second.

    .venv/bin/python docs/vocabulary_speed.py ADAPTER [ADAPTER ...]

For each trained adapter folder (a run's `adapter`), the merged model greedily answers the run's
first 40 held-out questions (64 new tokens at most, stopping at the end of the turn) one at a time,
as `lorakit chat` does; prints tokens/s and characters/s of the answers (characters compare
tokenizers; tokens do not). Run on an idle machine; the CPU is printed with the figures."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

import lorakit as lk
from lorakit.generate import stop_ids
from lorakit.options import RunConfig
from lorakit.run_data import read_data
from lorakit.run_eval import eval_autocast


def main() -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        "| adapter | answers | tokens | characters | s | tokens/s | chars/s |\n|---|---|---|---|---|---|---|"
    )
    for folder in sys.argv[1:]:
        run = json.loads((Path(folder).parent / "metrics.json").read_text())["run"]
        cfg = RunConfig(**{k: v for k, v in run.items() if k in RunConfig.__dataclass_fields__})
        _, items = read_data(cfg, 0, lambda *_: None)
        model, tokenizer = lk.load_model(cfg.model)
        tokenizer, _ = lk.load_as_trained(model, tokenizer, folder)
        model = lk.merge_and_unload(model).eval()
        stops = list(stop_ids(model, tokenizer))
        amp = eval_autocast(model)  # bf16 where the CPU has it natively, as lorakit eval does
        tokens = chars = 0
        elapsed = 0.0
        for item in items[:40]:
            prompt = tokenizer.apply_chat_template(
                item.messages, add_generation_prompt=True, return_tensors="pt"
            )
            ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
            start = time.perf_counter()
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None),
            ):
                out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=stops)
            elapsed += time.perf_counter() - start
            new = out[0, ids.shape[1] :].tolist()
            new = [t for t in new if t not in stops]
            tokens += len(new)
            chars += len(tokenizer.decode(new))
        print(
            f"| {folder} | {min(40, len(items))} | {tokens} | {chars} | {elapsed:.1f} | {tokens / elapsed:.1f} | {chars / elapsed:.1f} |"
        )


if __name__ == "__main__":
    main()
