"""More than one process: PyTorch's DistributedDataParallel under `torchrun` or `accelerate launch`.

Both launchers start one process per device and set RANK and WORLD_SIZE; lorakit reads them
(`World.from_env`) and joins the process group itself (gloo on CPU, nccl on CUDA), so
`torchrun --nproc-per-node 2 -m lorakit train ...` and `accelerate launch -m lorakit train ...` run
the ordinary trainer. What changes with N processes, and nothing else:

- The global batch stays `batch_size` samples: every rank draws the same seeded order and forms the
  step's micro-batches as one process would (sorted by length, `micro_batch_size` each), and takes
  every N-th micro-batch (`micro_batches(..., shard=)`). Each micro-batch is then exactly one of the
  single process's, so per-micro-batch terms (a router's balancing loss) agree too. `batch_size`
  must be a multiple of micro_batch_size x N (refused on every rank before any collective).
- The loss is normalised by the step's loss tokens over all ranks (one all-reduce of a count), and
  DDP averages the gradients, so each rank scales its loss by N: the gradient is exactly the
  one-process gradient of the same global batch (up to summation order).
- DDP wraps a small module whose forward is the chunked loss, so the decoder, the head and every
  adapter run inside DDP's forward; all but the last micro-batch run under `no_sync()`.
- Rank 0 alone writes the log, the progress bar, checkpoints and the adapter, and evaluates; the
  others wait at a barrier. Every rank resumes from the same checkpoint folder.
- A group lorakit joined is left at the process's exit (atexit): without `destroy_process_group`
  gloo's worker threads outlive the interpreter and a rank may abort at exit ("terminate called
  without an active exception", SIGABRT) after a run that succeeded.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The launcher's RANK / WORLD_SIZE (one process: rank 0 of 1)."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as err:
            raise ValueError(f"RANK/WORLD_SIZE must be integers ({err})") from None
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the launch")
        return cls(rank, size)


TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 evaluates while the others wait at a barrier


def join(world: World, device: torch.device) -> None:
    """Join the launch's process group (once): gloo on CPU, nccl on CUDA."""
    if not world.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    atexit.register(_leave)


def _leave() -> None:
    """Destroy the process group while the interpreter is still whole (see the module's notes)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    """The world of this process: the process group's if one is initialised, else the launcher's."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World.from_env()


def _shared() -> bool:
    """Whether a process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _shared():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (counts, logged losses); as given alone."""
    if not _shared():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def check_batch(batch_size: int, micro_batch_size: int, world: World) -> None:
    unit = micro_batch_size * world.size
    if world.enabled and batch_size % unit:
        raise ValueError(
            f"--batch-size {batch_size} does not split over {world.size} processes in micro-batches of "
            f"{micro_batch_size}: each process takes whole micro-batches of the global batch; use a "
            f"multiple of {unit} (e.g. {batch_size - batch_size % unit or unit}) or a smaller --micro-batch-size"
        )


class LossModule(nn.Module):
    """The trainer's loss as one module, so DDP's forward covers the whole computation."""

    def __init__(self, model: nn.Module, loss_fn) -> None:  # noqa: ANN001 (the chunked loss)
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        return self.__dict__["loss_fn"](self.model, **kwargs)


def wrap(module: LossModule, world: World, device: torch.device) -> nn.Module:
    """The loss module in DDP when there is more than one process; as it is otherwise."""
    if not world.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # a part that may leave some of its parameters without a gradient in a step (a routed mixture's
    # top-k gates) says so; DDP then looks for them, one extra walk of the autograd graph per step
    unused = any(getattr(m, "skips_parameters", False) for m in module.modules())
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused)


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """DDP's `no_sync()` (FSDP2's `set_requires_gradient_sync`) when `skip` (a micro-batch before
    the step's last), else nothing."""
    from lorakit.train import fsdp

    if fsdp.no_sync(module, skip):
        yield
        return
    sync_off = getattr(module, "no_sync", None)
    if skip and sync_off is not None:
        with sync_off():
            yield
    else:
        yield
