"""The benchmark cases and the ratios between them: plain data, imported by parent and child.

Case names are the strings users pass (`cases=[...]`) and the keys of the JSON report; nothing
else dispatches on them. The runner executes cases in the order listed, reversed in every other
round, so each case runs both before and after its partners and a steady drift cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Library = Literal["none", "lorakit", "peft", "bitsandbytes"]
Adapter = Literal["none", "unmerged", "merged", "merged_unloaded"]

SUITES = ("infer", "train", "quant")
QUANTUM_METHODS = ("quantum_k8_l2", "quantum_k16_l2", "quantum_k8_l4", "lora_r1")  # see build.SCHOOLS
LONG_LENGTHS = (1024, 2048, 4096, 8192)
SCALING_LENGTHS = (256, 512, 1024, 2048, 4096)  # issue 26: step time and memory against length
RANK, ALPHA = 16, 32
FORWARD_TOKENS = 256  # forward latency: one sequence of this many tokens
NEW_TOKENS = 64  # greedy generation: exactly this many new tokens
TRAIN_BATCH, TRAIN_SEQ = 4, 256
TASK_BATCH, TASK_MICRO, TASK_PACKING, TASK_BATCHES = 16, 8, 512, 6  # the task cases: `lorakit train`'s
GPU_ROWS, GPU_SEQ = 8, 2048  # issue 27: the GPU cases' batch (8 rows of 2k tokens, 16k tokens a step)
GPU_METHODS = ("lora", "dora", "qlora")
QUANT_SHAPE = (4096, 4096)  # the NF4 quantize / dequantize micro-benchmark
TINY_QUANT_SHAPE = (256, 256)  # the same with --model tiny (a smoke test)


@dataclass(frozen=True)
class Case:
    """One measurement, run in its own process.

    `library="peft"` with `adapter="none"` is the plain model measured in a process that imported
    PEFT: the noise control for the lorakit-vs-PEFT ratios. `method` is what sits on the base:
    "lora"; "dora" adds DoRA's magnitude vector on top of the same A and B (both libraries start it
    at the base weight's row norms); "qlora" puts the same A and B on the base quantized to NF4 (the
    report adds its weight memory against bf16); infer cases of the other schools name one of
    `build.SCHOOLS`, measured against base and merged LoRA. `loss` (train only): "chunked" is
    lorakit's chunked causal-LM loss, "model" the model's own `labels=` loss as PEFT users call it.
    """

    name: str
    suite: str
    library: Library
    adapter: Adapter = "none"
    dtype: Literal["fp32", "bf16"] = "fp32"
    loss: Literal["chunked", "model"] = "model"
    method: str = "lora"
    extra: bool = False  # not run by default; only when named in `cases`
    batch: int = 1  # infer: rows generated at once (the same prompt repeated)
    checkpointing: bool = False  # train: activation checkpointing per decoder layer (the memory mode)
    compile: str = "off"  # train: prepare_for_training's compile ("on": compiled decoder layers)
    seq: int = 0  # train: one row of this many tokens instead of TRAIN_BATCH x TRAIN_SEQ
    attention: str = ""  # train: "" as prepared (lorakit's kernel), "sdpa", or "s2" (LongLoRA's S2-Attn)
    # train: "" the synthetic TRAIN_BATCH x TRAIN_SEQ batch; the default task's real optimizer
    # batches (TASK_BATCH samples, micro-batches of TASK_MICRO, assistant-only loss) laid out as
    # "padded" (the trainer's default), "packed" (--packing TASK_PACKING) or "shared" (--share-prefix)
    data: str = ""
    rows: int = 1  # train with `seq`: rows of `seq` tokens in the batch
    # train: the dtype the base model is loaded in; "bf16" as PEFT's GPU examples load it (both
    # libraries then keep fp32 adapters: PEFT's autocast_adapter_dtype, lorakit's own parameters)
    base: Literal["fp32", "bf16"] = "fp32"
    allocator: str = "fast"  # train, lorakit: `--allocator` (lorakit.train.fast.tune_allocator)
    # train, lorakit: "" as the `lorakit` command starts (glibc's small-block caches off,
    # `lorakit_launcher`), "default" glibc as it is (every other case runs so: bench.runner)
    malloc: Literal["", "default"] = ""


CASES: tuple[Case, ...] = (
    # Order matters: a ratio between cases far apart in a round sees more drift. lorakit's cases
    # sit 1-2 apart from `base`; every cross-library pair, the noise floor `base/peft_base`
    # included, sits 3 apart, so the noise floor is measured at the widest gap of the main ratios.
    Case("base", "infer", "none"),
    Case("lora_unmerged", "infer", "lorakit", "unmerged"),
    Case("lora_merged", "infer", "lorakit", "merged"),
    Case("peft_base", "infer", "peft"),
    Case("peft_lora_unmerged", "infer", "peft", "unmerged"),
    Case("peft_lora_merged", "infer", "peft", "merged"),
    Case("dora_unmerged", "infer", "lorakit", "unmerged", method="dora"),
    Case("peft_dora_unmerged", "infer", "peft", "unmerged", method="dora"),
    Case("lora_merged_unloaded", "infer", "lorakit", "merged_unloaded", extra=True),
    # the other schools' training step (issue 7): `--cases` with SCHOOL_TRAIN_CASES
    *(
        Case(f"{method}_bf16", "train", "lorakit", "unmerged", "bf16", "chunked", method=method, extra=True)
        for method in ("adapter_houlsby", "adapter_pfeiffer", "prompt", "prefix", "norm", "full")
    ),
    # Quantum-PEFT at three (K, L) and LoRA r=1 (issue 19): `--cases` with QUANTUM_TRAIN_CASES
    *(
        Case(f"{method}_bf16", "train", "lorakit", "unmerged", "bf16", "chunked", method=method, extra=True)
        for method in QUANTUM_METHODS
    ),
    # LongLoRA's cost (issue 18): one row of N tokens, LoRA r=8 on q/k/v/o, full attention (SDPA and
    # lorakit's kernel) against S2-Attn: `--cases` with LONG_TRAIN_CASES
    *(
        Case(
            f"lora_qkvo_{kind}_{n}",
            "train",
            "lorakit",
            "unmerged",
            "bf16",
            "chunked",
            method="lora_qkvo",
            extra=True,
            seq=n,
            attention=attention,
        )  # fmt: skip
        for n in LONG_LENGTHS
        for kind, attention in (("sdpa", "sdpa"), ("kernel", ""), ("s2", "s2"))
    ),
    # the other schools (issue 7), batch 1 and 8: `--cases` with SCHOOL_CASES, see docs/methods/schools.md
    *(
        Case(f"{name}{suffix}", "infer", library, adapter, extra=True, method=method, batch=batch)
        for batch, suffix in ((1, ""), (8, "_b8"))
        for name, library, adapter, method in (
            ("base", "none", "none", "lora"),
            ("lora_merged", "lorakit", "merged", "lora"),
            ("adapter_houlsby", "lorakit", "unmerged", "adapter_houlsby"),
            ("adapter_pfeiffer", "lorakit", "unmerged", "adapter_pfeiffer"),
            ("prompt", "lorakit", "unmerged", "prompt"),
            ("prefix", "lorakit", "unmerged", "prefix"),
        )
        if not (batch == 1 and name in ("base", "lora_merged"))  # those two exist above
    ),
    Case("lora_fp32", "train", "lorakit", "unmerged", "fp32", "chunked"),
    Case("peft_lora_fp32", "train", "peft", "unmerged", "fp32", "model"),
    Case("lora_bf16", "train", "lorakit", "unmerged", "bf16", "chunked"),
    Case("peft_lora_bf16", "train", "peft", "unmerged", "bf16", "model"),
    Case("lora_bf16_ckpt", "train", "lorakit", "unmerged", "bf16", "chunked", checkpointing=True),
    # `lorakit train --compile on` (auto compiles runs of 1,000+ passes): compiled decoder layers
    Case("lora_bf16_compiled", "train", "lorakit", "unmerged", "bf16", "chunked", extra=True, compile="on"),
    Case(
        "lora_bf16_compiled_ckpt",
        "train",
        "lorakit",
        "unmerged",
        "bf16",
        "chunked",
        extra=True,
        checkpointing=True,
        compile="on",
    ),
    Case("dora_bf16", "train", "lorakit", "unmerged", "bf16", "chunked", method="dora"),
    Case(
        "dora_bf16_compiled",
        "train",
        "lorakit",
        "unmerged",
        "bf16",
        "chunked",
        method="dora",
        extra=True,
        compile="on",
    ),
    Case("peft_dora_bf16", "train", "peft", "unmerged", "bf16", "model", method="dora"),
    Case("lora_model_loss_fp32", "train", "lorakit", "unmerged", "fp32", "model"),
    Case("lora_model_loss_bf16", "train", "lorakit", "unmerged", "bf16", "model"),
    Case("qlora_bf16", "train", "lorakit", "unmerged", "bf16", "chunked", method="qlora"),
    Case(
        "qlora_bf16_compiled",
        "train",
        "lorakit",
        "unmerged",
        "bf16",
        "chunked",
        method="qlora",
        extra=True,
        compile="on",
    ),
    # opt-in: the tied embedding (and so the head) in NF4 as well, for the whole-model weight ratio
    Case("qlora_emb_bf16", "train", "lorakit", "unmerged", "bf16", "chunked", method="qlora_emb"),
    # PEFT's LoRA on transformers' bitsandbytes 4-bit load (NF4, double quantization, bf16 compute)
    Case("peft_qlora_bf16", "train", "peft", "unmerged", "bf16", "model", method="qlora"),
    # quantize + dequantize one QUANT_SHAPE fp32 matrix to NF4 (blocks of 64, double quantization),
    # dequantizing to bf16, the compute dtype of QLoRA; no model is loaded.
    # the default task's real batches (issue 26): padding, packing and the shared prompt prefix, each
    # against PEFT on the same padded batches; `--cases` with TASK_TRAIN_CASES
    *(
        Case(f"{name}_{dtype}", "train", library, "unmerged", dtype, loss, extra=True, data=data)
        for dtype in ("fp32", "bf16")
        for name, library, loss, data in (
            ("lora_task", "lorakit", "chunked", "padded"),
            ("lora_task_packed", "lorakit", "chunked", "packed"),
            ("lora_task_shared", "lorakit", "chunked", "shared"),
            ("peft_lora_task", "peft", "model", "padded"),
        )
    ),
    # the shared layout with one setting changed (issue 26's goals, docs/benchmarks.md): "lean"
    # `--allocator lean` (memory, at a cost in time); "compiled" `--compile on` (`auto` compiles for
    # runs of 1,000+ passes; the warm-up step pays the compilation, ~115 s with a cold TorchInductor
    # cache); "default_malloc" glibc's small-block caches left on, as a Python program that imports
    # lorakit runs it (the `lorakit` command turns them off: lorakit_launcher)
    *(
        Case(
            f"lora_task_shared_{name}_fp32",
            "train",
            "lorakit",
            "unmerged",
            "fp32",
            "chunked",
            extra=True,
            data="shared",
            **setting,
        )
        for name, setting in (
            ("lean", {"allocator": "lean"}),
            ("compiled", {"compile": "on"}),
            ("default_malloc", {"malloc": "default"}),
        )
    ),
    # scaling with the work (issue 26): one row of N tokens, LoRA on every linear layer, lorakit's
    # step against PEFT's; `--cases` with SCALING_TRAIN_CASES (model size: the 4 x 256 cases with
    # `--model random-360m` / `random-1b`)
    *(
        Case(f"{prefix}lora_seq{n}_{dtype}", "train", library, "unmerged", dtype, loss, extra=True, seq=n)
        for dtype in ("fp32", "bf16")
        for n in SCALING_LENGTHS
        for prefix, library, loss in (("", "lorakit", "chunked"), ("peft_", "peft", "model"))
    ),
    # on a GPU (issue 27): 8 rows of 2k tokens, the base loaded in bf16, LoRA / DoRA / QLoRA against
    # PEFT (+ bitsandbytes' 4-bit for QLoRA); `--device cuda --cases` with GPU_TRAIN_CASES
    *(
        Case(
            f"{prefix}{method}_{GPU_ROWS}x2k_bf16",
            "train",
            library,
            "unmerged",
            "bf16",
            loss,
            method=method,
            extra=True,
            seq=GPU_SEQ,
            rows=GPU_ROWS,
            base="bf16",
        )
        for method in GPU_METHODS
        for prefix, library, loss in (("", "lorakit", "chunked"), ("peft_", "peft", "model"))
    ),  # fmt: skip
    Case("nf4", "quant", "lorakit"),
    Case("bnb_nf4", "quant", "bitsandbytes"),
    # the 4-bit matmul of QLoRA's forward (issue 27): x (TRAIN_BATCH * TRAIN_SEQ, in) @ NF4 weight,
    # bf16, lorakit's dequantize-then-matmul against bitsandbytes' matmul_4bit
    Case("nf4_matmul", "quant", "lorakit", extra=True, method="matmul"),
    Case("bnb_nf4_matmul", "quant", "bitsandbytes", extra=True, method="matmul"),
)

# (numerator, denominator): computed from medians measured in the same invocation.
RATIOS: dict[str, tuple[tuple[str, str], ...]] = {
    "infer": (
        ("lora_merged", "base"),
        ("lora_unmerged", "base"),
        ("lora_merged_unloaded", "base"),
        ("peft_lora_merged", "peft_base"),
        ("peft_lora_unmerged", "peft_base"),
        ("base", "peft_base"),
        ("lora_unmerged", "peft_lora_unmerged"),
        ("lora_merged", "peft_lora_merged"),
        ("dora_unmerged", "base"),
        ("peft_dora_unmerged", "peft_base"),
        ("dora_unmerged", "peft_dora_unmerged"),
        *(
            (f"{school}{suffix}", f"{ref}{suffix}")
            for suffix in ("", "_b8")
            for school in ("adapter_houlsby", "adapter_pfeiffer", "prompt", "prefix")
            for ref in ("base", "lora_merged")
        ),
        ("lora_merged_b8", "base_b8"),
    ),
    "train": (
        ("lora_fp32", "peft_lora_fp32"),
        ("lora_bf16", "peft_lora_bf16"),
        ("lora_bf16_ckpt", "peft_lora_bf16"),
        ("lora_bf16_ckpt", "lora_bf16"),
        ("lora_bf16_compiled", "peft_lora_bf16"),
        ("lora_bf16_compiled", "lora_bf16"),
        ("lora_bf16_compiled_ckpt", "peft_lora_bf16"),
        ("lora_bf16_compiled_ckpt", "lora_bf16_compiled"),
        ("lora_model_loss_fp32", "peft_lora_fp32"),
        ("lora_model_loss_bf16", "peft_lora_bf16"),
        ("lora_bf16", "lora_fp32"),
        ("peft_lora_bf16", "peft_lora_fp32"),
        ("dora_bf16", "lora_bf16"),
        ("peft_dora_bf16", "peft_lora_bf16"),
        ("dora_bf16", "peft_dora_bf16"),
        ("dora_bf16_compiled", "lora_bf16_compiled"),
        ("dora_bf16_compiled", "peft_dora_bf16"),
        ("dora_bf16_compiled", "dora_bf16"),
        ("qlora_bf16", "lora_bf16"),
        ("qlora_bf16_compiled", "lora_bf16_compiled"),
        ("qlora_bf16_compiled", "qlora_bf16"),
        *(
            (f"{m}_bf16", "lora_bf16")
            for m in ("adapter_houlsby", "adapter_pfeiffer", "prompt", "prefix", "norm", "full")
        ),
        *((f"{m}_bf16", "lora_bf16") for m in QUANTUM_METHODS),
        *(
            (f"lora_qkvo_{a}_{n}", f"lora_qkvo_{b}_{n}")
            for n in LONG_LENGTHS
            for a, b in (("s2", "sdpa"), ("s2", "kernel"), ("kernel", "sdpa"))
        ),
        ("qlora_emb_bf16", "qlora_bf16"),
        *(
            (f"lora_task{layout}_{dtype}", other)
            for dtype in ("fp32", "bf16")
            for layout in ("", "_packed", "_shared")
            for other in (f"peft_lora_task_{dtype}", f"lora_task_{dtype}")
            if f"lora_task{layout}_{dtype}" != other
        ),
        ("lora_task_shared_fp32", "peft_lora_task_bf16"),
        ("lora_task_shared_lean_fp32", "peft_lora_task_fp32"),
        ("lora_task_shared_lean_fp32", "lora_task_shared_fp32"),
        ("lora_task_shared_default_malloc_fp32", "peft_lora_task_fp32"),
        ("lora_task_shared_compiled_fp32", "peft_lora_task_fp32"),
        ("lora_task_shared_compiled_fp32", "lora_task_shared_fp32"),
        ("lora_task_shared_fp32", "lora_task_shared_default_malloc_fp32"),
        ("qlora_bf16", "peft_qlora_bf16"),
        ("peft_qlora_bf16", "peft_lora_bf16"),
        *((f"lora_seq{n}_{d}", f"peft_lora_seq{n}_{d}") for d in ("fp32", "bf16") for n in SCALING_LENGTHS),
        *((f"{m}_{GPU_ROWS}x2k_bf16", f"peft_{m}_{GPU_ROWS}x2k_bf16") for m in GPU_METHODS),
        *((f"{p}qlora_{GPU_ROWS}x2k_bf16", f"{p}lora_{GPU_ROWS}x2k_bf16") for p in ("", "peft_")),
        *((f"{p}dora_{GPU_ROWS}x2k_bf16", f"{p}lora_{GPU_ROWS}x2k_bf16") for p in ("", "peft_")),
    ),
    "quant": (("nf4", "bnb_nf4"), ("nf4_matmul", "bnb_nf4_matmul")),
}

# The same model in two processes (the second one imported PEFT): any distance of this ratio from
# 1 is noise between processes, the yardstick for every other ratio of the suite. The train suite
# has no such pair yet.
NOISE_FLOOR: dict[str, tuple[str, str]] = {"infer": ("base", "peft_base")}

# Pairs whose outputs must agree: same weights, so the same logits and the same greedy tokens.
SAME_OUTPUT: dict[str, tuple[tuple[str, str], ...]] = {
    "infer": (
        ("base", "peft_base"),
        ("lora_merged", "lora_unmerged"),
        ("lora_merged_unloaded", "lora_unmerged"),
        ("lora_unmerged", "peft_lora_unmerged"),
        ("peft_lora_merged", "peft_lora_unmerged"),
        ("dora_unmerged", "peft_dora_unmerged"),
    ),
    "train": (
        ("lora_fp32", "peft_lora_fp32"),
        ("lora_model_loss_fp32", "peft_lora_fp32"),
        ("lora_bf16", "peft_lora_bf16"),
        ("lora_bf16_compiled", "lora_bf16"),
        ("dora_bf16", "peft_dora_bf16"),
        ("qlora_bf16", "peft_qlora_bf16"),
        *((f"{m}_{GPU_ROWS}x2k_bf16", f"peft_{m}_{GPU_ROWS}x2k_bf16") for m in GPU_METHODS),
    ),
    "quant": (("nf4", "bnb_nf4"), ("nf4_matmul", "bnb_nf4_matmul")),
}


SCHOOL_CASES = (
    "base",
    "lora_merged",
    "adapter_houlsby",
    "adapter_pfeiffer",
    "prompt",
    "prefix",
    "base_b8",
    "lora_merged_b8",
    "adapter_houlsby_b8",
    "adapter_pfeiffer_b8",
    "prompt_b8",
    "prefix_b8",
)


SCHOOL_TRAIN_CASES = (
    "lora_bf16",
    "adapter_houlsby_bf16",
    "adapter_pfeiffer_bf16",
    "prompt_bf16",
    "prefix_bf16",
    "norm_bf16",
    "full_bf16",
)

QUANTUM_TRAIN_CASES = ("lora_bf16", *(f"{m}_bf16" for m in QUANTUM_METHODS))
TASK_TRAIN_CASES = tuple(
    f"{name}_{dtype}"
    for dtype in ("fp32", "bf16")
    for name in ("lora_task", "lora_task_packed", "lora_task_shared", "peft_lora_task")
)
SCALING_TRAIN_CASES = tuple(
    f"{p}lora_seq{n}_{d}" for d in ("fp32", "bf16") for n in SCALING_LENGTHS for p in ("", "peft_")
)
GPU_TRAIN_CASES = tuple(f"{p}{m}_{GPU_ROWS}x2k_bf16" for m in GPU_METHODS for p in ("", "peft_"))
GPU_QUANT_CASES = ("nf4", "bnb_nf4", "nf4_matmul", "bnb_nf4_matmul")
LONG_TRAIN_CASES = tuple(f"lora_qkvo_{k}_{n}" for n in LONG_LENGTHS for k in ("sdpa", "kernel", "s2"))


def find_case(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    known = ", ".join(c.name for c in CASES)
    raise ValueError(f"unknown benchmark case {name!r}; known cases: {known}")


def select_cases(
    suite: str, with_peft: bool, names: list[str] | None = None, with_bnb: bool = False
) -> list[Case]:
    """The cases to run: the suite's defaults (or exactly `names`), PEFT and bitsandbytes ones only
    if wanted."""
    skipped = ({"peft"} if not with_peft else set()) | ({"bitsandbytes"} if not with_bnb else set())
    suites = SUITES if suite == "all" else (suite,)
    if any(s not in SUITES for s in suites):
        raise ValueError(f"unknown suite {suite!r}; expected one of: {', '.join(SUITES)}, all")

    def runnable(case: Case) -> bool:
        return case.library not in skipped and not (_needs_bnb(case) and not with_bnb)

    if names:
        chosen = [find_case(n) for n in names]
        stray = [c.name for c in chosen if c.suite not in suites]
        if stray:
            raise ValueError(f"cases {stray} are not in suite {suite!r}; use suite='all' or drop them")
        return [c for c in chosen if runnable(c)]
    return [c for c in CASES if c.suite in suites and not c.extra and runnable(c)]


def _needs_bnb(case: Case) -> bool:
    """PEFT's QLoRA runs on bitsandbytes' 4-bit layers."""
    return case.library == "peft" and case.method == "qlora"
