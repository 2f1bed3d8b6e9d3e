"""One benchmark case in its own process: `python -m lorakit.bench.case '<json spec>'`.

A fresh process per case makes peak RSS (ru_maxrss) belong to that case alone and keeps one
case's allocator state, threads and caches from leaking into the next. The spec is {"case", "model",
"device", "threads", "warmup", "steps", "forward_steps", "result_path"}; the result is written as
JSON to result_path (stdout is left to library warnings). On a GPU the case also reports the
device's peak of allocated memory (`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.device import describe, peak_memory_mb, resolve_device, synchronize

from .build import adapter_stats, load, prepare
from .cases import QUANT_SHAPE, TINY_QUANT_SHAPE, find_case
from .infer import run_infer
from .timing import current_rss_mb, peak_rss_mb


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    case = find_case(spec["case"])
    torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec.get("device") or "cpu")
    sync = (lambda: synchronize(device)) if device.type != "cpu" else None
    on_device = {"device": describe(device)}
    if case.suite == "quant":  # one matrix, no model
        from .quant import run_quant

        shape = TINY_QUANT_SHAPE if spec.get("model") == "tiny" else QUANT_SHAPE
        result = run_quant(case, int(spec["warmup"]), int(spec["steps"]), shape, device, sync)
        result.update(case=case.name, library=case.library, peak_rss_mb=peak_rss_mb(), **on_device)
        return {**result, "torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    model, tokenizer = load(spec.get("model"), case, device)
    model, layers = prepare(model, case)
    synchronize(device)
    setup_s = time.perf_counter() - start
    rss_ready = current_rss_mb()
    warmup, steps = int(spec["warmup"]), int(spec["steps"])
    if case.suite == "infer":
        model.eval()
        forward_steps = int(spec.get("forward_steps") or steps)
        result = run_infer(model, tokenizer, warmup, steps, forward_steps, case.batch, sync)
    else:
        from .train import run_train  # only train cases need the optimizer and loss imports

        result = run_train(model, case, warmup, steps, tokenizer, sync)
    if device.type != "cpu":  # the device's own peak (tensors), the case's whole life
        on_device["peak_gpu_mb"] = peak_memory_mb(device)
    result.update(**on_device)
    result.update(
        case=case.name,
        library=case.library,
        adapter=case.adapter,
        dtype=case.dtype,
        adapted_layers=layers,
        setup_s=setup_s,
        rss_ready_mb=rss_ready,
        peak_rss_mb=peak_rss_mb(),
        torch_threads=torch.get_num_threads(),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),  # bench.runner.case_environment
        **adapter_stats(model),
    )
    if case.method == "qlora" and case.library == "peft":
        from .build import bnb_weight_memory

        result["weights"] = bnb_weight_memory(model)
    elif case.method in ("qlora", "qlora_emb"):
        from lorakit.quant.linear import weight_memory

        result["weights"] = weight_memory(model)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lorakit.bench.case '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    result = run_case(spec)
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
