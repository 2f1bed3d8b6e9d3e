"""AdaLoRA's rank budget: importance scores, the cubic schedule, masking, the orthogonality penalty.

Importance of an entry w of A, E or B (the paper's eq. 6-8, as the authors' code and PEFT):

    I = |w * dL/dw|      I_bar <- b1 I_bar + (1 - b1) I      U_bar <- b2 U_bar + (1 - b2) |I - I_bar|
    s(w) = I_bar * U_bar
    S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)      for triplet i of a layer

With T optimizer steps and T_f = T - t_final, after step t (1-based) the budget (lambdas kept over
all layers) is b0 = sum of init ranks for t <= t_init, then

    b(t) = b_T + (b0 - b_T) * (1 - (t - t_init) / (T_f - t_init))^3,    b_T = target_rank * layers

every delta_t steps until T_f (keeping exactly the b(t) best triplets), where the final pattern is fixed; after T_f, E is re-masked every
step (the optimizer's momentum would revive masked lambdas). Masking zeroes E only, so a triplet
can come back at a later reallocation, as in the paper. Scores use the gradients before clipping.

`RankAllocator` is the TrainingHooks object; a run whose final allocation never happens (the loop
did not call the hooks, or stopped before T_f) raises in `on_train_end` instead of silently saving
plain LoRA. The schedule is checked against the run's steps at the first step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.contract import TrainingHooks
from ..core.model import adapter_deltas, registry
from .adalora import AdaLoRAConfig, AdaLoRADelta


class AdaLoRAScheduleError(RuntimeError):
    """An AdaLoRA run whose rank budget cannot be, or was not, reallocated."""


@dataclass(frozen=True)
class Schedule:
    total: int
    t_init: int
    t_final: int
    delta_t: int

    @classmethod
    def resolve(cls, config: AdaLoRAConfig, total: int) -> Schedule:
        """Fill unset values from the run length T (see AdaLoRAConfig) and check they fit."""
        # at least 1: the first step's scores are all 0 (E = 0 makes every |w * grad| vanish)
        t_init = max(1, total // 10) if config.t_init is None else config.t_init
        t_final = (3 * total) // 10 if config.t_final is None else config.t_final
        delta_t = max(1, total // 30) if config.delta_t is None else config.delta_t
        if t_init < 0 or t_final < 0 or delta_t < 1:
            raise AdaLoRAScheduleError(
                f"AdaLoRA needs t_init >= 0, t_final >= 0, delta_t >= 1; got {t_init}, {t_final}, {delta_t}"
            )
        if t_init + t_final >= total:
            raise AdaLoRAScheduleError(
                f"AdaLoRA's schedule leaves no step to reallocate in: t_init={t_init} + t_final={t_final} "
                f">= {total} steps. Lower t_init/t_final or train longer (unset, they scale with the steps)"
            )
        return cls(total, t_init, t_final, delta_t)

    @property
    def final_step(self) -> int:
        return self.total - self.t_final

    def budget(self, step: int, initial: int, target: int) -> int:
        if step <= self.t_init:
            return initial
        if step >= self.final_step:
            return target
        left = 1 - (step - self.t_init) / (self.final_step - self.t_init)
        return int(target + (initial - target) * left**3)


class RankAllocator(TrainingHooks):
    """Reallocates one AdaLoRA adapter's ranks during training; give it to the trainer as a hook."""

    def __init__(self, config: AdaLoRAConfig, model: nn.Module, adapter_name: str) -> None:
        self.config = dataclasses.replace(config)  # the pattern it writes belongs to this model only
        registry(model).configs[adapter_name] = self.config
        self.deltas: dict[str, AdaLoRADelta] = {
            path: delta for path, _, delta in adapter_deltas(model, adapter_name)
        }
        self.sizes = [len(d.slots) for d in self.deltas.values()]
        self.initial = sum(self.sizes)
        self.target = config.target_rank * len(self.deltas)
        self.from_pattern = bool(config.rank_pattern)  # built from a saved pattern: allocated already
        self.fixed = False  # the final allocation has happened
        self.schedule: Schedule | None = None
        self.reallocations = 0
        self.ema_ipt: dict[str, Tensor] = {}
        self.ema_unc: dict[str, Tensor] = {}
        self.params: dict[str, nn.Parameter] = {
            f"{path}.{attr}": getattr(delta, attr)
            for path, delta in self.deltas.items()
            for attr in ("lora_A", "lora_E", "lora_B")
        }

    # ---- hooks -----------------------------------------------------------------------------------

    def extra_losses(self, model: nn.Module) -> dict[str, Tensor]:
        """gamma * mean over the A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F (not
        squared: the authors' code and PEFT; the paper writes the square)."""
        if self.config.orth_reg_weight == 0 or not self.deltas:
            return {}
        by_shape: dict[torch.Size, list[Tensor]] = {}  # one batched product per shape, not 2 per layer
        for delta in self.deltas.values():
            for rows in (delta.lora_A, delta.lora_B.T):  # Q (r, in) and P^T (r, out)
                by_shape.setdefault(rows.shape, []).append(rows)
        norms = []
        for group in by_shape.values():
            rows = torch.stack(group)  # (n, r, d)
            gram = rows @ rows.transpose(1, 2)  # (n, r, r)
            eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            norms.append(torch.linalg.matrix_norm(gram - eye))  # (n,)
        return {"adalora_orth": self.config.orth_reg_weight * torch.cat(norms).mean()}

    def on_after_backward(self, model: nn.Module, step: int) -> None:
        if self.from_pattern or self.fixed:
            return
        b1, b2 = self.config.beta1, self.config.beta2
        keys = [k for k, p in self.params.items() if p.grad is not None]
        if not keys:
            return
        with torch.no_grad():  # multi-tensor ops: a handful of kernels, not ~8 per parameter
            params = [self.params[k] for k in keys]
            ipt = torch._foreach_mul(params, [p.grad for p in params])  # I = |w * grad|
            torch._foreach_abs_(ipt)
            ema = [self.ema_ipt.setdefault(k, torch.zeros_like(p)) for k, p in zip(keys, params, strict=True)]
            unc = [self.ema_unc.setdefault(k, torch.zeros_like(p)) for k, p in zip(keys, params, strict=True)]
            torch._foreach_mul_(ema, b1)
            torch._foreach_add_(ema, ipt, alpha=1 - b1)  # I_bar
            gap = torch._foreach_sub(ipt, ema)
            torch._foreach_abs_(gap)
            torch._foreach_mul_(unc, b2)
            torch._foreach_add_(unc, gap, alpha=1 - b2)  # U_bar

    def on_step_end(self, model: nn.Module, step: int, total_steps: int) -> None:
        if self.from_pattern:
            return
        if self.schedule is None:
            self._start(total_steps)
        done, schedule = step + 1, self.schedule
        if done > schedule.final_step:
            for delta in self.deltas.values():
                delta.apply_mask()
        elif done == schedule.final_step:
            self.reallocate(self.target)
            self.fixed = True
            self.ema_ipt, self.ema_unc = {}, {}  # the pattern is fixed from here on
        elif done > schedule.t_init and done % schedule.delta_t == 0:
            self.reallocate(schedule.budget(done, self.initial, self.target))

    def on_train_end(self, model: nn.Module, total_steps: int) -> None:
        if self.from_pattern or self.fixed:
            return
        due = "never" if self.schedule is None else f"at step {self.schedule.final_step}"
        raise AdaLoRAScheduleError(
            f"this AdaLoRA run never reached its final rank allocation (due {due}; the run had "
            f"{total_steps} steps, {self.reallocations} reallocation(s)). Without it the adapter is "
            "plain LoRA in SVD form. Call every hook of lorakit.training_hooks(model) in your loop "
            "(lorakit's Trainer and `lorakit train` do), with the run's real step count"
        )

    # ---- allocation ------------------------------------------------------------------------------

    def _start(self, total_steps: int) -> None:
        if self.config.total_steps not in (None, total_steps):
            raise AdaLoRAScheduleError(
                f"AdaLoRA was configured for total_steps={self.config.total_steps} but the run has "
                f"{total_steps} steps; leave total_steps unset to follow the run"
            )
        self.schedule = Schedule.resolve(self.config, total_steps)
        s = self.schedule
        self.config.total_steps, self.config.t_init = s.total, s.t_init
        self.config.t_final, self.config.delta_t = s.t_final, s.delta_t

    def scores(self) -> dict[str, Tensor]:
        """Triplet score S_i per layer: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)."""
        out = {}
        for path in self.deltas:
            s = {attr: self._score(f"{path}.{attr}") for attr in ("lora_A", "lora_E", "lora_B")}
            out[path] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return out

    def _score(self, key: str) -> Tensor:
        p = self.params[key]
        if key not in self.ema_ipt:
            return torch.zeros_like(p)
        return self.ema_ipt[key] * self.ema_unc[key]

    def reallocate(self, budget: int) -> None:
        """Keep exactly the `budget` highest-scoring triplets over all layers and zero the others'
        E. (PEFT drops every triplet tied at its kth-value threshold, which can leave fewer.)"""
        scores = self.scores()
        if budget < self.initial:
            flat = torch.cat([s.float().cpu() for s in scores.values()])  # (initial,)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(budget, sorted=False).indices] = True
            for delta, kept in zip(self.deltas.values(), keep.split(self.sizes), strict=True):
                delta.mask.copy_(kept)
                delta.apply_mask()
        self.reallocations += 1
        self.config.rank_pattern = {path: d.kept_slots() for path, d in self.deltas.items()}

    def ranks(self) -> dict[str, int]:
        return {path: d.rank() for path, d in self.deltas.items()}

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": None if self.schedule is None else dataclasses.asdict(self.schedule),
            "reallocations": self.reallocations,
            "fixed": self.fixed,
            "masks": {path: d.mask.cpu() for path, d in self.deltas.items()},
            "ema_ipt": {k: v.cpu() for k, v in self.ema_ipt.items()},
            "ema_unc": {k: v.cpu() for k, v in self.ema_unc.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["schedule"] is not None:
            self._start(state["schedule"]["total"])
        self.reallocations, self.fixed = state["reallocations"], state["fixed"]
        params = self.params
        for path, mask in state["masks"].items():
            self.deltas[path].mask.copy_(mask)
        self.ema_ipt = {k: v.to(params[k].device) for k, v in state["ema_ipt"].items()}
        self.ema_unc = {k: v.to(params[k].device) for k, v in state["ema_unc"].items()}
        if self.reallocations:
            self.config.rank_pattern = {path: d.kept_slots() for path, d in self.deltas.items()}
