"""Checkpoints: atomic writes, exact resume, and refusing corrupt or foreign checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.train import CheckpointError, Trainer
from lorakit.train import checkpoint as ckpt


def held_out(model) -> dict[str, float]:
    """A deterministic evaluation: the mean of the trainable weights."""
    return {"probe": float(sum(p.double().sum() for p in model.parameters() if p.requires_grad))}


def full_run(tiny, make_config, samples, folder: Path) -> tuple[dict[str, torch.Tensor], list]:
    model = tiny.gpt2(dropout=0.1)
    config = make_config(steps=7, checkpoint_every=2, eval_every=2, output_dir=str(folder))
    result = Trainer(model, samples, config, eval_fn=held_out).train()
    return tiny.params_of(model), result.evals


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny, make_config, tmp_path):
    samples = tiny.samples(10)  # 10 samples, batches of 4: batches cross epoch ends
    reference, reference_evals = full_run(tiny, make_config, samples, tmp_path / "full")

    folder = tmp_path / "interrupted"
    config = make_config(steps=7, checkpoint_every=2, eval_every=2, output_dir=str(folder))
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            tiny.gpt2(dropout=0.1), samples, config, hooks=[tiny.Interrupt(after=5)], eval_fn=held_out
        ).train()
    assert [p.name for _, p, _ in ckpt.list_checkpoints(folder / "checkpoints")] == [
        "step-000002",
        "step-000004",
    ]

    # a fresh model with other initial weights: everything trainable comes from the checkpoint
    model = tiny.gpt2(seed=123, dropout=0.1)
    messages: list[str] = []
    resumed = make_config(steps=7, checkpoint_every=2, eval_every=2, output_dir=str(folder), resume=True)
    result = Trainer(model, samples, resumed, log=messages.append, eval_fn=held_out).train()

    assert any("resumed from" in m and "step-000004" in m for m in messages)
    assert result.steps == 7
    for name, value in tiny.params_of(model).items():
        assert torch.equal(value, reference[name]), name
    logged = [json.loads(line)["step"] for line in result.log_path.read_text().splitlines()]
    # steps 1-7 and the evaluations after steps 2, 4, 6 and at the end; step 5 of the interrupted
    # run is not logged twice
    assert logged == [1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7]
    # the held-out curve covers the whole run, evaluations before the resume included
    assert [e["step"] for e in result.evals] == [e["step"] for e in reference_evals] == [2, 4, 6, 7]
    for ours, ref in zip(result.evals, reference_evals, strict=True):
        assert ours["eval_probe"] == pytest.approx(ref["eval_probe"], rel=1e-12)


def test_a_failed_write_leaves_no_partial_file_in_view(tiny, make_config, tmp_path, monkeypatch):
    real_save = ckpt.save_file
    calls = {"n": 0}

    def save_then_fail(tensors, path):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(tensors, path)
        Path(path).write_bytes(b"half a file")  # the disk filled up midway
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", save_then_fail)
    folder = tmp_path / "run"
    config = make_config(steps=4, checkpoint_every=2, output_dir=str(folder))
    with pytest.raises(OSError, match="No space left"):
        Trainer(tiny.llama(), tiny.samples(8), config).train()

    second = folder / "checkpoints" / "step-000004"
    assert list(second.iterdir()) == []  # no weights, no temporary file, no manifest
    monkeypatch.setattr(ckpt, "save_file", real_save)
    messages: list[str] = []
    resumed = make_config(steps=4, checkpoint_every=2, output_dir=str(folder), resume=True)
    Trainer(tiny.llama(), tiny.samples(8), resumed, log=messages.append).train()
    assert any("incomplete checkpoint" in m and "step-000004" in m for m in messages)
    assert any("resumed from" in m and "step-000002" in m for m in messages)


def test_atomic_write_keeps_the_old_file_when_the_new_write_fails(tmp_path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fail_midway(path: Path) -> None:
        path.write_bytes(b"ne")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, fail_midway)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_atomic_files_and_folders_get_the_usual_modes(tmp_path) -> None:
    """mkstemp and mkdtemp make 0600 / 0700; what lorakit writes is readable as any new file is."""
    import os

    from lorakit.core.io import atomic_folder

    mask = os.umask(0o022)
    try:
        ckpt.atomic_write(tmp_path / "a.json", lambda p: p.write_text("{}"))
        atomic_folder(tmp_path / "folder", lambda p: (p / "x").write_text("x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


def trained_folder(tiny, make_config, tmp_path, **overrides) -> Path:
    folder = tmp_path / "run"
    values = {"steps": 2, "checkpoint_every": 2, "output_dir": str(folder), **overrides}
    Trainer(tiny.llama(), tiny.samples(8), make_config(**values)).train()
    return folder


def resume(tiny, make_config, folder: Path, model=None, **overrides) -> None:
    config = make_config(steps=2, output_dir=str(folder), resume=True, **overrides)
    Trainer(model or tiny.llama(), tiny.samples(8), config).train()


@pytest.mark.parametrize("name", [ckpt.WEIGHTS, ckpt.STATE])
def test_a_corrupt_checkpoint_is_detected(tiny, make_config, tmp_path, name: str) -> None:
    folder = trained_folder(tiny, make_config, tmp_path)
    target = folder / "checkpoints" / "step-000002" / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"is corrupt: {name}.*does not match"):
        resume(tiny, make_config, folder)


def test_a_truncated_checkpoint_is_detected(tiny, make_config, tmp_path) -> None:
    folder = trained_folder(tiny, make_config, tmp_path)
    target = folder / "checkpoints" / "step-000002" / ckpt.WEIGHTS
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        resume(tiny, make_config, folder)


def test_loading_an_incomplete_checkpoint_directly_is_refused(tiny, make_config, tmp_path):
    folder = trained_folder(tiny, make_config, tmp_path) / "checkpoints" / "step-000002"
    (folder / ckpt.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(folder)


def test_a_checkpoint_of_other_trainable_parameters_is_refused(tiny, make_config, tmp_path):
    folder = trained_folder(tiny, make_config, tmp_path)
    model = tiny.llama()
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(CheckpointError, match="not trainable in the model: lm_head.weight"):
        resume(tiny, make_config, folder, model=model)


def test_a_checkpoint_of_other_shapes_is_refused(tiny, make_config, tmp_path) -> None:
    folder = tmp_path / "run"
    config = make_config(steps=2, checkpoint_every=2, output_dir=str(folder))
    Trainer(tiny.gpt2(n_embd=32), tiny.samples(8), config).train()
    with pytest.raises(
        CheckpointError,
        match=r"shapes differ: transformer.h.0.attn.c_attn.bias: checkpoint \(96,\) vs model \(144,\)",
    ):
        resume(tiny, make_config, folder, model=tiny.gpt2(n_embd=48))


def test_a_checkpoint_of_another_configuration_is_refused(tiny, make_config, tmp_path) -> None:
    folder = trained_folder(tiny, make_config, tmp_path)
    with pytest.raises(CheckpointError, match="lr=0.01 there, 0.02 here"):
        resume(tiny, make_config, folder, lr=0.02)


def test_a_fresh_run_does_not_overwrite_existing_checkpoints(tiny, make_config, tmp_path):
    folder = trained_folder(tiny, make_config, tmp_path)
    config = make_config(steps=2, output_dir=str(folder))
    with pytest.raises(FileExistsError, match="pass resume=True"):
        Trainer(tiny.llama(), tiny.samples(8), config).train()


def test_old_checkpoints_are_pruned(tiny, make_config, tmp_path) -> None:
    folder = trained_folder(tiny, make_config, tmp_path, steps=6, checkpoint_every=1)
    names = [p.name for _, p, _ in ckpt.list_checkpoints(folder / "checkpoints")]
    assert names == ["step-000005", "step-000006"]


def test_resuming_a_finished_run_changes_nothing(tiny, make_config, tmp_path) -> None:
    folder = trained_folder(tiny, make_config, tmp_path)
    model = tiny.llama(seed=5)
    resume(tiny, make_config, folder, model=model)
    weights, _ = ckpt.load_checkpoint(folder / "checkpoints" / "step-000002")
    assert all(torch.equal(p, weights[n]) for n, p in tiny.params_of(model).items())
