"""`lorakit bench --suite alora`: a 50-turn conversation with an adapter invoked after every turn.

The conversation grows by about `turn_tokens` a turn (a user message and an answer, fixed text from
Python's own documentation, tokenized turn by turn and concatenated so no arm re-tokenizes it).
After every turn an adapter is invoked: the invocation `<|im_start|>check` and a newline are
prefilled and `new_tokens` tokens are generated greedily; its output does not join the history, so
every arm sees the same conversation. Arms (later-methods.md section 1.6):

- alora: aLoRA on the base model's cache, which grows with the history; the invocation is
  prefilled on it with the adapter, then the cache is cropped back;
- lora_reprefill: LoRA, stateless: the whole history plus the invocation prefilled every turn;
- lora_own_cache: LoRA keeping a second cache of its own, extended by each turn's tokens with the
  LoRA weights before the invocation;
- base: the invocation and generation on the base cache, with no adapter (the floor);
- peft_alora: PEFT's aLoRA on the same workload, reusing the base cache the same way.

Every arm has the same random non-zero adapter weights; latency does not depend on training.
Per turn: time to the first adapter token (the prefill of the adapter call, plus for
lora_own_cache the turn's own tokens), total adapter latency, tokens the adapter call prefilled,
and the KV bytes held (the conversation's base cache, which the base model's own turns need in
every arm, plus the adapter's own caches). The alora arm's tokens are checked against aLoRA without any cache (full
forwards) at a few turns. One process runs the arms one after the other, fp32, `threads` threads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

import lorakit as lk
from lorakit.core.kvcache import cache_argument

from .report import machine_info

ARMS = ("alora", "lora_reprefill", "lora_own_cache", "base", "peft_alora")
INVOCATION = "<|im_start|>check"
REPORT_TURNS = (1, 10, 25, 50)


def conversation_ids(tokenizer: Any, turns: int, turn_tokens: int) -> list[list[int]]:
    """Each turn's ids: a user message and an answer of real text, about `turn_tokens` in all."""
    from lorakit.data import general_texts

    words = " ".join(general_texts()).split()
    out, at = [], 0
    for _ in range(turns):
        take = max(4, round(0.64 * turn_tokens))  # words: ~1.4 tokens each, plus the template's
        user, answer = " ".join(words[at : at + take // 2]), " ".join(words[at + take // 2 : at + take])
        at += take
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if out:  # the system prompt the template may add goes once, at the start
            text = text[text.index("<|im_start|>user") :] if "<|im_start|>user" in text else text
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.01, generator=gen)


def _kv_bytes(cache: Any) -> int:
    keys = [getattr(layer, "keys", None) for layer in cache.layers]
    return sum(2 * k.numel() * k.element_size() for k in keys if isinstance(k, torch.Tensor))


def kv_bytes_per_token(model: nn.Module) -> int:
    """2 (keys, values) x layers x kv heads x head dim x bytes."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


class Arm:
    """One way to serve the adapter call of each turn."""

    def __init__(self, name: str, model: nn.Module, invocation: list[int], new_tokens: int) -> None:
        self.name, self.model, self.invocation, self.new_tokens = name, model, invocation, new_tokens
        self.key = cache_argument(model)
        self.history: list[int] = []

    def forward(self, ids: list[int], cache: Any, **extra: Any) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, **{self.key: cache}, **extra)
        return out.logits[0, -1]

    def greedy(self, logits: torch.Tensor, cache: Any, **decode_extra: Any) -> list[int]:
        """`new_tokens` greedy tokens from the prefill's last logits (no stop at eos)."""
        tokens = [int(logits.argmax())]
        for _ in range(self.new_tokens - 1):
            tokens.append(int(self.forward([tokens[-1]], cache, **decode_extra).argmax()))
        return tokens


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_arm(
    arm: str, model: nn.Module, turns: list[list[int]], invocation: list[int], new_tokens: int
) -> list[dict]:
    """Play the conversation for one arm; one record per turn."""
    a = Arm(arm, model, invocation, new_tokens)
    base_cache = DynamicCache(config=model.config)
    own_cache = DynamicCache(config=model.config)
    records = []
    per_token = kv_bytes_per_token(model)
    with torch.inference_mode():
        warm = DynamicCache(config=model.config)  # untimed: first-call allocations and dispatch
        a.greedy(
            a.forward(turns[0] + invocation, warm),
            warm,
            **({"alora_offsets": [1]} if arm == "peft_alora" else {}),
        )
        for t, turn in enumerate(turns, start=1):
            if arm in ("alora", "base", "peft_alora"):  # the history on the base weights
                with _base(model, arm):
                    a.forward(turn, base_cache)
            a.history += turn
            record = {"turn": t, "history": len(a.history)}
            start = time.perf_counter()
            if arm == "lora_reprefill":
                cache = DynamicCache(config=model.config)
                logits = a.forward(a.history + invocation, cache)
                record["prefilled"] = len(a.history) + len(invocation)
            elif arm == "lora_own_cache":
                a.forward(turn, own_cache)
                cache, length = own_cache, own_cache.get_seq_length()
                logits = a.forward(invocation, cache)
                record["prefilled"] = len(turn) + len(invocation)
            else:
                cache, length = base_cache, base_cache.get_seq_length()
                with _base(model, arm) if arm == "base" else contextlib.nullcontext():
                    logits = a.forward(invocation, cache)
                record["prefilled"] = len(invocation)
            record["ttft_s"] = time.perf_counter() - start
            extra = {"alora_offsets": [1]} if arm == "peft_alora" else {}  # PEFT: adapt each new token
            with _base(model, arm) if arm == "base" else contextlib.nullcontext():
                tokens = a.greedy(logits, cache, **extra)
            record["total_s"] = time.perf_counter() - start
            # what the deployment holds at the end of the adapter call: the conversation's base
            # cache (the base model's own turns need it in every arm; the LoRA arms do not fill
            # theirs here, so it is counted from its size per token) plus the adapter's own caches
            base_held = per_token * len(a.history) if arm.startswith("lora") else _kv_bytes(base_cache)
            own = _kv_bytes(own_cache) + (_kv_bytes(cache) if arm == "lora_reprefill" else 0)
            record["kv_bytes"] = base_held + own
            record["tokens"] = tokens
            if arm != "lora_reprefill":
                cache.crop(length - cache.get_seq_length())
            records.append(record)
    return records


def _base(model: nn.Module, arm: str) -> Any:
    if arm == "peft_alora":
        return model.disable_adapter()
    return lk.disable_adapters(model) if lk.adapter_names(model) else contextlib.nullcontext()


def no_cache_tokens(model: nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """aLoRA's greedy tokens with a full forward per token and no cache at all."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def build_arm(arm: str, model_name: str | None, invocation: list[int]) -> nn.Module:
    """A fresh model per arm (deep-copied config: sharing one switches attention implementations)."""
    from .build import load

    model, _ = load(model_name)
    model.config = copy.deepcopy(model.config)
    model.set_attn_implementation("sdpa")
    if arm == "alora":
        lk.apply(model, lk.ALoRAConfig(rank=16, alpha=32, invocation_tokens=invocation))
    elif arm in ("lora_reprefill", "lora_own_cache"):
        lk.apply(model, lk.LoRAConfig(rank=16, alpha=32))
    elif arm == "peft_alora":
        import peft

        config = peft.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", alora_invocation_tokens=invocation,
            task_type="CAUSAL_LM",
        )  # fmt: skip
        model = peft.get_peft_model(model, config)
    _randomize(model)
    return model.eval()


def run_alora_bench(
    model: str | None = None,
    turns: int = 50,
    turn_tokens: int = 100,
    new_tokens: int = 8,
    threads: int = 2,
    out_dir: str | Path = "bench-results",
    arms: tuple[str, ...] = ARMS,
    check_turns: tuple[int, ...] = REPORT_TURNS,
) -> dict[str, Any]:
    """Run every arm; write alora.json, alora.md and alora.png to `out_dir`; return the report."""
    from .build import load

    torch.set_num_threads(threads)
    _, tokenizer = load(model)
    invocation = tokenizer(INVOCATION + "\n", add_special_tokens=False)["input_ids"]
    turn_ids = conversation_ids(tokenizer, turns, turn_tokens)
    results: dict[str, Any] = {}
    for arm in arms:
        try:
            built = build_arm(arm, model, invocation[:-1])  # the adapter's invocation: without "\n"
        except ImportError as err:
            results[arm] = {"skipped": str(err)}
            continue
        results[arm] = {"turns": run_arm(arm, built, turn_ids, invocation, new_tokens)}
        if arm == "alora":
            results[arm]["checks"] = _check(
                built, turn_ids, invocation, new_tokens, results[arm]["turns"], check_turns
            )
        del built
    report = {
        "machine": machine_info(threads),
        "workload": _workload(turn_ids, invocation, new_tokens, model),
        "arms": results,
    }
    report["summary"] = summary(results, turns)
    return _write(report, Path(out_dir))


def _check(model, turn_ids, invocation, new_tokens, records, check_turns) -> list[dict]:
    checks = []
    for t in check_turns:
        if t > len(turn_ids):
            continue
        history = [i for turn in turn_ids[:t] for i in turn]
        expected = no_cache_tokens(model, history + invocation, new_tokens)
        checks.append({"turn": t, "equal": expected == records[t - 1]["tokens"]})
    return checks


def _workload(turn_ids, invocation, new_tokens, model) -> dict[str, Any]:
    return {
        "model": model or "SmolLM2-135M-Instruct",
        "turns": len(turn_ids),
        "tokens_per_turn": round(sum(map(len, turn_ids)) / len(turn_ids), 1),
        "history_tokens_at_end": sum(map(len, turn_ids)),
        "invocation_tokens": len(invocation),
        "new_tokens": new_tokens,
        "dtype": "fp32",
        "attention": "sdpa",
        "adapter": "rank 16, alpha 32, all linear layers, random non-zero B",
    }


def summary(results: dict[str, Any], turns: int) -> dict[str, Any]:
    """The figures at the report turns and the ratio of re-prefilling LoRA to aLoRA at the last."""
    rows = {}
    for arm, result in results.items():
        if "turns" not in result:
            continue
        by_turn = {r["turn"]: r for r in result["turns"]}
        rows[arm] = {
            str(t): {k: by_turn[t][k] for k in ("ttft_s", "total_s", "prefilled", "kv_bytes", "history")}
            for t in sorted({*REPORT_TURNS, turns} & set(by_turn))
        }
    out: dict[str, Any] = {"at_turns": rows}
    if "alora" in rows and str(turns) in rows["alora"]:
        first, last = rows["alora"].get("1"), rows["alora"][str(turns)]
        if first:
            out["alora_last_over_first_ttft"] = last["ttft_s"] / first["ttft_s"]
            out["alora_last_over_first_total"] = last["total_s"] / first["total_s"]
        for other in ("lora_reprefill", "lora_own_cache", "peft_alora", "base"):
            if other in rows and str(turns) in rows[other]:
                out[f"{other}_over_alora_ttft_last"] = rows[other][str(turns)]["ttft_s"] / last["ttft_s"]
                out[f"{other}_over_alora_total_last"] = rows[other][str(turns)]["total_s"] / last["total_s"]
    return out


def _write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "alora.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "alora.md").write_text(markdown(report))
    _plot(report, out / "alora.png")
    report["files"] = {
        "json": str(out / "alora.json"),
        "markdown": str(out / "alora.md"),
        "plot": str(out / "alora.png"),
    }
    return report


def markdown(report: dict[str, Any]) -> str:
    w, s = report["workload"], report["summary"]
    lines = [
        f"# aLoRA, {w['turns']} turns ({w['model']}, {w['dtype']}, {report['machine']['threads']} threads)",
        "",
        f"{w['tokens_per_turn']} tokens a turn, {w['history_tokens_at_end']} at the end; the adapter prefills "
        f"{w['invocation_tokens']} invocation tokens and generates {w['new_tokens']}.",
        "",
        "| arm | turn | history | prefilled | first token (ms) | adapter total (ms) | KV MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, rows in s["at_turns"].items():
        for t, r in rows.items():
            lines.append(
                f"| {arm} | {t} | {r['history']} | {r['prefilled']} | {1000 * r['ttft_s']:.1f} | "
                f"{1000 * r['total_s']:.1f} | {r['kv_bytes'] / 2**20:.1f} |"
            )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in s.items() if isinstance(v, float)]
    checks = report["arms"].get("alora", {}).get("checks", [])
    if checks:
        lines += ["", "aLoRA on the base cache equals aLoRA without any cache, token for token: "
                  + ", ".join(f"turn {c['turn']} {'yes' if c['equal'] else 'NO'}" for c in checks)]  # fmt: skip
    skipped = [f"{a} ({r['skipped']})" for a, r in report["arms"].items() if "skipped" in r]
    if skipped:
        lines += ["", "skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm, result in report["arms"].items():
        if "turns" in result:
            ax.plot(
                [r["turn"] for r in result["turns"]],
                [1000 * r["total_s"] for r in result["turns"]],
                label=arm,
            )
    ax.set_xlabel("turn")
    ax.set_ylabel("adapter latency (ms): prefill + generation")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"adapter call after each turn, {report['workload']['model']}")
    fig.tight_layout()
    fig.savefig(path)
