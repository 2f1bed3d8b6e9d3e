"""The MoPEFT multi-task study (issue 20; read in docs/methods/mopeft.md).

    python docs/methods/mopeft_study.py [--out runs/mopeft-study] [--steps 150] [--batch 8]

Three tasks from offline data, mixed for training: icd10-chapter (exact match), world-capitals
(exact match) and chatterbot-zh (Chinese chat, answer NLL). Arms, each the same number of optimizer
steps of the same batch size:

  lora            LoRA (r16, all linear layers) on the mixed data
  lora-matched    LoRA with about the mixture's trainable parameters (rank chosen by counting)
  expert-lora     the mixture machinery with one expert each: a gated LoRA, a gated bottleneck
  expert-adapter  adapter, a gated prefix: "each single method as an expert alone"
  expert-prefix
  mixture         LoRA + adapter + prefix experts under per-token sigmoid gates
  mixture-top1    the same experts, softmax over them and a null slot, each token keeps its top 1
  task-<t>        one LoRA per task on its own data, steps / 3 each (the same total)
  router          the per-input router over the three task adapters (pick mode)
  merge-<c>       static combinations of the three task adapters: linear, svd, ties, dare_linear

Every `lorakit train` runs as a child process (the real command line, resumable: a finished arm is
skipped on a rerun); scoring runs here, per arm on a freshly loaded base model: each task's exact
match / answer NLL, general-text NLL (forgetting), decode latency (24 greedy tokens, median of 3),
and for the mixture the mean gate per layer and expert on each task's prompts (the heatmap).
Writes OUT/results.json, OUT/report.md and OUT/gates-<arm>.png for the two mixtures. Then, on a quiet
machine, `--cost` times each arm again (20 steps of its own options, and decoding with its trained
adapter): OUT/cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TASKS = ("icd10-chapter", "world-capitals", "chatterbot-zh")
SHORT = {"icd10-chapter": "icd", "world-capitals": "capitals", "chatterbot-zh": "zh"}
EXACT = ("icd10-chapter", "world-capitals")  # scored by exact match (all three by answer NLL)
MIXED = "+".join(TASKS)
MIXTURE = "lora,adapter,prefix"
COMBINATIONS = {"linear": [], "svd": ["--rank", "16"], "ties": ["--density", "0.3", "--rank", "48"],
                "dare_linear": ["--density", "0.3", "--seed", "0"]}  # fmt: skip
EVAL_ITEMS, GATE_PROMPTS, LATENCY_TOKENS, COST_STEPS = 60, 32, 24, 20


def lorakit(*args: str, log: Path) -> None:
    command = [sys.executable, "-m", "lorakit", *args]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}; see {log}")


def matched_rank() -> tuple[int, dict[str, int]]:
    """The LoRA rank whose trainable parameters come nearest the mixture's."""
    import lorakit as lk
    from lorakit.run import api_load

    counts = {}
    for name, config in (
        ("lora", lk.LoRAConfig(rank=16, alpha=32)),
        ("mixture", lk.MoPEFTConfig(experts=MIXTURE, rank=16, alpha=32)),
    ):
        model, _ = api_load(None)
        lk.apply(model, config)
        counts[name] = lk.core.model.trainable_parameters(model)[0]
    per_rank = counts["lora"] / 16
    return max(1, round(counts["mixture"] / per_rank)), counts


def plan_arms(steps: int, batch: int, rank: int) -> list[tuple[str, list[str]]]:
    """(arm, `lorakit train` options) of every trained arm."""
    common = ["--steps", str(steps), "--batch-size", str(batch), "--micro-batch-size", str(batch),
              "--skip-eval", "--no-progress-bar", "--checkpoint-every", "0"]  # fmt: skip
    arms = {
        "lora": ["--method", "lora"],
        "lora-matched": ["--method", "lora", "--rank", str(rank), "--alpha", str(2 * rank)],
        "expert-lora": ["--method", "mopeft", "--experts", "lora"],
        "expert-adapter": ["--method", "mopeft", "--experts", "adapter"],
        "expert-prefix": ["--method", "mopeft", "--experts", "prefix"],
        "mixture": ["--method", "mopeft", "--experts", MIXTURE],
        "mixture-top1": ["--method", "mopeft", "--experts", MIXTURE, "--gate", "topk", "--top-k", "1"],
    }
    plan = [(arm, ["--task", MIXED, *args, *common]) for arm, args in arms.items()]
    task_steps = [*common]
    task_steps[1] = str(steps // len(TASKS))
    plan += [(f"task-{SHORT[t]}", ["--task", t, "--method", "lora", *task_steps]) for t in TASKS]
    return plan


def train_arms(out: Path, steps: int, batch: int) -> dict[str, Any]:
    runs, log = out / "runs", out / "train.log"
    runs.mkdir(parents=True, exist_ok=True)
    rank, counts = matched_rank()
    for arm, args in plan_arms(steps, batch, rank):
        folder = runs / arm
        if (folder / "adapter" / "adapter_config.json").is_file():
            continue
        started = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] train {arm}", flush=True)
        lorakit("train", *args, "--output-dir", str(folder), log=log)
        (folder / "wall_s").write_text(f"{time.perf_counter() - started:.1f}\n")
    tasks = [str(runs / f"task-{SHORT[t]}" / "adapter") for t in TASKS]
    for combination, extra in COMBINATIONS.items():
        folder = runs / f"merge-{combination}"
        if not (folder / "adapter_config.json").is_file():
            lorakit(
                "merge-adapters", *tasks, "--combination", combination, *extra, "--out", str(folder), log=log
            )
    return {"matched_rank": rank, "parameter_counts": counts}


def held_out(tokenizer: Any) -> dict[str, tuple[list[Any], list[Any]]]:
    """Per task: the held-out items and their encoded answers (for the NLL)."""
    from lorakit.data import build_sft_dataset, load_task

    out = {}
    for task in TASKS:
        items = load_task(task).eval[:EVAL_ITEMS]
        answers = build_sft_dataset(
            tokenizer, [[*it.messages, {"role": "assistant", "content": it.reference}] for it in items], 512
        )
        out[task] = (items, answers.samples)
    return out


def train_prompts(task: str, n: int) -> list[Any]:
    from lorakit.data import load_task

    return [conv[:-1] for conv in load_task(task).train[:n]]


def score(
    model: Any, tokenizer: Any, data: dict[str, Any], texts: list[str], route: Any = None
) -> dict[str, Any]:
    """Each task's exact match and answer NLL, and general-text NLL; `route(items) -> [(choice,
    rows)]` answers groups of items under a routing choice (the router arm)."""
    from lorakit.core.model import weighted
    from lorakit.data import collate, score_exact_match
    from lorakit.run_eval import eval_autocast
    from lorakit.train import evaluate as ev

    amp = eval_autocast(model)
    result: dict[str, Any] = {}
    for task, (items, samples) in data.items():
        groups = route(items) if route else [(None, list(range(len(items))))]
        correct, nll_sum, tokens = 0, 0.0, 0
        for choice, rows in groups:
            with weighted(model, choice) if choice else contextlib.nullcontext():
                if task in EXACT:
                    got = ev.exact_match(model, tokenizer, [items[i] for i in rows], score_exact_match,
                                         max_new_tokens=24, autocast_dtype=amp)  # fmt: skip
                    correct += got["correct"]
                part = [samples[i] for i in rows]
                nll = ev.answer_nll(model, part, collate, tokenizer.pad_token_id, autocast_dtype=amp)
                count = sum(sum(1 for x in s.labels if x != -100) for s in part)
                nll_sum, tokens = nll_sum + nll["nll"] * count, tokens + count
        result[task] = {"answer_nll": nll_sum / tokens, "n": len(items)}
        if task in EXACT:
            result[task]["exact_match"] = correct / len(items)
    result["general_nll"] = ev.text_nll(model, tokenizer, texts, autocast_dtype=amp)["nll"]
    return result


def gate_map(model: Any, tokenizer: Any) -> dict[str, dict[str, dict[str, float]]]:
    """Task -> decoder layer -> expert -> mean gate over the task's held-out prompts (every module
    of the layer holding that expert averaged)."""
    from lorakit.data import load_task
    from lorakit.methods.mopeft import gate_means
    from lorakit.routing import prompt_ids

    maps = {}
    for task in TASKS:
        prompts = [it.messages for it in load_task(task).eval[:GATE_PROMPTS]]
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        means = gate_means(model, input_ids, mask)
        layers: dict[str, dict[str, list[float]]] = {}
        for path, experts in means.items():
            layer = path.split(".layers.")[1].split(".")[0]
            for expert, value in experts.items():
                layers.setdefault(layer, {}).setdefault(expert, []).append(value)
        maps[task] = {k: {e: sum(v) / len(v) for e, v in ex.items()} for k, ex in layers.items()}
    return maps


def adapter_params(runs: Path, arm: str) -> int:
    """Elements in the arm's adapter file(s): the router holds its three task adapters."""
    from safetensors import safe_open

    folders = (
        [runs / f"task-{SHORT[t]}" / "adapter" for t in TASKS]
        if arm == "router"
        else [runs / arm if arm.startswith("merge-") else runs / arm / "adapter"]
    )
    total = 0
    for folder in folders:
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def score_arms(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from lorakit import api
    from lorakit.arena.latency import ms_per_token
    from lorakit.data import general_texts
    from lorakit.run import api_load

    runs, scores = out / "runs", out / "scores"
    scores.mkdir(exist_ok=True)
    arms = ["base", "lora", "lora-matched", "expert-lora", "expert-adapter", "expert-prefix", "mixture", "mixture-top1",
            *(f"task-{SHORT[t]}" for t in TASKS), "router", *(f"merge-{c}" for c in COMBINATIONS)]  # fmt: skip
    texts = general_texts()
    for arm in arms:
        path = scores / f"{arm}.json"
        if path.is_file():
            continue
        print(f"[{time.strftime('%H:%M:%S')}] score {arm}", flush=True)
        model, tokenizer = api_load(None)
        data = held_out(tokenizer)
        row: dict[str, Any] = {"arm": arm}
        route = None
        if arm == "router":
            router = task_router(model, tokenizer, runs)
            row["routing"] = {}
            for task in TASKS:
                probs = router.probabilities(model, tokenizer, [it.messages for it in data[task][0]])
                picks = [router.names[int(p.argmax())] for p in probs]
                row["routing"][task] = {n: picks.count(n) for n in router.names}

            def route(
                items: list[Any], router: Any = router, model: Any = model, tok: Any = tokenizer
            ) -> list[Any]:
                probs = router.probabilities(model, tok, [it.messages for it in items])
                groups: dict[str, list[int]] = {}
                for i, p in enumerate(probs):
                    groups.setdefault(router.names[int(p.argmax())], []).append(i)
                return [({n: 1.0}, rows) for n, rows in groups.items()]
        elif arm != "base":
            folder = runs / arm / "adapter" if not arm.startswith("merge-") else runs / arm
            tokenizer, _ = api.load_as_trained(model, tokenizer, folder)
        row["scores"] = score(model, tokenizer, data, texts, route)
        if arm == "router":
            row.update(routed_latency(model, tokenizer, router))
        else:
            row["ms_per_token"] = ms_per_token(model, tokenizer, LATENCY_TOKENS)["ms_per_token"]
        if arm.startswith("mixture"):
            row["gates"] = gate_map(model, tokenizer)
        if arm != "base":
            row["adapter_params"] = adapter_params(runs, arm)
        log = runs / arm / "log.jsonl"
        if log.is_file():
            last = [json.loads(line) for line in log.read_text().splitlines() if '"elapsed"' in line][-1]
            row["step_s"], row["steps"] = last["elapsed"] / last["step"], last["step"]
        path.write_text(json.dumps(row, indent=2) + "\n")
    return {arm: json.loads((scores / f"{arm}.json").read_text()) for arm in arms}


def report(out: Path, meta: dict[str, Any], rows: dict[str, Any]) -> None:
    base = rows["base"]["scores"]
    lines = [
        "| arm | icd EM | capitals EM | icd NLL | capitals NLL | zh NLL | general NLL (base "
        f"{base['general_nll']:.3f}) | s/step | ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        s = row["scores"]
        cells = [
            f"{100 * s['icd10-chapter']['exact_match']:.0f}%",
            f"{100 * s['world-capitals']['exact_match']:.0f}%",
            *(f"{s[t]['answer_nll']:.3f}" for t in TASKS),
            f"{s['general_nll']:.3f} ({s['general_nll'] - base['general_nll']:+.3f})",
            f"{row['step_s']:.2f}" if row.get("step_s") else "-",
            f"{row['ms_per_token']:.1f}",
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if "routing" in rows.get("router", {}):
        lines += ["", "Router picks per task (held-out prompts):", ""]
        for task, picks in rows["router"]["routing"].items():
            lines.append(f"- {task}: " + ", ".join(f"{n} {c}" for n, c in picks.items()))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "arms": rows}, indent=2) + "\n")
    for arm in ("mixture", "mixture-top1"):
        if rows.get(arm, {}).get("gates"):
            heatmap(rows[arm]["gates"], out / f"gates-{arm}.png", arm)
    print("\n".join(lines))


def heatmap(gates: dict[str, Any], path: Path, arm: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({e for layers in gates.values() for ex in layers.values() for e in ex})
    layers = sorted({int(k) for m in gates.values() for k in m})
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(3.2 * (len(TASKS) + 1), 6), sharey=True)
    grids = {t: [[gates[t][str(la)].get(e, float("nan")) for e in experts] for la in layers] for t in TASKS}
    vmin = min(v for g in grids.values() for r in g for v in r if v == v)
    vmax = max(v for g in grids.values() for r in g for v in r if v == v)
    for ax, task in zip(axes, TASKS, strict=False):
        image = ax.imshow(grids[task], aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(task, fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=45)
    fig.colorbar(image, ax=axes[len(TASKS) - 1])
    spread = [[max(grids[t][i][j] for t in TASKS) - min(grids[t][i][j] for t in TASKS) for j in range(len(experts))]
              for i in range(len(layers))]  # fmt: skip
    image = axes[-1].imshow(spread, aspect="auto", cmap="magma")
    axes[-1].set_title("max - min over tasks", fontsize=9)
    axes[-1].set_xticks(range(len(experts)), experts, rotation=45)
    fig.colorbar(image, ax=axes[-1])
    axes[0].set_ylabel("decoder layer")
    axes[0].set_yticks(range(0, len(layers), 3), [str(layers[i]) for i in range(0, len(layers), 3)])
    fig.suptitle(f"MoPEFT ({arm}): mean gate per decoder layer and expert, per task (held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cost(out: Path, batch: int, steps: int = COST_STEPS) -> dict[str, Any]:
    """Step time and decode latency of each trained arm again, on a quiet machine and the code as it
    is now: a short run of the arm's own options (median seconds between logged steps, the first
    two left out), then 24 greedy tokens with its trained adapter (median of 3)."""
    import statistics

    from lorakit import api
    from lorakit.arena.latency import ms_per_token
    from lorakit.run import api_load

    meta = json.loads((out / "results.json").read_text())["meta"]
    rows = {}
    for arm, args in plan_arms(steps, batch, meta["matched_rank"]):
        if arm.startswith("task-"):
            continue
        folder = out / "cost" / arm
        if folder.exists():
            shutil.rmtree(folder)
        print(f"[{time.strftime('%H:%M:%S')}] cost {arm}", flush=True)
        lorakit("train", *args, "--output-dir", str(folder), log=out / "cost.log")
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        elapsed = [r["elapsed"] for r in log if "elapsed" in r]
        gaps = [b - a for a, b in zip(elapsed[1:], elapsed[2:], strict=False)]
        model, tokenizer = api_load(None)
        tokenizer, _ = api.load_as_trained(model, tokenizer, out / "runs" / arm / "adapter")
        rows[arm] = {
            "step_s": statistics.median(gaps),
            "ms_per_token": ms_per_token(model, tokenizer, LATENCY_TOKENS)["ms_per_token"],
        }
    model, tokenizer = api_load(None)
    rows["base"] = {"ms_per_token": ms_per_token(model, tokenizer, LATENCY_TOKENS)["ms_per_token"]}
    for arm in COMBINATIONS:  # a merged combination is a plain LoRA folder
        model, tokenizer = api_load(None)
        tokenizer, _ = api.load_as_trained(model, tokenizer, out / "runs" / f"merge-{arm}")
        rows[f"merge-{arm}"] = {
            "ms_per_token": ms_per_token(model, tokenizer, LATENCY_TOKENS)["ms_per_token"]
        }
    rows["router"] = router_latency(out)
    (out / "cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def task_router(model: Any, tokenizer: Any, runs: Path) -> Any:
    """The router over the three task adapters, fitted on 200 training prompts of each task, with
    the adapters loaded."""
    from lorakit.routing import load_task_adapters, train_router

    adapters = {SHORT[t]: str(runs / f"task-{SHORT[t]}" / "adapter") for t in TASKS}
    router = train_router(model, tokenizer, {SHORT[t]: train_prompts(t, 200) for t in TASKS}, adapters)
    load_task_adapters(model, router)
    return router


def routed_latency(model: Any, tokenizer: Any, router: Any) -> dict[str, float]:
    """A routed reply: the routing forward of the prompt (median of 3), then decoding under the
    adapter it picks; per new token, the routing spread over LATENCY_TOKENS."""
    import statistics

    from lorakit.arena.latency import ms_per_token
    from lorakit.bench.infer import PROMPT
    from lorakit.core.model import weighted

    prompt = [{"role": "user", "content": PROMPT}]
    times = []
    for _ in range(3):
        started = time.perf_counter()
        choice = router.choose(model, tokenizer, prompt)
        times.append(1000 * (time.perf_counter() - started))
    with weighted(model, choice):
        decode = ms_per_token(model, tokenizer, LATENCY_TOKENS)["ms_per_token"]
    route = statistics.median(times)
    return {"route_ms": route, "decode_ms_per_token": decode, "ms_per_token": decode + route / LATENCY_TOKENS}


def router_latency(out: Path) -> dict[str, float]:
    """`routed_latency` on a freshly loaded base model (the `--cost` pass)."""
    from lorakit.run import api_load

    model, tokenizer = api_load(None)
    return routed_latency(model, tokenizer, task_router(model, tokenizer, out / "runs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mopeft-study")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cost", action="store_true", help="after the study: step time and latency, quietly")
    args = parser.parse_args()
    if args.cost:
        print(json.dumps(cost(Path(args.out), args.batch), indent=2))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = train_arms(out, args.steps, args.batch)
    meta.update(steps=args.steps, batch=args.batch, eval_items=EVAL_ITEMS, threads=torch.get_num_threads())
    rows = score_arms(out, meta)
    meta["wall_s"] = time.perf_counter() - started
    report(out, meta, rows)


if __name__ == "__main__":
    main()
