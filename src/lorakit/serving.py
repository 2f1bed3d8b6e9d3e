"""Will a server serve this adapter, with the outputs it had in training? (`lorakit check`, and the
warning `lorakit train` prints at the start.)

The rules are what each server's own code does with a PEFT folder, read from its source (versions
and places in docs/export.md); they are data here, one `Rule` per feature, so a server that changes
is one edited line. Three answers per server:

    yes      the folder is served as it is, with the same change to every weight
    convert  served after a lorakit conversion or a server flag (`todo` says which); the result
             has the same change
    no       not served with the same outputs; `todo` gives the alternative (usually: merge the
             adapter, serve the merged model)

Everything is decided from `adapter_config.json` and the tensor names, without loading a model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .core.state import PREFIX, read_adapter_config, tensor_names

SERVERS = ("vllm", "sglang", "llama.cpp", "ollama")
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
LINEAR_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MERGE = "merge it (lorakit merge) and serve the merged model"
PORTABLE = "lorakit export --format peft (scale folded into B, one rank, lora_alpha = r)"
GGUF = "lorakit export --format gguf (then --lora FILE; Ollama: ADAPTER FILE)"
_FACTOR = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.weight)?$")


ANSWERS = ("yes", "convert", "no")


@dataclass
class Verdict:
    server: str
    answer: str = "yes"  # the worst of the findings: yes < convert < no
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (answer, what, why)
    todo: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, answer: str, what: str, why: str, todo: str) -> None:
        self.answer = max(self.answer, answer, key=ANSWERS.index)
        self.findings.append((answer, what, why))
        if todo not in self.todo:
            self.todo.append(todo)


@dataclass(frozen=True)
class Features:
    """What of an adapter matters to a server."""

    peft_type: str
    ranks: tuple[int, ...] = ()
    rslora: bool = False
    patterns: bool = False  # alpha / rank differ per module
    integer_alpha: bool = True
    dora: bool = False
    alora: bool = False
    extra_tensors: tuple[str, ...] = ()  # modules_to_save, trainable tokens, biases: not LoRA factors
    targets: tuple[str, ...] = ()
    quantized_base: bool = False

    @classmethod
    def of_config(cls, config: dict[str, Any], tensor_names: Iterable[str] = ()) -> Features:
        kind = str(config.get("peft_type", "")).upper()
        names = [n.removeprefix(PREFIX) for n in tensor_names]
        extra = [n for n in names if not _FACTOR.search(n)]
        extra += [f"modules_to_save: {m}" for m in config.get("modules_to_save") or []]
        if config.get("trainable_token_indices"):
            extra.append("trainable_token_indices")
        if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
            extra.append(f"bias={config.get('bias')}")
        rank = int(config.get("r", 0) or 0)
        alpha = config.get("lora_alpha", rank)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        ranks = {rank, *map(int, rank_pattern.values())} if kind == "LORA" else set()
        alphas = [alpha, *alpha_pattern.values()]
        targets = config.get("target_modules") or []
        return cls(
            peft_type=kind,
            ranks=tuple(sorted(ranks)),
            rslora=bool(config.get("use_rslora")),
            patterns=(
                any(int(v) != rank for v in rank_pattern.values())
                or any(float(v) != float(alpha) for v in alpha_pattern.values())
            ),
            integer_alpha=all(float(a) == int(float(a)) for a in alphas),
            dora=bool(config.get("use_dora")),
            alora=bool(config.get("alora_invocation_tokens")),
            extra_tensors=tuple(extra),
            targets=tuple([targets] if isinstance(targets, str) else targets),
        )


def check_folder(path: str | os.PathLike) -> tuple[Features, list[Verdict]]:
    """The verdict of every server on the adapter folder at `path`."""
    config, weights = read_adapter_config(path)
    features = Features.of_config(config, tensor_names(weights))
    if os.path.isfile(os.path.join(path, "quantization.json")):  # a QLoRA folder
        features = replace(features, quantized_base=True)
    return features, verdicts(features)


def verdicts(f: Features) -> list[Verdict]:
    out = {s: Verdict(s) for s in SERVERS}
    vllm, sglang, llama, ollama = (out[s] for s in SERVERS)
    if f.peft_type != "LORA":
        _not_lora(f, out)
        return list(out.values())
    llama.add("convert", "format", "llama.cpp reads GGUF adapters, not PEFT folders", GGUF)
    if f.dora:
        for v in out.values():
            v.add("no", "DoRA", "a magnitude per output row is not a low-rank change; not applied", MERGE)
    if f.extra_tensors:
        what = ", ".join(f.extra_tensors[:3]) + (" ..." if len(f.extra_tensors) > 3 else "")
        why = {
            "vllm": "vLLM accepts modules_to_save only as None and no LoRA biases",
            "sglang": "SGLang loads LoRA factors only",
            "llama.cpp": "no llama.cpp LoRA tensor holds them",
            "ollama": "Ollama loads LoRA factors only",
        }
        for v in out.values():
            v.add("no", "tensors that are not LoRA factors", f"{what}: {why[v.server]}", MERGE)
    if f.alora:
        for v in (vllm, sglang, ollama):
            v.add(
                "no",
                "aLoRA",
                "applied to every token, not from the invocation on",
                "serve it with llama.cpp (it reads adapter.alora.invocation_tokens) or in lorakit",
            )
    if f.rslora:
        sglang.add(
            "convert", "rsLoRA", "SGLang scales by alpha / r, ignoring use_rslora (sglang#40835)", PORTABLE
        )
        ollama.add(
            "convert", "rsLoRA", "Ollama's adapter import scales by alpha / r", f"{PORTABLE}, or {GGUF}"
        )
    if f.patterns:
        vllm.add("convert", "per-module alpha / rank", "vLLM uses one alpha / r for every module", PORTABLE)
        sglang.add(
            "convert", "per-module alpha / rank", "not every SGLang version scales per module", PORTABLE
        )
        ollama.add("convert", "per-module alpha / rank", "Ollama uses one alpha", f"{PORTABLE}, or {GGUF}")
    if not f.integer_alpha:
        ollama.add(
            "convert",
            "non-integer lora_alpha",
            "Ollama's adapter import reads it as an integer",
            f"{PORTABLE}, or {GGUF}",
        )
    rank = max(f.ranks, default=0)
    if rank > VLLM_MAX_RANKS[-1]:
        vllm.add("no", f"rank {rank}", f"above vLLM's largest --max-lora-rank ({VLLM_MAX_RANKS[-1]})", MERGE)
    elif rank > 16:
        need = next(r for r in VLLM_MAX_RANKS if r >= rank)
        vllm.add(
            "convert",
            f"rank {rank}",
            "above vLLM's default --max-lora-rank (16)",
            f"start vLLM with --max-lora-rank {need}",
        )
    odd = [t for t in f.targets if t.rsplit(".", 1)[-1] not in LINEAR_TARGETS | {"embed_tokens", "lm_head"}]
    if odd and f.targets != ("all-linear",):
        for v in (vllm, sglang, ollama):
            v.add(
                "no",
                "targets",
                f"{', '.join(odd[:3])}: servers adapt the attention and MLP projections only",
                MERGE,
            )
    if f.quantized_base:
        for v in out.values():
            v.notes.append(
                "trained on a 4-bit (NF4) base: a server's bf16 or GGUF base gives slightly different outputs"
            )
    return list(out.values())


def _not_lora(f: Features, out: dict[str, Verdict]) -> None:
    kind = f.peft_type or "unknown"
    if kind in ("QUANTUM_PEFT", "ADALORA"):
        for v in out.values():
            then = f", then {GGUF}" if v.server in ("llama.cpp", "ollama") else ""
            v.add("convert", kind, "a low-rank change saved in its own form, not as LoRA", PORTABLE + then)
        return
    why = {
        "PROMPT_TUNING": "virtual tokens prepended as embeddings: no server here takes them",
        "PREFIX_TUNING": "learned keys and values in every layer: no server here takes them",
        "BOTTLENECK_ADAPTER": "a bottleneck MLP after the layer: no server here has one",
        "MOPEFT": "a routed mixture with a gate per layer: no server here routes experts",
        "FULL": "a full set of weights: a model, not an adapter",
        "BITFIT": "changed biases: not a low-rank change",
        "NORM_TUNING": "changed norm weights: not a low-rank change",
    }.get(kind, "not a LoRA folder")
    todo = "serve it in lorakit (lorakit chat)" if kind in ("PROMPT_TUNING", "MOPEFT") else MERGE
    for v in out.values():
        v.add("no", kind, why, todo)


def format_verdicts(features: Features, results: list[Verdict]) -> str:
    lines = [f"adapter: {features.peft_type}, rank {', '.join(map(str, features.ranks)) or '-'}"]
    width = max(len(v.server) for v in results)
    for v in results:
        lines.append(f"{v.server:<{width}}  {v.answer}")
        lines += [f"{'':<{width}}    {what}: {why}" for _, what, why in v.findings]
        lines += [f"{'':<{width}}    to do: {t}" for t in v.todo]
        lines += [f"{'':<{width}}    note: {n}" for n in v.notes]
    return "\n".join(lines)


def as_json(features: Features, results: list[Verdict]) -> dict[str, Any]:
    return {"adapter": asdict(features), "servers": [asdict(v) for v in results]}


def train_warnings(method: Any) -> list[str]:
    """One line per option of the method config `method` that makes an adapter some server cannot
    serve as trained (its 'no' findings; what a conversion fixes is not worth a warning)."""
    to_peft = getattr(method, "to_peft_dict", None)
    peft_config = to_peft() if callable(to_peft) else {"peft_type": getattr(method, "peft_type", "")}
    if str(peft_config.get("peft_type")).upper() == "FULL":  # the result is a model, served as one
        return []
    blocked: dict[str, list[str]] = {}
    for v in verdicts(Features.of_config(peft_config)):
        for answer, what, _ in v.findings:
            if answer == "no":
                blocked.setdefault(what, []).append(v.server)
    return [
        f"serving: {what}: not served as trained by {', '.join(servers)} (after training, `lorakit check ADAPTER` says what to do)"
        for what, servers in blocked.items()
    ]
