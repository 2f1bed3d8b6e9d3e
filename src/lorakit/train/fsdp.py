"""FSDP2 (`--fsdp`): the frozen base and the adapter sharded over the processes of a launch.

With `TrainConfig.fsdp` and more than one process, the trainer applies PyTorch's `fully_shard` to
every decoder layer and then to the loss module (the root: embedding, final norm, head), so each
rank keeps 1/N of every weight and all-gathers a layer's weights just for its forward and backward.
Everything else is the DDP path of train/distributed.py: the same global batch split in whole
micro-batches, the same loss normalisation, gradients averaged over ranks (FSDP2's reduce-scatter),
and no gradient synchronisation before a step's last micro-batch.

What sharding changes, and how each is handled here:

- Parameters become DTensors, so the optimizer is built after sharding (`Trainer` rebuilds it by
  parameter name, with the caller's groups).
- Checkpoints hold full tensors in the one-process format (every rank joins the gathers; rank 0
  writes), so a checkpoint resumes on any number of processes, with or without `--fsdp`; a resume
  slices the full tensors back into each rank's shard (no communication).
- Rank 0 evaluates alone: every rank first gathers the whole model (`gathered`), rank 0 runs the
  evaluation with no collective, then every rank drops the gathered copies.
- After the last step the model is gathered for good (`gather`), so rank 0 writes the adapter whole
  and scores it as after a one-process run. The whole model is then on every rank: a model that
  fits only sharded cannot be scored in the same launch.

Only the methods whose config says `fsdp_problem = None` shard (LoRA with its rsLoRA/PiSSA/LoRA+
options, DoRA); others are refused with their reason before any collective, as are the settings
that need the whole model outside the trainer's forward (KL to the base, trainable whole-module
copies), the paged optimizer and compiled layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.core.model import registry
from lorakit.train.compiled import decoder_layers

GENERIC = "it has not been checked under FSDP2 here; train it with DDP (leave out --fsdp)"


def problem(model: nn.Module, config: Any) -> str | None:
    """Why this model and TrainConfig cannot train under FSDP2 here; None if they can."""
    for name, method in registry(model).configs.items():
        reason = getattr(type(method), "fsdp_problem", GENERIC)
        if reason is not None:
            return f"adapter {name!r} ({type(method).__name__}): {reason}"
        if getattr(method, "modules_to_save", None):
            return (
                f"adapter {name!r} trains whole modules ({', '.join(method.modules_to_save)}), which are "
                "not sharded here; drop modules_to_save or train with DDP"
            )
    if not registry(model).configs:
        return "the model has no adapter (full fine-tuning shards the trainable weights: not supported here)"
    if not decoder_layers(model):
        return f"{type(model).__name__} names no decoder-layer class (_no_split_modules) to shard"
    if config.kl_to_base:
        return "--kl-to-base runs the base outside the trainer's forward; train it with DDP"
    if config.optimizer != "adamw":
        return f"--optimizer {config.optimizer} pages the states of whole tensors; use adamw"
    if config.compile == "on":
        return "compiled decoder layers are not checked under FSDP2 here; use --compile off"
    return None


def shard(model: nn.Module, root: nn.Module, device: torch.device, size: int) -> None:
    """fully_shard every decoder layer of `model`, then `root` (the loss module holding `model`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def _sharded(root: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def gather(root: nn.Module) -> None:
    """On every rank: all-gather every weight and keep it gathered through later forwards, so one
    rank can run the model alone (no collective). `release` undoes it."""
    for module in _sharded(root):
        module.set_reshard_after_forward(False, recurse=False)
    for module in _sharded(root):
        module.unshard()


def release(root: nn.Module) -> None:
    """On every rank, after `gather`: back to sharded weights and a clean iteration state (a forward
    rank 0 ran alone leaves a record FSDP2's backward prefetching would otherwise follow)."""
    for module in _sharded(root)[1:]:
        module.set_reshard_after_forward(True, recurse=False)
    root.reset_iter_state()  # the root keeps its own (FSDP2's default: not resharded after forward)


@contextlib.contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    gather(root)
    try:
        yield
    finally:
        release(root)


def full(tensor: Tensor) -> Tensor:
    """A DTensor's whole value (a collective: every rank calls it, in the same order); else as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (a full tensor read from a checkpoint) as the DTensor shard layout of `param`; each
    rank slices its own part (no communication: every rank read the same file)."""
    if not hasattr(param, "device_mesh") or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state_dict with every sharded tensor gathered: the one-process format."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full(v) if isinstance(v, Tensor) else v for k, v in per_param.items()}
        for index, per_param in sorted(state["state"].items())
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a one-process optimizer state_dict into an optimizer over sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {**state, "state": {
        index: {k: local_like(v, params[int(index)]) if isinstance(v, Tensor) else v for k, v in per.items()}
        for index, per in state["state"].items()
    }}  # fmt: skip
    optimizer.load_state_dict(state)


def no_sync(module: nn.Module, skip: bool) -> bool:
    """FSDP2's switch for gradient accumulation: no reduce-scatter until the step's last micro-batch.
    False when `module` is not sharded."""
    switch = getattr(module, "set_requires_gradient_sync", None)
    if switch is None:
        return False
    switch(not skip)
    return True
