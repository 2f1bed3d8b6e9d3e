"""The bench end to end on the tiny model, in child processes as a real run does.

No timing assertions: these machines are shared and noisy. What is checked is the shape of the
report, that every case ran, and that cases holding the same weights agree on their outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from lorakit.bench import add_arguments, run_bench
from lorakit.bench.cases import CASES, select_cases

HAS_PEFT = importlib.util.find_spec("peft") is not None
INFER = ["base", "lora_unmerged", "lora_merged"] + (
    ["peft_base", "peft_lora_unmerged", "peft_lora_merged"] if HAS_PEFT else []
)


@pytest.fixture(scope="module")
def infer_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # threads=1: on a loaded 2-core machine two OpenMP threads wait on each other at every op.
    return run_bench("infer", model="tiny", out_dir=out, steps=2, warmup=1, threads=1, jobs=2, verbose=False)


def test_infer_report_has_every_case_with_positive_medians(infer_report: dict) -> None:
    assert infer_report["failed"] == []
    cases = infer_report["suites"]["infer"]["cases"]
    assert sorted(cases) == sorted(INFER)
    for result in cases.values():
        for metric in ("forward", "generate"):
            assert len(result[metric]["samples_s"]) == 2
            assert result[metric]["median_s"] > 0
        assert result["peak_rss_mb"] > 0
        assert len(result["fingerprint"]["generated_ids"]) == 64


def test_infer_ratios_and_output_checks(infer_report: dict) -> None:
    suite = infer_report["suites"]["infer"]
    expected = {"lora_merged/base", "lora_unmerged/base"}
    if HAS_PEFT:
        expected |= {"base/peft_base", "lora_unmerged/peft_lora_unmerged", "lora_merged/peft_lora_merged"}
    assert expected <= set(suite["ratios"])
    for entry in suite["ratios"].values():
        assert entry["forward"] > 0 and entry["generate"] > 0 and entry["peak_rss"] > 0
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
    report = run_bench(
        "train",
        model="tiny",
        out_dir=tmp_path,
        steps=2,
        warmup=1,
        threads=1,
        jobs=2,
        verbose=False,
        cases=["lora_fp32", "peft_lora_fp32"],
    )
    assert report["failed"] == []
    suite = report["suites"]["train"]
    for result in suite["cases"].values():
        assert result["step"]["median_s"] > 0 and result["step"]["tokens_per_s"] > 0
        assert result["trainable_params"] > 0
    assert "lora_fp32/peft_lora_fp32" in suite["ratios"]
    assert suite["checks"]["lora_fp32 vs peft_lora_fp32"]["first_loss_abs_diff"] < 1e-4


def test_case_selection() -> None:
    assert [c.name for c in select_cases("infer", with_peft=False)] == [
        "base",
        "lora_unmerged",
        "lora_merged",
    ]
    all_default = select_cases("all", with_peft=True)
    assert {c.suite for c in all_default} == {"infer", "train"}
    assert not any(c.extra for c in all_default)
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
