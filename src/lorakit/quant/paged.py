"""A paged AdamW: optimizer states live in a pool outside the compute device's working memory and
are brought in one parameter group at a time during `step()`.

- On CUDA the pool is pinned host memory: a group's exp_avg / exp_avg_sq are copied to the GPU
  (non-blocking), updated, and copied back, so GPU memory holds the states of one group at a
  time instead of all of them (QLoRA's paged optimizers use CUDA unified memory for the same end).
- On CPU the compute device *is* host memory, so there is nothing to page to; the pool is a
  memory-mapped file, which lets the kernel evict the states to disk under memory pressure and
  read them back when `step()` touches them. It does not make a step faster.

The update is AdamW (Loshchilov & Hutter, ICLR 2019) with bias correction, the same arithmetic as
`torch.optim.AdamW(foreach=False)`:

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class StatePool:
    """Storage for optimizer states off the compute device: pinned host memory or a mapped file."""

    def __init__(self, kind: str = "auto", directory: str | None = None) -> None:
        if kind == "auto":
            kind = "pinned" if torch.cuda.is_available() else "mmap"
        if kind not in ("pinned", "mmap", "memory"):
            raise ValueError(f"pool kind must be auto, pinned, mmap or memory, got {kind!r}")
        self.kind, self.directory = kind, directory

    def zeros(self, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
        n = math.prod(shape)
        if self.kind == "pinned":
            return torch.zeros(shape, dtype=dtype, pin_memory=True)
        if self.kind == "memory":
            return torch.zeros(shape, dtype=dtype)
        fd, path = tempfile.mkstemp(prefix="lorakit-paged-", suffix=".bin", dir=self.directory)
        try:
            _reserve(fd, n * torch.empty((), dtype=dtype).element_size(), path)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        tensor = torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape)
        os.unlink(path)  # the mapping keeps the file alive; nothing is left behind on exit
        return tensor


def _reserve(fd: int, size: int, path: str) -> None:
    """Give the file its disk blocks now. A sparse file would get them only when the kernel writes
    a page back, and on a full disk that kills the process with SIGBUS instead of an error."""
    try:
        os.posix_fallocate(fd, 0, size)  # zero-filled and reserved
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no room on the disk for {size / 2**20:.1f} MiB of paged optimizer state; free space "
                "there, point the pool at another folder (StatePool(directory=...), or TMPDIR), or "
                "train with optimizer=adamw",
                os.path.dirname(path),
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.truncate(fd, size)  # a file system without fallocate: sparse, as the last resort


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose states live in a `StatePool` and are paged in per parameter group at step."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        pool: StatePool | str = "auto",
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.pool = pool if isinstance(pool, StatePool) else StatePool(pool)

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = self.pool.zeros(p.shape)
            state["exp_avg_sq"] = self.pool.zeros(p.shape)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._state(p) for p in params]
            paged_in = [(_page_in(s["exp_avg"], p), _page_in(s["exp_avg_sq"], p)) for p, s in zip(params, states, strict=True)]  # fmt: skip
            for p, s, (m, v) in zip(params, states, paged_in, strict=True):
                s["step"] += 1
                _adamw_update(p, p.grad, m, v, float(s["step"]), group)
                if m.data_ptr() != s["exp_avg"].data_ptr():  # paged in: write back to the pool
                    s["exp_avg"].copy_(m, non_blocking=True)
                    s["exp_avg_sq"].copy_(v, non_blocking=True)
            if params and params[0].is_cuda:
                torch.cuda.current_stream().synchronize()  # the pool is consistent before the next group
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch moved them next to the parameters: back to the pool
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    pooled = self.pool.zeros(state[key].shape)
                    pooled.copy_(state[key])
                    state[key] = pooled
            if "step" in state:
                state["step"] = state["step"].detach().to("cpu", torch.float32)


def _page_in(state: Tensor, p: Tensor) -> Tensor:
    """The state on the parameter's device: a copy from the pinned pool on CUDA, the mapped tensor itself on CPU."""
    return state.to(p.device, non_blocking=True)


def _adamw_update(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float, group: dict[str, Any]) -> None:
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    p.mul_(1 - lr * group["weight_decay"])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
