"""lorakit compare: statistics over seeds and steps to a held-out loss, from run folders."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.compare import compare, load_run, parse_groups


def _run(root: Path, name: str, seed: int, exact: float, curve: list[float]) -> Path:
    folder = root / name
    folder.mkdir()
    metrics = {
        "train_config": {"seed": seed},
        "after": {"exact_match": exact, "answer_nll": curve[-1], "general_ppl": 20.0, "kl_from_base": 0.3},
        "train": {
            "steps": 10 * len(curve),
            "train_seconds": 25.0 * len(curve),
            "trainable_params": 1000,
            "held_out_curve": [{"step": 10 * (i + 1), "eval_answer_nll": v} for i, v in enumerate(curve)],
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_statistics_and_steps_to_the_default_target(tmp_path: Path) -> None:
    _run(tmp_path, "slow-s0", 0, 0.5, [3.0, 2.0, 1.0])
    _run(tmp_path, "slow-s1", 1, 0.7, [3.0, 1.6, 1.2])
    _run(tmp_path, "fast-s0", 0, 0.9, [1.0, 0.5, 0.4])
    groups = parse_groups([f"slow={tmp_path}/slow-s*", f"fast={tmp_path}/fast-s0"])
    result = compare(groups)
    assert result["targets"] == [pytest.approx(1.1)]  # the slow group's mean final loss
    slow, fast = result["groups"]["slow"], result["groups"]["fast"]
    assert slow["exact_match"]["mean"] == pytest.approx(0.6)
    assert slow["exact_match"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert slow["seeds"] == [0, 1] and slow["seconds_per_step"]["mean"] == pytest.approx(2.5)
    target = next(iter(slow["steps_to_target"]))
    assert slow["steps_to_target"][target]["per_run"] == [30, None]  # 1.0 <= 1.1 at step 30; 1.2 never
    assert slow["steps_to_target"][target]["not_reached"] == 1
    assert fast["steps_to_target"][target]["per_run"] == [10]


def test_explicit_targets_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path, "a-s0", 0, 0.5, [3.0, 2.0, 1.0])
    main(["compare", f"a={tmp_path}/a-s0", "--target-nll", "2.5", "0.5"])
    table = capsys.readouterr().out
    assert "| a | 1 | 50.0% |" in table and "steps to NLL ≤ 2.5" in table
    assert "| 20 (20) | never (–) |" in table


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NAME=GLOB"):
        parse_groups(["runs/lora-s0"])
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path)
