"""`--device`: what auto picks, and a GPU asked for where there is none refused in one line."""

from __future__ import annotations

import pytest
import torch

from lorakit.cli import main
from lorakit.device import describe, peak_memory_mb, resolve_device


def test_auto_is_the_cpu_without_a_gpu_and_the_local_gpu_with_one(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu" and peak_memory_mb(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a torchrun process: its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("choice", ["cuda", "cuda:0"])
def test_a_gpu_asked_for_where_torch_sees_none_is_refused(monkeypatch, choice) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=rf"--device {choice}: torch .* sees no CUDA GPU here; use --device cpu"
    ):
        resolve_device(choice)


def test_an_unknown_device_is_named(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"--device 'tpu': choose auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_lorakit_train_with_device_cuda_and_no_gpu_says_so_before_loading(
    tiny_run_files, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_run_files / "base"), "--data", str(tiny_run_files / "train.jsonl"),
            "--device", "cuda", "--output-dir", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    line = str(exit_info.value.code)  # the one line lorakit prints, exit status 1
    assert "--device cuda: torch" in line and "sees no CUDA GPU" in line
    assert "\n" not in line and not out.exists()
