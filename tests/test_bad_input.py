"""Bad input and faults, through the command line and the library: every case is one clear error
line (what, where, what to do) and a non-zero exit, or a refusal that leaves files and the model as
they were. The command-line cases run on a tiny random Llama saved as a model folder (milliseconds)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.cli import main
from lorakit.models import tiny_llama, tiny_tokenizer

FAST = ["--no-progress-bar", "--general-tokens", "512", "--kl-prompts", "2", "--eval-max-new-tokens", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _data(path, n: int = 8, answer: str = "yes") -> str:
    rows = [{"prompt": f"question {i}?", "completion": f"{answer} {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(model_dir, tmp_path, *extra: str, data: str | None = None) -> list[str]:
    data = data or _data(tmp_path / "train.jsonl")
    return ["train", "--model", str(model_dir), "--data", data, "--steps", "2", "--batch-size", "2",
            "--micro-batch-size", "2", "--output-dir", str(tmp_path / "run"), *FAST, *extra]  # fmt: skip


def _error(argv: list[str]) -> str:
    """The one line `lorakit` exits with."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---- the command line's error handler --------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("rank: 8\nalpha: [16\n")
    message = _error(["train", "--config", str(config)])
    assert str(config) in message and "line 3" in message and "not valid YAML" in message


def test_a_folder_where_a_file_belongs(tmp_path) -> None:
    assert "is a folder" in _error(["train", "--config", str(tmp_path)])
    assert "is a folder" in _error(["train", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o")])


def test_yaml_value_of_the_wrong_type_names_the_option(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("rank: eight\n")
    assert "rank='eight' is not a valid int" in _error(["train", "--config", str(config)])
    config.write_text("lr: fast\n")
    assert "lr='fast' is not a valid float" in _error(["train", "--config", str(config)])


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("rank: eight\n")
    with pytest.raises(ValueError, match="rank='eight'"):
        main(["--debug", "train", "--config", str(config)])
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="rank='eight'"):
        main(["train", "--config", str(config)])


def test_corrupt_checkpoint_on_resume_is_one_line(model_dir, tmp_path) -> None:
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{not json")
    message = _error(_train(model_dir, tmp_path, "--resume", "--skip-eval"))
    assert "checkpoint" in message and "step-000001" in message


def test_unexpected_errors_say_so_and_point_to_debug(monkeypatch) -> None:
    from lorakit import cli

    def boom(args) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "cmd_inspect", boom)
    message = _error(["inspect", "x"])
    assert "unexpected RuntimeError: kaboom" in message and "--debug" in message


# ---- options ----------------------------------------------------------------------------------


def test_lr_zero_is_refused() -> None:
    assert "lr=0.0 must be a positive number" in _error(["train", "--lr", "0"])


def test_options_the_method_would_ignore_are_refused() -> None:
    message = _error(["train", "--method", "norm", "--rank", "8", "--use-rslora"])
    assert "--rank, --use-rslora do not apply to --method norm" in message
    assert "--target-modules" in _error(["train", "--method", "prompt", "--target-modules", "q_proj"])
    assert "--adapter-size" in _error(["train", "--method", "lora", "--adapter-size", "8"])


def test_adapter_names_must_be_plain(tmp_path) -> None:
    for name in (str(tmp_path / "elsewhere"), "../up", "a.b", ""):
        with pytest.raises(ValueError, match="not a plain name"):
            lk.apply(tiny_llama(), lk.LoRAConfig(rank=2), name)
    model = lk.apply(tiny_llama(), lk.LoRAConfig(rank=2), "icd-lora_2")
    lk.save_adapter(model, tmp_path / "out")
    assert (tmp_path / "out" / "icd-lora_2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "elsewhere").exists()


# ---- data -------------------------------------------------------------------------------------


def test_non_utf8_data_names_file_and_line(tmp_path) -> None:
    bad = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    bad.write_bytes(
        (good + "\n" + good + "\n").encode() + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")
    )
    message = _error(["train", "--data", str(bad), "--output-dir", str(tmp_path / "o")])
    assert f"{bad}, line 3" in message and "UTF-8" in message


def test_empty_data_is_refused_before_the_model_loads_or_the_folder_exists(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "o"
    message = _error(
        ["train", "--data", str(empty), "--model", str(tmp_path / "no-model"), "--output-dir", str(out)]
    )
    assert "holds no examples" in message and not out.exists()


def test_fully_truncated_data_is_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch) -> None:
    import lorakit.run as run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(run, "api_load", no_model)
    argv = _train(model_dir, tmp_path, "--max-length", "8")
    message = _error(argv)
    assert "no training sample is left" in message and "--max-length 8" in message
    assert not (tmp_path / "run").exists()


def test_data_without_eval_data_scores_a_held_out_part_of_it(model_dir, tmp_path, capsys) -> None:
    data = _data(tmp_path / "train.jsonl", n=30, answer="label")
    main(_train(model_dir, tmp_path, "--rank", "2", data=data))
    out = capsys.readouterr().out
    assert "holding out 3 of the 30 conversations" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["samples"] == 27 and metrics["before"]["n"] == 3
    assert all(e["answer"].startswith("label") for e in metrics["after"]["examples"])


def test_data_too_small_to_hold_out_skips_the_task_scores(model_dir, tmp_path, capsys) -> None:
    main(_train(model_dir, tmp_path, "--rank", "2"))
    assert "task scores (exact match, answer NLL) are skipped" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "exact_match" not in metrics["after"] and "general_nll" in metrics["after"]


def test_tool_messages_keep_their_fields() -> None:
    from lorakit.data.jsonl import record_to_conversation

    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    conv = record_to_conversation(
        {
            "messages": [
                {"role": "user", "content": "look it up"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "lookup"},
                {"role": "assistant", "content": "It is 42."},
            ]
        }
    )
    assert conv[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert conv[2] == {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "lookup"}
    with pytest.raises(TypeError, match="tool_calls must be a list"):
        record_to_conversation(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "tool_calls": "x"},
                ]
            }
        )


# ---- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("--alpha", "64", "alpha=16.0 there, 64.0 here"),
        ("--dropout", "0.1", "dropout=0.0 there, 0.1 here"),
        ("--use-rslora", None, "use_rslora=False there, True here"),
        ("--init", "gaussian", "init='kaiming' there, 'gaussian' here"),
        ("--loraplus-ratio", "4", "loraplus_ratio=0.0 there, 4.0 here"),
        ("--target-modules", "q_proj,v_proj", "target_modules='all-linear' there, 'q_proj,v_proj' here"),
    ],
)
def test_resume_refuses_a_changed_adapter_option(model_dir, tmp_path, option, value, shown) -> None:
    base = _train(model_dir, tmp_path, "--rank", "2", "--alpha", "16", "--skip-eval")
    main(base)
    weights = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    changed = [a for a in base if a not in ("--alpha", "16")] + [option] + ([value] if value else [])
    if option != "--alpha":
        changed += ["--alpha", "16"]
    message = _error([*changed, "--resume"])
    assert "belongs to a different run" in message and shown in message
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == weights


# ---- non-finite values ------------------------------------------------------------------------


def test_nan_in_an_adapter_is_refused_at_load_naming_the_tensor(tmp_path) -> None:
    model = lk.apply(tiny_llama(), lk.LoRAConfig(rank=2))
    lk.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    fresh = tiny_llama()
    with pytest.raises(lk.AdapterLoadError, match=f"NaN or Inf values in 1 tensor.*{key}"):
        lk.load_adapter(fresh, tmp_path / "a")
    assert lk.adapter_names(fresh) == []


def test_inf_in_a_base_weight_is_refused_at_load(tmp_path) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[2, 3] = float("inf")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    message = _error(["eval", "--model", str(tmp_path), "--eval-limit", "1", *FAST[1:]])
    assert "model.layers.1.mlp.up_proj.weight" in message and "NaN or Inf" in message


def test_a_diverging_run_stops_with_the_step_and_the_last_checkpoint(tmp_path) -> None:
    from lorakit.train import TrainConfig, Trainer

    model = lk.apply(tiny_llama(), lk.LoRAConfig(rank=2))
    samples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 4
    config = TrainConfig(
        steps=4,
        batch_size=2,
        micro_batch_size=2,
        checkpoint_every=1,
        output_dir=str(tmp_path),
        progress_bar=False,
    )
    trainer = Trainer(model, samples, config)
    calls = {"n": 0}
    original = trainer._accumulate

    def poisoned(batches, loss_tokens, step):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return original(batches, loss_tokens, step)

    trainer._accumulate = poisoned
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3.*step-000002"):
        trainer.train()


# ---- all-or-nothing loads and applies ---------------------------------------------------------


def test_qlora_with_a_bad_target_leaves_the_model_in_full_precision() -> None:
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'q_prj' matched no module"):
        lk.apply(model, lk.QLoRAConfig(rank=2, target_modules=["q_prj"]))
    assert {type(m).__name__ for m in model.modules()} == {type(m).__name__ for m in tiny_llama().modules()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_failed_full_finetune_load_leaves_no_adapter_and_the_real_error(tmp_path) -> None:
    other = lk.apply(
        tiny_llama(hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32), lk.FullFinetuneConfig()
    )
    lk.save_adapter(other, tmp_path / "full")
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lk.AdapterLoadError, match="shape mismatch"):
        lk.load_adapter(model, tmp_path / "full")
    assert lk.adapter_names(model) == [] and "lorakit_adapters" not in dict(model.named_children())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)


def test_eval_and_chat_load_a_qlora_adapter_onto_its_4bit_base(tmp_path) -> None:
    trained = lk.apply(tiny_llama(), lk.QLoRAConfig(rank=2))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    lk.save_adapter(trained, tmp_path / "q")
    model = tiny_llama()
    assert lk.load_as_trained(model, None, str(tmp_path / "q"))[1]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits)


# ---- atomic writes ----------------------------------------------------------------------------


def test_a_failed_adapter_save_leaves_the_previous_folder_whole(tmp_path, monkeypatch) -> None:
    from lorakit.core import state

    model = lk.apply(tiny_llama(), lk.LoRAConfig(rank=2))
    lk.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    old = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def fail_after_weights(folder, tensors, config, extra=None):
        save_file(tensors, str(folder / state.WEIGHTS_NAME))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state, "write_adapter_folder", fail_after_weights)
    with pytest.raises(OSError):
        lk.save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == old
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary folder left behind
    monkeypatch.undo()
    lk.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"  # the user's own file is kept
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != old["adapter_model.safetensors"]


def test_a_failed_merged_export_leaves_nothing(tmp_path, monkeypatch) -> None:
    from lorakit.generate import export_merged

    model, tokenizer = tiny_llama(), tiny_tokenizer()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError):
        export_merged(model, tokenizer, tmp_path / "merged")
    assert os.listdir(tmp_path) == []


def test_incomplete_checkpoints_are_pruned(tmp_path) -> None:
    from lorakit.train.checkpoint import list_checkpoints, prune, save_checkpoint, step_dir

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(step_dir(root, step), {"w": torch.ones(2)}, {"step": step})
    for step in (2, 5):  # 2: an interrupted save (older); 5: the one being written now
        (step_dir(root, step) / "manifest.json").unlink(missing_ok=True)
        step_dir(root, step).mkdir(exist_ok=True)
    prune(root, keep=2)
    assert [(s, ok) for s, _, ok in list_checkpoints(root)] == [(3, True), (4, True), (5, False)]


def test_a_full_disk_under_the_paged_optimizer_is_an_error_not_sigbus(tmp_path, monkeypatch) -> None:
    from lorakit.quant.paged import StatePool

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="no room on the disk") as caught:
        StatePool("mmap", str(tmp_path)).zeros(torch.Size([1024]))
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
    monkeypatch.undo()
    pool = StatePool("mmap", str(tmp_path)).zeros(torch.Size([1024]))
    assert float(pool.abs().sum()) == 0.0
