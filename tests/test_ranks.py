"""`lorakit inspect`: rank per module read from an adapter folder, the table and the heatmap."""

from __future__ import annotations

import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.models import tiny_llama
from lorakit.ranks import adapter_ranks, format_ranks


def _adalora_folder(tmp_path):
    """A tiny AdaLoRA adapter whose ranks were set by hand (as a reallocation would)."""
    model = tiny_llama()
    lk.apply(model, lk.AdaLoRAConfig(target_rank=2, init_rank=4, target_modules=["q_proj", "up_proj"]))
    [allocator] = lk.training_hooks(model)
    wanted = {}
    for i, (path, delta) in enumerate(allocator.deltas.items()):
        delta.mask.copy_(torch.arange(4) < i)  # ranks 0, 1, 2, 3
        wanted[path] = i
    allocator.config.rank_pattern = {path: d.kept_slots() for path, d in allocator.deltas.items()}
    return lk.save_adapter(model, tmp_path / "ada")[0], wanted


def test_adalora_ranks_come_from_the_saved_pattern(tmp_path) -> None:
    folder, wanted = _adalora_folder(tmp_path)
    peft_type, rows = adapter_ranks(folder)
    assert peft_type == "ADALORA"
    assert {r.path: r.rank for r in rows} == wanted and {r.initial for r in rows} == {4}
    assert [(r.layer, r.kind) for r in rows][:2] == [(0, "up_proj"), (0, "q_proj")]
    table = format_ranks(peft_type, rows)
    assert "total rank 6 (mean 1.50) of 16 at the start" in table
    assert table.splitlines()[1].split() == ["0", "1/4", "0/4"]  # up_proj, q_proj


def test_lora_ranks_follow_rank_pattern(tmp_path) -> None:
    model = tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    folder = lk.save_adapter(model, tmp_path / "lora")[0]
    _, rows = adapter_ranks(folder)
    assert {(r.kind, r.rank) for r in rows} == {("q_proj", 4), ("v_proj", 2)}
    assert all(r.rank == r.initial for r in rows)


def test_inspect_command_prints_and_writes_the_heatmap(tmp_path, capsys) -> None:
    folder, _ = _adalora_folder(tmp_path)
    png = tmp_path / "ranks.png"
    main(["inspect", str(folder), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "up_proj" in out and f"heatmap: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    main(["inspect", str(folder)])
    assert (folder / "rank_heatmap.png").is_file()
