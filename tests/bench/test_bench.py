"""The bench end to end on the tiny model, in child processes as a real run does.

No timing assertions: these machines are shared and noisy. What is checked is the shape of the
report, that every case ran, and that cases holding the same weights agree on their outputs.
Each child process spends ~4 s importing torch and transformers, so the end-to-end tests run
few cases (6 processes in all); the multi-round logic is checked on synthetic results instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from lorakit.bench import add_arguments, run_bench
from lorakit.bench.cases import CASES, find_case, select_cases
from lorakit.bench.report import suite_report
from lorakit.bench.runner import round_order

HAS_PEFT = importlib.util.find_spec("peft") is not None
# One PEFT case is enough to exercise the cross-library ratio and output check.
INFER = ["base", "lora_unmerged", "lora_merged"] + (["peft_lora_merged"] if HAS_PEFT else [])


def _tiny(suite: str, out: Path, cases: list[str], steps: int = 1, warmup: int = 0) -> dict:
    """A quiet bench run on the tiny model, two cases at once (threads=1: on a loaded 2-core
    machine two OpenMP threads wait on each other at every op)."""
    return run_bench(
        suite,
        model="tiny",
        out_dir=out,
        steps=steps,
        warmup=warmup,
        threads=1,
        jobs=2,
        verbose=False,
        cases=cases,
    )


@pytest.fixture(scope="module")
def infer_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _tiny("infer", tmp_path_factory.mktemp("bench"), INFER, steps=2, warmup=1)


def test_infer_report_has_every_case_with_positive_medians(infer_report: dict) -> None:
    assert infer_report["failed"] == []
    assert infer_report["settings"]["rounds"] == 1  # the default for the tiny model
    cases = infer_report["suites"]["infer"]["cases"]
    assert sorted(cases) == sorted(INFER)
    for result in cases.values():
        assert len(result["forward"]["samples_s"]) == 4  # forward_steps defaults to 2 x steps
        assert len(result["generate"]["samples_s"]) == 2
        assert len(result["rounds"]) == 1
        for metric in ("forward", "generate"):
            assert result[metric]["median_s"] > 0
        assert result["peak_rss_mb"] > 0
        assert len(result["fingerprint"]["generated_ids"]) == 64


def test_infer_ratios_and_output_checks(infer_report: dict) -> None:
    suite = infer_report["suites"]["infer"]
    expected = {"lora_merged/base", "lora_unmerged/base"} | (
        {"lora_merged/peft_lora_merged"} if HAS_PEFT else set()
    )
    assert expected <= set(suite["ratios"])
    for entry in suite["ratios"].values():
        assert entry["forward"] > 0 and entry["generate"] > 0 and entry["peak_rss"] > 0
        assert len(entry["per_round"]["forward"]) == 1
    assert suite["noise_floor"] is None  # peft_base was not run
    for name, check in suite["checks"].items():  # same weights must give the same function
        assert check["logits_max_abs_diff"] < 1e-4, name
        assert check["same_argmax"], name


def test_report_files_are_written(infer_report: dict) -> None:
    files = infer_report["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["suites"]["infer"]["cases"].keys() == infer_report["suites"]["infer"]["cases"].keys()
    assert saved["machine"]["versions"]["torch"]
    latest = Path(files["json"]).parent / "latest.json"
    assert json.loads(latest.read_text())["files"] == files
    markdown = Path(files["markdown"]).read_text()
    assert "| lora_merged/base |" in markdown and "| base |" in markdown


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_train_cases_run_and_agree_on_the_first_loss(tmp_path: Path) -> None:
    report = _tiny("train", tmp_path, ["lora_fp32", "peft_lora_fp32"], steps=2, warmup=1)
    assert report["failed"] == []
    suite = report["suites"]["train"]
    for result in suite["cases"].values():
        assert result["step"]["median_s"] > 0 and result["step"]["tokens_per_s"] > 0
        assert result["trainable_params"] > 0
    assert "lora_fp32/peft_lora_fp32" in suite["ratios"]
    assert suite["checks"]["lora_fp32 vs peft_lora_fp32"]["first_loss_abs_diff"] < 1e-4


def test_compiled_train_case_compiles_and_keeps_the_loss(tmp_path: Path) -> None:
    report = _tiny("train", tmp_path, ["lora_bf16", "lora_bf16_compiled"], steps=2, warmup=1)
    assert report["failed"] == []
    suite = report["suites"]["train"]
    compiled = suite["cases"]["lora_bf16_compiled"]
    assert "torch.compile: 2 decoder layers compiled" in " ".join(compiled["prepared"])
    assert "torch.compile" not in " ".join(suite["cases"]["lora_bf16"]["prepared"])
    assert len(compiled["step"]["warmup_s"]) == 1  # the compilation's step, kept apart from the median
    assert "lora_bf16_compiled/lora_bf16" in suite["ratios"]
    assert suite["checks"]["lora_bf16_compiled vs lora_bf16"]["first_loss_abs_diff"] < 2e-2  # bf16


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_dora_cases_hold_the_same_function_as_peft_dora(tmp_path: Path) -> None:
    # PEFT sets its magnitude from its own random B at creation; the bench must equalise both,
    # or the DoRA ratios would compare two different models.
    report = _tiny("infer", tmp_path, ["dora_unmerged", "peft_dora_unmerged"])
    assert report["failed"] == []
    suite = report["suites"]["infer"]
    check = suite["checks"]["dora_unmerged vs peft_dora_unmerged"]
    assert check["logits_max_abs_diff"] < 1e-4 and check["same_generated_tokens"]
    assert "dora_unmerged/peft_dora_unmerged" in suite["ratios"]
    stats = {name: case["trainable_params"] for name, case in suite["cases"].items()}
    assert stats["dora_unmerged"] == stats["peft_dora_unmerged"] > 0


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_qlora_and_nf4_cases(tmp_path: Path) -> None:
    # QLoRA's training step next to LoRA's on the same adapter values, its weight memory, and the
    # NF4 micro-benchmark (a 256 x 256 matrix with the tiny model) against bitsandbytes.
    cases = ["lora_bf16", "qlora_bf16", "nf4"] + (["bnb_nf4"] if HAS_BNB else [])
    report = _tiny("all", tmp_path, cases)
    assert report["failed"] == []
    train = report["suites"]["train"]
    qlora, lora = train["cases"]["qlora_bf16"], train["cases"]["lora_bf16"]
    assert qlora["trainable_params"] == lora["trainable_params"] > 0
    assert abs(qlora["losses"][0] - lora["losses"][0]) < 0.05  # the same model up to NF4 rounding
    weights = qlora["weights"]
    assert 4.12 < weights["linear_bits_per_parameter"] < 4.2  # 4.127 plus the tiny tensors' padding
    assert weights["linear_ratio"] < 0.3 and weights["linear_ratio"] < weights["model_ratio"] < 1
    assert "weights" not in lora
    ratio = train["ratios"]["qlora_bf16/lora_bf16"]
    assert ratio["step"] > 0 and ratio["step_peak_rss"] > 0
    quant = report["suites"]["quant"]
    nf4 = quant["cases"]["nf4"]
    assert (
        nf4["shape"] == [256, 256] and nf4["quantize"]["median_s"] > 0 and nf4["dequantize"]["median_s"] > 0
    )
    assert 8 * nf4["stored_bytes"] / 256**2 < 4.2 and 0.05 < nf4["relative_error"] < 0.15
    markdown = Path(report["files"]["markdown"]).read_text()
    assert "Weight memory of qlora_bf16" in markdown and "| nf4 |" in markdown
    if HAS_BNB:
        check = quant["checks"]["nf4 vs bnb_nf4"]
        # both decode the same 4-bit codes; a double-quantized scale may differ by one 8-bit step
        assert check["dequantized_head_max_abs_diff"] < 1e-3
        assert quant["cases"]["bnb_nf4"]["stored_bytes"] == nf4["stored_bytes"]
        assert "nf4/bnb_nf4" in quant["ratios"]


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_the_4bit_matmul_cases_compute_the_same_product_and_time_it(tmp_path: Path) -> None:
    report = _tiny("quant", tmp_path, ["nf4_matmul", "bnb_nf4_matmul"])
    assert report["failed"] == []
    quant = report["suites"]["quant"]
    ours = quant["cases"]["nf4_matmul"]
    assert ours["matmul"]["median_s"] > 0 and ours["device"] == "cpu"
    assert quant["checks"]["nf4_matmul vs bnb_nf4_matmul"]["matmul_head_max_abs_diff"] < 1e-2
    assert quant["ratios"]["nf4_matmul/bnb_nf4_matmul"]["matmul"] > 0
    assert "4-bit matmul fwd+bwd" in Path(report["files"]["markdown"]).read_text()


def test_gpu_memory_peaks_are_combined_and_compared_when_cases_report_them() -> None:
    from lorakit.bench.rounds import combine_case, round_ratios

    def result(step_s: float, gpu_mb: float) -> dict:
        step = {"samples_s": [step_s], "median_s": step_s, "min_s": step_s, "tokens_per_s": 1 / step_s}
        return {"step": step, "peak_rss_mb": 900.0, "step_peak_gpu_mb": gpu_mb, "peak_gpu_mb": gpu_mb + 10}

    rounds = [{"lora_8x2k_bf16": result(0.3, 300.0), "peft_lora_8x2k_bf16": result(0.4, 600.0)}]
    ratio = round_ratios("train", rounds)["lora_8x2k_bf16/peft_lora_8x2k_bf16"]
    assert ratio["step"] == pytest.approx(0.75) and ratio["step_peak_gpu"] == pytest.approx(0.5)
    assert "step_peak_rss" not in ratio  # a case without it compares what it has
    assert combine_case("train", [result(0.3, 300.0), result(0.5, 500.0)])["step_peak_gpu_mb"] == 400.0


def _fake_result(forward_s: float, generate_s: float, rss_mb: float) -> dict:
    timing = {"samples_s": [forward_s], "median_s": forward_s, "min_s": forward_s}
    generate = {
        "samples_s": [generate_s],
        "median_s": generate_s,
        "min_s": generate_s,
        "tokens_per_s": 64 / generate_s,
    }
    fingerprint = {"logits_head": [0.0], "argmax": 1, "generated_ids": [1, 2]}
    return {"forward": timing, "generate": generate, "peak_rss_mb": rss_mb, "fingerprint": fingerprint}


def test_ratios_are_taken_per_round_then_their_median() -> None:
    # The machine is 20% slower in round 2; inside every round merged/base is exactly 1.1.
    rounds = [
        {
            "base": _fake_result(1.0, 2.0, 100),
            "peft_base": _fake_result(1.0, 2.0, 100),
            "lora_merged": _fake_result(1.1, 2.0, 101),
        },
        {
            "base": _fake_result(1.2, 2.4, 100),
            "peft_base": _fake_result(1.3, 2.4, 100),
            "lora_merged": _fake_result(1.32, 2.4, 101),
        },
        {
            "base": _fake_result(1.0, 2.0, 100),
            "peft_base": _fake_result(0.9, 2.0, 100),
            "lora_merged": _fake_result(1.1, 2.0, 101),
        },
    ]
    suite = suite_report("infer", rounds)
    merged = suite["ratios"]["lora_merged/base"]
    assert merged["forward"] == pytest.approx(1.1) and merged["spread"]["forward"] == pytest.approx(
        [1.1, 1.1]
    )
    floor = suite["noise_floor"]
    assert floor["ratio"] == "base/peft_base"
    assert floor["per_round"]["forward"] == pytest.approx([1.0, 1.2 / 1.3, 1.0 / 0.9])
    assert floor["forward"] == pytest.approx(1.0) and floor["spread"]["forward"] == pytest.approx(
        [1.2 / 1.3, 1.0 / 0.9]
    )
    base = suite["cases"]["base"]
    assert base["forward"]["round_medians_s"] == [1.0, 1.2, 1.0] and base["forward"]["median_s"] == 1.0
    assert base["forward"]["samples_s"] == [1.0, 1.2, 1.0] and len(base["rounds"]) == 3
    assert base["generate"]["tokens_per_s"] == pytest.approx(32.0)


def test_a_failed_round_drops_only_that_round() -> None:
    rounds = [
        {"base": _fake_result(1.0, 2.0, 100), "lora_merged": _fake_result(1.1, 2.0, 100)},
        {"base": {"error": "exit code 1", "round": 2}, "lora_merged": _fake_result(9.0, 2.0, 100)},
    ]
    suite = suite_report("infer", rounds)
    assert suite["ratios"]["lora_merged/base"]["per_round"]["forward"] == pytest.approx([1.1])
    assert suite["cases"]["base"]["failed_rounds"] == [2]


def test_round_order_alternates() -> None:
    selected = select_cases("infer", with_peft=True)
    names = [c.name for c in selected]
    assert [c.name for c in round_order(selected, 0)] == names
    assert [c.name for c in round_order(selected, 1)] == names[::-1]
    assert [c.name for c in round_order(selected, 2)] == names


def test_case_selection() -> None:
    assert [c.name for c in select_cases("infer", with_peft=False)] == [
        "base",
        "lora_unmerged",
        "lora_merged",
        "dora_unmerged",
    ]
    all_default = select_cases("all", with_peft=True)
    assert {c.suite for c in all_default} == {"infer", "train", "quant"}
    assert not any(c.extra for c in all_default)
    quant = [c.name for c in select_cases("quant", with_peft=True, with_bnb=True)]
    assert quant == ["nf4", "bnb_nf4"] and "bnb_nf4" not in [c.name for c in select_cases("quant", True)]
    with pytest.raises(ValueError, match="not in suite"):
        select_cases("infer", with_peft=True, names=["lora_fp32"])
    with pytest.raises(ValueError, match="known cases"):
        select_cases("infer", with_peft=True, names=["nope"])
    assert len({c.name for c in CASES}) == len(CASES)


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--suite", "all", "--no-vs-peft", "--model", "tiny", "--json"])
    assert (args.suite, args.vs_peft, args.model, args.json, args.steps) == ("all", False, "tiny", True, 5)
    assert (args.rounds, args.forward_steps) == (None, None)  # run_bench picks 3 or 1, and 2 x steps
    args = parser.parse_args(["--rounds", "2", "--forward-steps", "12"])
    assert (args.rounds, args.forward_steps) == (2, 12)


def test_school_cases_generate_at_batch_1_and_8() -> None:
    """The issue-7 infer cases build their method and generate 64 tokens per row (in-process)."""
    from lorakit.bench.case import run_case
    from lorakit.bench.cases import SCHOOL_CASES

    assert {find_case(n).batch for n in SCHOOL_CASES} == {1, 8}
    for name in ("adapter_houlsby_b8", "prompt", "prefix_b8"):
        spec = {"case": name, "model": "tiny", "threads": 1, "warmup": 0, "steps": 1, "forward_steps": 1}
        result = run_case(spec)
        assert result["batch"] == find_case(name).batch and result["adapted_layers"] > 0
        assert len(result["fingerprint"]["generated_ids"]) == 64


def test_alora_suite_runs_every_arm_and_checks_against_no_cache(tmp_path) -> None:
    """The 50-turn aLoRA benchmark's machinery on the tiny model (3 turns): every arm, the same
    conversation, aLoRA's tokens equal to aLoRA without a cache, the report files."""
    from lorakit.bench.alora import run_alora_bench

    report = run_alora_bench(model="tiny", turns=3, turn_tokens=20, out_dir=tmp_path, check_turns=(1, 3))
    arms = report["arms"]
    assert all(len(arms[a]["turns"]) == 3 for a in ("alora", "lora_reprefill", "lora_own_cache", "base"))
    assert [c["equal"] for c in arms["alora"]["checks"]] == [True, True]
    histories = {a: [r["history"] for r in arms[a]["turns"]] for a in arms if "turns" in arms[a]}
    assert len({tuple(h) for h in histories.values()}) == 1  # every arm saw the same conversation
    from lorakit.bench.alora import INVOCATION
    from lorakit.models import tiny_tokenizer

    invocation = len(tiny_tokenizer()(INVOCATION + "\n", add_special_tokens=False)["input_ids"])
    alora, reprefill = arms["alora"]["turns"][-1], arms["lora_reprefill"]["turns"][-1]
    assert alora["prefilled"] == invocation  # only the invocation, whatever the history
    assert reprefill["prefilled"] == reprefill["history"] + invocation
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"alora.{suffix}").is_file()


def test_task_cases_lay_out_the_same_batches_and_agree_on_the_loss(tmp_path: Path) -> None:
    """The default task's real batches, padded, packed and around their shared prefix: the same
    samples (real and loss tokens), fewer positions computed, the same loss."""
    names = ["lora_task_fp32", "lora_task_packed_fp32", "lora_task_shared_fp32"]
    report = _tiny("train", tmp_path, names + (["peft_lora_task_fp32"] if HAS_PEFT else []), steps=2)
    assert report["failed"] == []
    cases = report["suites"]["train"]["cases"]
    layouts = {n: cases[n]["layout"] for n in names}
    assert len({(x["real_tokens_per_step"], x["loss_tokens_per_step"]) for x in layouts.values()}) == 1
    padded = layouts["lora_task_fp32"]["positions_per_step"]
    assert layouts["lora_task_packed_fp32"]["positions_per_step"] < padded
    assert (
        layouts["lora_task_shared_fp32"]["positions_per_step"]
        < layouts["lora_task_fp32"]["real_tokens_per_step"]
    )
    first = cases["lora_task_fp32"]["losses"][0]
    for name in names[1:]:
        assert cases[name]["losses"][0] == pytest.approx(first, rel=1e-4)
    if HAS_PEFT:  # PEFT averages per micro-batch: another mean of the same token losses
        assert cases["peft_lora_task_fp32"]["losses"][0] == pytest.approx(first, rel=0.05)


def test_scaling_cases_pair_with_peft_and_the_random_llamas_have_their_sizes() -> None:
    import torch
    from transformers import LlamaForCausalLM

    from lorakit.bench.build import RANDOM_LLAMAS, random_llama_config
    from lorakit.bench.cases import RATIOS, SCALING_LENGTHS, SCALING_TRAIN_CASES

    ratios = set(RATIOS["train"])
    for n in SCALING_LENGTHS:
        ours, theirs = find_case(f"lora_seq{n}_fp32"), find_case(f"peft_lora_seq{n}_fp32")
        assert (ours.seq, ours.library, theirs.seq, theirs.library) == (n, "lorakit", n, "peft")
        assert (ours.name, theirs.name) in ratios
    assert all(find_case(n).extra for n in SCALING_TRAIN_CASES)  # never in the default run
    sizes = {}
    for name in RANDOM_LLAMAS:
        with torch.device("meta"):  # the shapes alone
            model = LlamaForCausalLM(random_llama_config(name, 49152))
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e6
    assert 340 < sizes["random-360m"] < 380 and 950 < sizes["random-1b"] < 1200, sizes


def test_the_lean_allocator_case_is_the_shared_layout_with_lean_memory() -> None:
    from lorakit.bench.cases import RATIOS

    lean, fast = find_case("lora_task_shared_lean_fp32"), find_case("lora_task_shared_fp32")
    assert (lean.allocator, fast.allocator) == ("lean", "fast") and lean.data == fast.data == "shared"
    assert {(lean.name, "peft_lora_task_fp32"), (lean.name, fast.name)} <= set(RATIOS["train"])


def test_the_gpu_cases_pair_with_peft_and_bitsandbytes_at_8_rows_of_2k() -> None:
    from lorakit.bench.build import DEFAULT_VOCAB
    from lorakit.bench.cases import GPU_TRAIN_CASES, RATIOS, SAME_OUTPUT
    from lorakit.models import default_model_available, load_tokenizer

    if default_model_available():  # the random Llamas' vocabulary is the default tokenizer's
        assert len(load_tokenizer(None)) == DEFAULT_VOCAB
    for method in ("lora", "dora", "qlora"):
        ours, theirs = find_case(f"{method}_8x2k_bf16"), find_case(f"peft_{method}_8x2k_bf16")
        for case in (ours, theirs):
            assert (case.rows, case.seq, case.base, case.dtype, case.method) == (
                8,
                2048,
                "bf16",
                "bf16",
                method,
            )
            assert case.extra and case.name in GPU_TRAIN_CASES
        assert (ours.library, ours.loss, theirs.library, theirs.loss) == (
            "lorakit",
            "chunked",
            "peft",
            "model",
        )
        assert (ours.name, theirs.name) in RATIOS["train"] and (ours.name, theirs.name) in SAME_OUTPUT[
            "train"
        ]


def test_lorakit_train_cases_start_as_the_lorakit_command_and_the_others_as_python_does() -> None:
    """The bench's case processes: lorakit's train cases with glibc's small-block caches off (what
    `lorakit train` gets through `lorakit_launcher`), PEFT's, the infer cases and the opt-out case
    with the environment the launcher would have found, whether or not `lorakit bench` itself came
    through the launcher."""
    import lorakit_launcher
    from lorakit.bench.cases import RATIOS
    from lorakit.bench.runner import case_environment

    plain = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    for parent in (plain, lorakit_launcher.environment(plain) or plain):
        ours = case_environment(find_case("lora_task_shared_fp32"), dict(parent))
        if lorakit_launcher.glibc():
            assert ours["GLIBC_TUNABLES"].endswith(":".join(lorakit_launcher.KNOBS))
        for name in ("peft_lora_task_fp32", "lora_task_shared_default_malloc_fp32", "lora_unmerged"):
            assert case_environment(find_case(name), dict(parent)) == plain, name
    pair = ("lora_task_shared_fp32", "lora_task_shared_default_malloc_fp32")
    assert pair in RATIOS["train"]


def test_the_whole_run_bench_starts_lorakit_as_its_command_and_trl_as_python_does(
    monkeypatch, tmp_path: Path
) -> None:
    import lorakit_launcher
    from lorakit.bench import sft
    from lorakit.core import io

    seen = []
    monkeypatch.setattr(io, "run_child", lambda command, log, env: seen.append(env) or (0, 1.0, 2.0))
    monkeypatch.delenv(lorakit_launcher.MARKER, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert sft._child(["x"], tmp_path / "log", as_command=True) == {"wall_s": 1.0, "peak_rss_mb": 2.0}
    sft._child(["x"], tmp_path / "log")
    ours, trl = seen
    assert trl["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and lorakit_launcher.MARKER not in trl
    if lorakit_launcher.glibc():
        assert ours["GLIBC_TUNABLES"] == lorakit_launcher.tunables("glibc.malloc.arena_max=2")
