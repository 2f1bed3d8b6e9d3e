"""Where a run computes: `--device auto|cpu|cuda|cuda:N`, and the device-side clocks and memory
counters the bench reads.

"auto" is the GPU when torch sees one (under a launcher, the process's own: cuda:LOCAL_RANK), else
the CPU. A GPU asked for by name and not there is an error that says why, before anything loads.
"""

from __future__ import annotations

import os

import torch


def resolve_device(choice: str | None = "auto") -> torch.device:
    """The torch device for a `--device` value (None means "auto")."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return _local_cuda() if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            built = (
                "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            )
            raise ValueError(
                f"--device {choice}: torch {torch.__version__} ({built}) sees no CUDA GPU here; "
                "use --device cpu (or auto, which picks the GPU only when there is one)"
            )
        if choice == "cuda":
            return _local_cuda()
        index = choice.partition(":")[2]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ValueError(f"--device {choice}: this machine has GPUs cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", int(index))
    raise ValueError(f"--device {choice!r}: choose auto, cpu, cuda or cuda:N")


def _local_cuda() -> torch.device:
    """cuda:LOCAL_RANK under torchrun / accelerate (one GPU per process), else cuda:0."""
    index = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return torch.device("cuda", index % max(1, torch.cuda.device_count()))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops finish as they return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory tensors held on the device since the last reset (MiB); None on the CPU,
    where the process's resident memory is the measure instead."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def peak_reserved_mb(device: torch.device) -> float | None:
    """The most memory the caching allocator held from the driver since the last reset (MiB): what
    the process kept on the GPU, cached blocks included; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**20


def describe(device: torch.device) -> str:
    """One line naming the device: the GPU's name and memory, or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
