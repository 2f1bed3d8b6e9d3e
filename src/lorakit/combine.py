"""Static combination of trained LoRA adapters into one PEFT LoRA folder (`lorakit merge-adapters`).

Every combination works on each module's weight change dW_i = s_i B_i A_i (s_i: the adapter's
alpha / r, or alpha / sqrt(r) with rsLoRA), never on A and B separately, so the result is the
stated function of the changes and not of one factorisation of them:

    linear       sum_i w_i dW_i, written exactly by concatenating the factors (rank sum r_i)
    svd          the same sum, truncated to `rank` by an SVD (exact when rank >= sum r_i)
    ties         TIES-merging (Yadav et al., NeurIPS 2023): keep the top `density` share of each
                 w_i dW_i by magnitude, elect each entry's sign from the sum of what was kept, and
                 average the kept entries that agree with it; then an SVD to `rank`
    dare_linear  DARE (Yu et al., ICML 2024): drop each entry of dW_i with probability 1 - density
                 and scale the rest by 1 / density, then the weighted sum; then an SVD to `rank`
    dare_ties    DARE's drop, then TIES' sign election and disjoint mean; then an SVD to `rank`

PEFT's `add_weighted_adapter` names: our `linear` is its "cat", `svd` its "svd", `ties` its
"ties_svd", `dare_*` its "dare_*_svd". PEFT's "linear", "ties" and "dare_*" without "_svd" combine
the A matrices and the B matrices separately; (sum_i c_i B_i)(sum_i c_i A_i) has cross terms
B_i A_j, so for more than one adapter it is not the weighted sum of the changes. lorakit does not
offer that form. Unlike PEFT, TIES elects the sign from the *weighted* kept changes, so an adapter
given a small weight cannot outvote the others; with equal weights the two agree.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .core.io import atomic_folder
from .core.state import PREFIX, AdapterLoadError, read_adapter_folder, write_adapter_folder
from .methods.lora import LoRAConfig

COMBINATIONS = ("linear", "svd", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN = ("total", "frequency")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<side>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class Source:
    """One input adapter: per module (path without PEFT's prefix) the factors B (out, r), A (r, in)
    and the scale s, so that dW = s B @ A (for an embedding: the transposed table change)."""

    path: str
    config: dict[str, Any]
    factors: dict[str, tuple[Tensor, Tensor, float]]
    embedding: set[str]


@dataclass
class MergeReport:
    """What `merge_adapters` wrote: the folder, the output rank and, per module, the share of the
    combined change's Frobenius norm that the rank-`rank` result misses (0 when exact)."""

    out: Path
    rank: int
    combination: str
    weights: list[float]
    residual: dict[str, float] = field(default_factory=dict)

    @property
    def max_residual(self) -> float:
        return max(self.residual.values(), default=0.0)


def read_source(path: str | os.PathLike, allow_alora: bool = False) -> Source:
    """A PEFT LoRA folder (lorakit's or PEFT's) as factors; anything else is refused clearly. An
    aLoRA folder only with `allow_alora` (an export keeps its invocation; a combination cannot)."""
    config, tensors = read_adapter_folder(path)
    kind = config.get("peft_type")
    if kind != "LORA":
        hint = " (write it as LoRA first: lorakit export --adapter ...)" if kind == "QUANTUM_PEFT" else ""
        raise AdapterLoadError(f"{path} is a {kind} adapter; only LoRA folders are read here{hint}")
    if config.get("use_dora"):
        raise AdapterLoadError(
            f"{path} is a DoRA adapter: its change depends on the base weight's norms, so it is not a "
            "fixed low-rank change to combine; merge it into the model instead (lorakit merge)"
        )
    if config.get("alora_invocation_tokens") and not allow_alora:
        raise AdapterLoadError(
            f"{path} is an aLoRA adapter: it acts only from its invocation on, and a combined LoRA "
            "would act on every token; combine it with other aLoRA adapters at run time instead"
        )
    if config.get("trainable_token_indices"):
        raise AdapterLoadError(
            f"{path} trains token rows (an extended vocabulary, or PEFT's trainable tokens): they are "
            "not a low-rank change, and servers' LoRA loaders ignore them; merge it into the model "
            "instead (lorakit merge writes the model with its tokenizer)"
        )
    try:  # lorakit's own reading of the config: alpha/rank patterns, rsLoRA, unsupported options
        lora = LoRAConfig.from_peft_dict(config)
    except ValueError as err:
        raise AdapterLoadError(f"{path}: {err}") from None
    sides: dict[str, dict[str, Tensor]] = {}
    embedding: set[str] = set()
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if match is None:
            raise AdapterLoadError(
                f"{path}: tensor {key} is not a LoRA factor (modules_to_save, biases and trainable "
                "tokens cannot be combined); remove it or merge that adapter into the model instead"
            )
        side = match["side"]
        if "embedding" in side:
            embedding.add(match["module"])
        sides.setdefault(match["module"], {})[side.replace("embedding_", "")] = tensor
    factors: dict[str, tuple[Tensor, Tensor, float]] = {}
    for module, pair in sides.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterLoadError(
                f"{path}: module {module} has only {sorted(pair)}; the folder is incomplete"
            )
        # an embedding's lora_embedding_A is (r, vocab) and _B (dim, r): B @ A is its change transposed
        a, b = pair["lora_A"].double(), pair["lora_B"].double()
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterLoadError(f"{path}: {module}'s lora_A has rank {r} but lora_B {b.shape[1]}")
        factors[module] = (b, a, lora.scaling(r, float(lora.rank_alpha(module)[1])))
    if not factors:
        raise AdapterLoadError(f"{path} holds no LoRA factors")
    return Source(str(path), config, factors, embedding)


def _check_compatible(sources: list[Source]) -> None:
    base = {s.config.get("base_model_name_or_path") for s in sources} - {None}
    if len(base) > 1:
        raise ValueError(
            f"the adapters were trained on different base models ({', '.join(sorted(base))}); "
            "a combination is only meaningful on one base"
        )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for s in sources:
        for module, (b, a, _) in s.factors.items():
            shape = (b.shape[0], a.shape[1])
            seen = shapes.setdefault(module, (shape, s.path))
            if seen[0] != shape:
                raise ValueError(
                    f"{module} is {seen[0][0]}x{seen[0][1]} in {seen[1]} but {shape[0]}x{shape[1]} in "
                    f"{s.path}: the adapters belong to different models"
                )


def _generator(seed: int, module: str) -> torch.Generator:
    """DARE's drop pattern depends on the seed and the module only, not on the order of work."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


def _trim(delta: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) entries of largest magnitude (TIES' trim)."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view_as(delta)


def _drop(delta: Tensor, density: float, gen: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1 / density."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=gen, dtype=torch.float64) < density
    return delta * keep / density


def _disjoint_mean(deltas: Tensor, majority: str) -> Tensor:
    """TIES' elect + disjoint merge over (n, out, in) weighted changes."""
    signs = deltas.sign()
    votes = deltas.sum(0) if majority == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = signs == elected
    return (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)


def _low_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Truncated SVD of b @ a (b: (out, R), a: (R, in)) through QR of both factors, without forming
    the (out, in) product; the factors share the singular values as sqrt(S) each."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _split(qb @ u, s, vh @ qa.T, rank)


def _dense_low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _split(u, s, vh, rank)


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    total = float(s.square().sum())
    kept = s[:rank]
    residual = (max(total - float(kept.square().sum()), 0.0) / total) ** 0.5 if total > 0 else 0.0
    root = kept.sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    if b.shape[1] < rank:  # fewer singular values than the rank asked for: zero-pad
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)
    return b, a, residual


def combine_module(
    parts: Sequence[tuple[Tensor, Tensor, float] | None],
    weights: Sequence[float],
    combination: str,
    rank: int,
    density: float = 1.0,
    majority_sign: str = "total",
    gen: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """One module: the inputs' (B, A, scale) (None where an adapter lacks the module) -> the new
    B (out, rank), A (rank, in) with dW = B @ A, and the residual share the truncation left."""
    present = [(p, w) for p, w in zip(parts, weights, strict=True) if p is not None]
    if combination in ("linear", "svd"):
        b = torch.cat([p[0] for p, _ in present], 1)
        a = torch.cat([w * p[2] * p[1] for p, w in present], 0)
        if combination == "linear":
            pad = rank - b.shape[1]
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
            return b, torch.cat([a, a.new_zeros(pad, a.shape[1])], 0), 0.0
        return _low_rank(b, a, rank)
    deltas = [w * p[2] * (p[0] @ p[1]) for p, w in present]
    if combination.startswith("dare"):
        assert gen is not None
        deltas = [_drop(d, density, gen) for d in deltas]
    if combination.endswith("ties"):
        if combination == "ties":
            deltas = [_trim(d, density) for d in deltas]
        merged = _disjoint_mean(torch.stack(deltas), majority_sign)
    else:
        merged = torch.stack(deltas).sum(0)
    return _dense_low_rank(merged, rank)


def merge_adapters(
    adapters: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    combination: str = "linear",
    rank: int | None = None,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
) -> MergeReport:
    """Combine LoRA adapter folders into one PEFT LoRA folder at `out` (see the module docstring).

    weights: one per adapter (default 1 each: the changes add up, task arithmetic; 1/n averages).
    rank: the output's rank; default the sum of the inputs' ranks, at which linear and svd are exact.
    density: the share kept by ties' trim and dare's drop. seed: dare's drop pattern."""
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    if majority_sign not in MAJORITY_SIGN:
        raise ValueError(f"majority_sign must be one of {', '.join(MAJORITY_SIGN)}, got {majority_sign!r}")
    if len(adapters) < 1:
        raise ValueError("give at least one adapter folder")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if not 0 < density <= 1:
        raise ValueError(f"density is the share of entries kept, in (0, 1]; got {density}")
    if combination in ("linear", "svd") and density != 1:
        raise ValueError(f"density applies to ties and dare_*; {combination} keeps every entry")
    sources = [read_source(path) for path in adapters]
    _check_compatible(sources)
    modules = sorted({m for s in sources for m in s.factors})
    full_rank = max(sum(s.factors[m][0].shape[1] for s in sources if m in s.factors) for m in modules)
    if combination == "linear":
        if rank is not None and rank != full_rank:
            raise ValueError(
                f"linear writes the exact sum at rank {full_rank} (the inputs' ranks added); "
                f"for rank {rank} use --combination svd"
            )
        rank = full_rank
    rank = full_rank if rank is None else rank
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    report = MergeReport(Path(out), rank, combination, weights)
    embedding = set().union(*(s.embedding for s in sources))
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for module in modules:
        b, a, residual = combine_module(
            [s.factors.get(module) for s in sources],
            weights,
            combination,
            rank,
            density,
            majority_sign,
            _generator(seed, module),
        )
        report.residual[module] = residual
        factors[module] = (b, a)
    provenance = {
        "adapters": [s.path for s in sources],
        "weights": weights,
        "combination": combination,
        "rank": rank,
        "density": density,
        "majority_sign": majority_sign,
        "seed": seed,
        "max_residual": report.max_residual,
    }
    extra = {"lorakit_merge.json": json.dumps(provenance, indent=2) + "\n"}
    write_lora(
        out,
        factors,
        embedding,
        {"base_model_name_or_path": sources[0].config.get("base_model_name_or_path")},
        extra,
    )
    return report


def write_lora(
    out: str | os.PathLike,
    factors: dict[str, tuple[Tensor, Tensor]],
    embedding: set[str],
    config_extra: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write per-module (B, A) with scale 1 as a PEFT LoRA folder of one rank (the largest; smaller
    modules zero-padded, which changes nothing) and lora_alpha = r: the form every server reads the
    same way (no rsLoRA, no per-module patterns, an integer alpha)."""
    rank = max(a.shape[0] for _, a in factors.values())
    tensors: dict[str, Tensor] = {}
    for module, (b, a) in factors.items():
        pad = rank - a.shape[0]
        if pad:
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if module in embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{module}.{a_key}"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.{b_key}"] = b.float().contiguous()
    config = LoRAConfig(rank=rank, alpha=rank).to_peft_dict()
    config.update(target_modules=sorted(factors), **config_extra)
    atomic_folder(Path(out), lambda tmp: write_adapter_folder(tmp, tensors, config, extra_files))
    return Path(out)


def portable_lora(adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The LoRA (or aLoRA) folder `adapter` rewritten with each module's scale folded into B, one
    rank and lora_alpha = r (`write_lora`): the same change, read alike by PEFT, vLLM, SGLang and
    Ollama, whatever rsLoRA, alpha/rank patterns or a non-integer alpha the original used."""
    source = read_source(adapter, allow_alora=True)
    factors = {m: (b * scale, a) for m, (b, a, scale) in source.factors.items()}
    keep = {
        k: source.config[k]
        for k in ("base_model_name_or_path", "alora_invocation_tokens")
        if source.config.get(k) is not None
    }
    return write_lora(out, factors, source.embedding, keep)
