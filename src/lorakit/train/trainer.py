"""The SFT training loop: accumulation over a token-weighted loss, hooks, checkpoints, resume.

The trainer knows nothing about adapters. It trains whatever has `requires_grad=True`, with the
AdamW groups the caller passes (LoRA+ and friends plug in there), and calls the optional hook
methods of `docs/architecture.md` (TrainingHooks). Hooks may also offer `state_dict()` /
`load_state_dict(state)`; their states then travel in the checkpoints.

The loss of an optimizer step is the mean over every loss token of the whole accumulated batch:
each micro-batch backpropagates `sum of its token losses / tokens of the whole batch`, with the
token count taken from the labels before the first backward. Averaging per-micro-batch means
instead would weight a token of a short-answer micro-batch more than one of a long-answer one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lorakit.core.model import (
    adapter_settings,
    adapters_row_problem,
    disable_adapters,
    training_hooks,
)
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed, fsdp
from lorakit.train.batching import (
    Collate,
    Replay,
    SampleOrder,
    bool_mask_problem,
    check_has_loss_tokens,
    default_collate,
    fingerprint,
    loss_token_count,
    micro_batches,
    model_mask,
    pads_only,
    sample_tokens,
)
from lorakit.train.config import TRAJECTORY_FIELDS, TrainConfig
from lorakit.train.fast import prepare_for_training
from lorakit.train.loss import (
    IGNORE_INDEX,
    chunked_causal_lm_loss,
    kl_to_reference,
    output_head,
    reference_log_probs,
    softcap_of,
)
from lorakit.train.metrics import JsonlLog, TensorBoardLog, plot_loss, read_log
from lorakit.train.optim import (
    build_optimizer,
    build_scheduler,
    default_param_groups,
    precision_choice,
)

_logger = logging.getLogger("lorakit.train")
EvalFn = Callable[[nn.Module], "float | dict[str, float]"]
_RESERVED = {
    "step", "loss", "task_loss", "lr", "grad_norm", "tokens", "loss_tokens", "elapsed",
    "loss_task", "loss_replay", "kl_to_base",
}  # fmt: skip


@dataclass
class TrainResult:
    """What a run did; `steps` counts optimizer steps, including those before a resume."""

    steps: int
    final_loss: float | None
    skipped_batches: int
    elapsed_s: float
    tokens_per_s: float
    log_path: Path
    plot_path: Path
    checkpoint_dir: Path | None = None
    evals: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Progress:
    """The counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    tokens: int = 0
    last_loss: float | None = None


class Trainer:
    """Train `model` on `train_samples` (each with input_ids and labels; -100 = no loss)."""

    def __init__(
        self,
        model: nn.Module,
        train_samples: Sequence[Any],
        config: TrainConfig,
        collate: Collate = default_collate,
        pad_id: int = 0,
        param_groups: list[dict] | None = None,
        hooks: Sequence[Any] | None = None,
        eval_fn: EvalFn | None = None,
        log: Callable[[str], None] | None = None,
        run_options: dict[str, Any] | None = None,
        replay: Replay | None = None,
    ) -> None:
        """`run_options`: settings outside `config` that change what the run computes (the method,
        the model, the data options of a command-line run). Checkpoints record them with the
        adapters' configs, and a resume with any of them changed is refused, naming it.

        `replay`: general samples mixed into every batch (`Replay`); their loss and the task's are
        logged apart (`loss_task`, `loss_replay`), the step's loss stays the mean over all its
        loss tokens. With `config.kl_to_base` > 0, the KL term (`kl_to_base` in the log) runs the
        model a second time per micro-batch, without gradient and with its adapters switched off."""
        check_has_loss_tokens(train_samples)
        self.replay = replay
        self.run_options = dict(run_options or {})
        # as configured, before training: some configs fill in state as they train (AdaLoRA's ranks)
        self.adapter_settings = adapter_settings(model)
        self.model, self.samples, self.config = model, train_samples, config
        self.collate, self.pad_id, self.eval_fn = collate, pad_id, eval_fn
        # None: the hooks of the model's methods (AdaLoRA's budget), so they cannot be forgotten
        self.hooks = list(training_hooks(model) if hooks is None else hooks)
        self.world = distributed.current()  # torchrun / accelerate launch: docs in train/distributed.py
        distributed.check_batch(
            config.batch_size, config.micro_batch_size, self.world
        )  # on every rank, before any collective
        say = log or _logger.info
        self._say = say if self.world.main else (lambda _: None)
        self.device = next(model.parameters()).device
        self.amp_dtype, self._precision_line = precision_choice(config.precision, self.device)
        self.trainable = dict(iter_trainable(model))
        groups = param_groups or default_param_groups(model, config.weight_decay)
        self.group_names = _group_names(groups, self.trainable)
        self._groups = groups  # rebuilt by name when FSDP2 replaces the parameters
        self.fsdp = config.fsdp and self.world.enabled  # one process: nothing to shard
        if self.fsdp and (reason := fsdp.problem(model, config)):
            raise ValueError(f"--fsdp: {reason}")  # on every rank, before any collective
        self.share_prefix, self._rows_line = _rows_choice(model, collate, config)
        _check_master_dtype(self.trainable)
        self.optimizer = build_optimizer(groups, config, self.device)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.output_dir = Path(config.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self._head_checked = False
        # the loss as one module; train() puts it in DDP when launched on more than one process
        self.loss_model: nn.Module = distributed.LossModule(model, chunked_causal_lm_loss)

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        distributed.join(self.world, self.device)
        self._prepare_model()
        if self.fsdp:
            self._shard()
        else:
            self.loss_model = distributed.wrap(self.loss_model, self.world, self.device)
        progress, order = self._begin()
        resume_step = progress.step if progress.step else None
        log = JsonlLog(self.output_dir / "log.jsonl", resume_step) if self.world.main else _NoLog()
        if self.config.report_to == "tensorboard" and self.world.main:
            log.mirrors.append(TensorBoardLog(self.output_dir / "tensorboard"))
        # a resumed run reports the whole held-out curve, not only the evaluations after the resume
        evals: list[dict[str, float]] = [r for r in log.kept if any(k.startswith("eval_") for k in r)]
        started = time.perf_counter() - progress.elapsed
        bar = tqdm(
            total=self.config.steps,
            initial=progress.step,
            disable=not self.config.progress_bar or not self.world.main,
            desc="train",
            dynamic_ncols=True,
        )
        with contextlib.closing(bar):
            while progress.step < self.config.steps:
                record = self._next_step(order, progress)
                if record is None:
                    continue
                progress.elapsed = time.perf_counter() - started
                self._after_step(record, progress, order, log, bar, evals)
        log.close()
        if self.fsdp:  # whole again on every rank: rank 0 writes and scores the adapter alone
            fsdp.gather(self.loss_model)
        self._call("on_train_end", self.config.steps)
        return self._finish(progress, log, evals)

    def _next_step(self, order: SampleOrder, progress: _Progress) -> dict[str, Any] | None:
        """Run one optimizer step; None when the whole batch has no loss token (it is skipped)."""
        replayed = self.replay.count(progress.step, self.config.batch_size) if self.replay else 0
        task = order.take(self.config.batch_size - replayed)
        batches = micro_batches(
            self.samples,
            task,
            self.config.micro_batch_size,
            self.collate,
            self.pad_id,
            (self.replay.samples, self.replay_order.take(replayed)) if self.replay else None,
            shard=(self.world.rank, self.world.size),  # every rank draws the global batch, keeps its share
            packing=self.config.packing,
            share_prefix=self.share_prefix,
        )
        # the step's loss tokens over every rank: the loss is the mean over the global batch
        loss_tokens = int(distributed.all_sum([sum(loss_token_count(b["labels"]) for b in batches)])[0])
        if loss_tokens == 0:
            progress.skipped += 1
            return None
        tick = time.perf_counter()
        record = self._optimizer_step(batches, loss_tokens, progress.step)
        seconds = time.perf_counter() - tick
        record["tokens_per_s"] = record["tokens"] / max(seconds, 1e-9)
        progress.step += 1
        progress.tokens += record["tokens"]
        progress.last_loss = record["loss"]
        return record

    def _optimizer_step(self, batches: list[dict[str, Tensor]], loss_tokens: int, step: int) -> dict:
        self._call("on_step_start", step)
        task_loss, per_batch, per_source = self._accumulate(batches, loss_tokens, step)
        extras = self._extra_losses(set(per_batch))
        self._call("on_after_backward", step)
        grad_norm = self._clip(step)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._call("on_step_end", step, self.config.steps)
        tokens = int(distributed.all_sum([sum(sample_tokens(b) for b in batches)])[0])
        return {
            "step": step + 1,
            "loss": task_loss + sum(per_batch.values()) + sum(extras.values()),
            "task_loss": task_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            **per_source,
            **per_batch,
            **extras,
        }

    def _accumulate(
        self, batches: list[dict[str, Tensor]], loss_tokens: int, step: int
    ) -> tuple[float, dict[str, float], dict[str, float]]:
        """Backpropagate every micro-batch's share of the token-mean loss, with the hooks'
        per-micro-batch terms weighted by the same share (and the KL-to-base term by its rows'
        share); return that mean, each term's (added to the step's loss), and, when replaying, the
        mean loss per source (`loss_task`, `loss_replay`: parts of the mean, not added to it)."""
        total = 0.0
        terms: dict[str, float] = {}
        per_source: dict[str, list[float]] = {}
        weight = self.config.kl_to_base
        kl_masks = [_kl_rows(b) for b in batches] if weight else []
        kl_total = sum(int(m.sum()) for m in kl_masks)
        scale = self.world.size  # DDP averages the ranks' gradients; the loss is a global mean
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            kl_mask = kl_masks[i].to(self.device) if kl_total else None
            groups: dict[Any, tuple[float, int]] = {}
            last = i == len(batches) - 1
            with self._autocast(), distributed.no_sync(self.loss_model, skip=not last):
                out = self.loss_model(
                    input_ids=batch["input_ids"],
                    attention_mask=model_mask(batch),
                    position_ids=batch.get("position_ids"),
                    labels=batch["labels"],
                    chunk_size=self.config.loss_chunk_size,
                    verify_head=not self._head_checked,
                    keep_rows=kl_mask,
                    row_groups=batch.get("replay_tokens", batch.get("replay_rows")),
                    group_sums=groups,
                )
            loss_sum, count = out[0], out[1]
            extra = self._hook_terms("micro_batch_losses", set())  # read what this forward recorded
            kl = None
            if kl_mask is not None and int(kl_mask.sum()):
                kl = self._kl_to_base(batch, kl_mask, out[2])
            if count == 0 and kl is None:
                if self.world.enabled:  # every rank must backpropagate through DDP's forward
                    raise ValueError(
                        "a micro-batch without loss tokens under DDP; every sample needs a label"
                    )
                continue  # nothing to backpropagate in this micro-batch
            if count:
                self._head_checked = True
            value = float(loss_sum.detach())
            if not math.isfinite(value):
                raise FloatingPointError(self._diverged("the loss", value, step))
            share = count / loss_tokens
            loss = loss_sum / loss_tokens + share * sum(extra.values())
            if kl is not None:
                loss = loss + weight * kl / kl_total
                terms["kl_to_base"] = terms.get("kl_to_base", 0.0) + float(kl.detach()) / kl_total
            (loss * scale if scale > 1 else loss).backward()
            total += value
            for replayed, (part, n) in groups.items():
                sums = per_source.setdefault("replay" if replayed else "task", [0.0, 0])
                sums[0], sums[1] = sums[0] + part, sums[1] + n
            for name, term in extra.items():
                terms[name] = terms.get(name, 0.0) + share * float(term.detach())
        if "kl_to_base" in terms:  # logged as the mean KL per position; the loss adds weight x that
            terms["kl_to_base"] *= weight
        if self.world.enabled:  # what the log shows: sums over the ranks (the same keys on each)
            names = sorted(terms)
            sums = distributed.all_sum(
                [total, *(terms[n] for n in names)]
                + [per_source.get(src, [0.0, 0])[j] for src in ("task", "replay") for j in (0, 1)]
            )
            total, terms = sums[0], dict(zip(names, sums[1 : 1 + len(names)], strict=True))
            rest = sums[1 + len(names) :]
            per_source = {"task": [rest[0], rest[1]], "replay": [rest[2], rest[3]]}
        sources_mean = {}
        if self.replay is not None:
            sources_mean = {f"loss_{src}": s / c for src, (s, c) in per_source.items() if c}
        return total / loss_tokens, terms, sources_mean

    def _kl_to_base(self, batch: dict[str, Tensor], rows: Tensor, hidden_rows: Tensor) -> Tensor:
        """sum over `rows` of KL(base || model) for the next token; the base is the same model with
        its adapters switched off (no second copy in memory), run without gradient."""
        head, cap = output_head(self.model), softcap_of(self.model)
        with torch.no_grad(), disable_adapters(self.model), self._autocast():
            decoder = getattr(self.model, "base_model", self.model)
            hidden = decoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
            reference = reference_log_probs(head, hidden[rows], self.config.loss_chunk_size, cap)
        with self._autocast():
            return kl_to_reference(head, hidden_rows, reference, self.config.loss_chunk_size, cap)

    def _hook_terms(self, method: str, taken: set[str]) -> dict[str, Tensor]:
        """Every hook's `method(model)` terms by name; a name used twice, or one of the log's own
        fields, is refused."""
        terms: dict[str, Tensor] = {}
        for hook in self.hooks:
            fn = getattr(hook, method, None)
            for name, value in (fn(self.model) if fn else {}).items():
                if name in terms or name in taken or name in _RESERVED:
                    raise ValueError(
                        f"extra loss name {name!r} from {type(hook).__name__} is already used; "
                        f"names must be unique and not one of {sorted(_RESERVED)}"
                    )
                terms[name] = value
        return terms

    def _extra_losses(self, taken: set[str]) -> dict[str, float]:
        """Add the hooks' regularisers of the parameters once per optimizer step (not once per
        micro-batch); `taken`: the per-micro-batch terms' names."""
        terms = self._hook_terms("extra_losses", taken)
        total = sum(terms.values())
        if isinstance(total, Tensor) and total.requires_grad:
            # the same parameters on every rank give the same term: added locally, not averaged
            with distributed.no_sync(self.loss_model, skip=True):
                total.backward()
        return {name: float(value.detach()) for name, value in terms.items()}

    def _clip(self, step: int) -> float:
        max_norm = self.config.max_grad_norm or math.inf
        norm = float(fsdp.full(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), max_norm)))
        if not math.isfinite(norm):
            raise FloatingPointError(self._diverged("the gradient norm", norm, step))
        return norm

    def _after_step(
        self,
        record: dict[str, Any],
        progress: _Progress,
        order: SampleOrder,
        log: JsonlLog,
        bar: tqdm,
        evals: list[dict[str, float]],
    ) -> None:
        step, cfg = progress.step, self.config
        record["elapsed"] = progress.elapsed
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if self.eval_fn and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            with fsdp.gathered(self.loss_model) if self.fsdp else contextlib.nullcontext():
                if self.world.main:  # rank 0 evaluates; the others wait
                    evals.append(self._evaluate(step))
                    log.write(evals[-1])
                distributed.barrier()
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            if self.world.main or self.fsdp:  # under FSDP2 every rank joins the gathers
                self._save(progress, order)
            distributed.barrier()  # a checkpoint is whole before any rank goes on (or stops)

    def _finish(self, progress: _Progress, log: JsonlLog, evals: list) -> TrainResult:
        plot = plot_loss(read_log(log.path), self.output_dir / "loss.png") if self.world.main else None
        latest, _ = ckpt.latest_complete(self.checkpoint_root)
        return TrainResult(
            steps=progress.step,
            final_loss=progress.last_loss,
            skipped_batches=progress.skipped,
            elapsed_s=progress.elapsed,
            tokens_per_s=progress.tokens / max(progress.elapsed, 1e-9),
            log_path=log.path,
            plot_path=plot,
            checkpoint_dir=latest,
            evals=evals,
        )

    # ---- pieces --------------------------------------------------------------------------------

    def _stateful_hooks(self) -> list[Any]:
        """Hooks whose state travels in checkpoints: those with state_dict and load_state_dict."""
        return [h for h in self.hooks if hasattr(h, "state_dict") and hasattr(h, "load_state_dict")]

    def _call(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            fn = getattr(hook, method, None)
            if fn is not None:
                fn(self.model, *args)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _prepare_model(self) -> None:
        self.model.train()
        self._say(self._precision_line)
        self._say(self._rows_line)
        if self.config.fast_kernels:
            for line in prepare_for_training(
                self.model,
                self.amp_dtype,
                self.config.compile,
                passes=self.config.steps * self.config.accumulation_steps,
                allocator=self.config.allocator,
            ):
                self._say(line)
        if self.config.gradient_checkpointing:
            enable_activation_checkpointing(self.model)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Run eval_fn without touching the training RNG streams, so evaluating changes nothing."""
        python_rng = random.getstate()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=_cuda_devices()), torch.no_grad():
                result = self.eval_fn(self.model)
        finally:
            random.setstate(python_rng)
            self.model.train(was_training)
        values = result if isinstance(result, dict) else {"loss": result}
        record = {"step": step, **{f"eval_{k}": float(v) for k, v in values.items()}}
        self._say(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
        return record

    def _diverged(self, what: str, value: float, step: int) -> str:
        """Why training stops: the step, the last good checkpoint, and what to try."""
        latest, _ = ckpt.latest_complete(self.checkpoint_root)
        where = (
            f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written yet"
        )
        return (
            f"{what} is {value} at step {step + 1}: training diverged and stopped; {where}. Try a "
            "lower lr, keep max_grad_norm > 0, or precision='fp32' to rule out bf16 overflow"
        )

    # ---- checkpoints ---------------------------------------------------------------------------

    def _begin(self) -> tuple[_Progress, SampleOrder]:
        if self.config.resume:
            folder, partial = ckpt.latest_complete(self.checkpoint_root)
            for skipped in partial:
                self._say(f"ignoring incomplete checkpoint {skipped} (its save was interrupted)")
            if folder is not None:
                return self._restore(folder)
            self._say(f"resume=True but {self.checkpoint_root} has no checkpoint; starting fresh")
        else:
            ckpt.refuse_existing_run(self.checkpoint_root)
        random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)  # dropout; seeds CUDA generators too
        self.replay_order = self._replay_order({})
        return _Progress(), SampleOrder(len(self.samples), self.config.seed)

    def _replay_order(self, position: dict[str, int]) -> SampleOrder | None:
        if self.replay is None:
            return None
        return SampleOrder(len(self.replay.samples), self.config.seed, stream="replay", **position)

    def _shard(self) -> None:
        """FSDP2 (train/fsdp.py): shard, then the optimizer over the new (DTensor) parameters."""
        fsdp.shard(self.model, self.loss_model, self.device, self.world.size)
        self.trainable = dict(iter_trainable(self.model))
        groups = [
            {**group, "params": [self.trainable[n] for n in names]}
            for group, names in zip(self._groups, self.group_names, strict=True)
        ]
        self.optimizer = build_optimizer(groups, self.config, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.config)

    def _save(self, progress: _Progress, order: SampleOrder) -> None:
        # full tensors in the one-process format (under FSDP2 a gather every rank joins)
        weights = {n: fsdp.full(p.detach()) for n, p in self.trainable.items()}
        optimizer = fsdp.full_optimizer_state(self.optimizer) if self.fsdp else self.optimizer.state_dict()
        if not self.world.main:
            return
        state = {
            "format": 1,
            "step": progress.step,
            "progress": vars(progress).copy(),
            "position": order.position,
            "replay_position": self.replay_order.position if self.replay_order else None,
            "replay_data": fingerprint(self.replay.samples) if self.replay else None,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "config": self.config.to_dict(),
            "data": fingerprint(self.samples),
            "groups": self.group_names,
            "hooks": [h.state_dict() for h in self._stateful_hooks()],
            "run_options": self.run_options,
            "adapters": self.adapter_settings,
        }
        folder = ckpt.step_dir(self.checkpoint_root, progress.step)
        ckpt.save_checkpoint(folder, weights, state)
        ckpt.prune(self.checkpoint_root, self.config.keep_checkpoints)

    def _restore(self, folder: Path) -> tuple[_Progress, SampleOrder]:
        weights, state = ckpt.load_checkpoint(folder)
        self._check_same_run(state, folder)  # first: it names the option that changed
        ckpt.check_compatible(weights, {n: p.detach() for n, p in self.trainable.items()}, folder)
        if state["groups"] != self.group_names:
            raise ckpt.CheckpointError(
                f"checkpoint {folder} belongs to a different run: the optimizer parameter groups "
                "differ. Resume with the same settings, or start in a fresh output_dir"
            )
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(fsdp.local_like(weights[name], param))  # a shard under FSDP2
        if self.fsdp:
            fsdp.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for hook, hook_state in zip(self._stateful_hooks(), state["hooks"], strict=True):
            hook.load_state_dict(hook_state)
        _set_rng_state(state["rng"])
        self._say(f"resumed from {folder} at step {state['step']}")
        order = SampleOrder(len(self.samples), self.config.seed, **state["position"])
        self.replay_order = self._replay_order(state.get("replay_position") or {})
        return _Progress(**state["progress"]), order

    def _check_same_run(self, state: dict[str, Any], folder: Path) -> None:
        saved = state["config"]
        diffs = [
            f"{k}={saved.get(k)!r} there, {getattr(self.config, k)!r} here"
            for k in TRAJECTORY_FIELDS
            if saved.get(k) != getattr(self.config, k)
        ]
        diffs += _changed("", state.get("run_options"), self.run_options)
        diffs += _changed("adapter ", state.get("adapters"), self.adapter_settings)
        if state["data"] != fingerprint(self.samples):
            diffs.append("the training samples differ (token hash)")
        replay = fingerprint(self.replay.samples) if self.replay else None
        if state.get("replay_data") != replay:
            diffs.append("the replay samples differ (token hash, or replay on in one run only)")
        if len(state["hooks"]) != len(self._stateful_hooks()):
            diffs.append(f"{len(state['hooks'])} hooks with state there, {len(self._stateful_hooks())} here")
        if diffs:
            raise ckpt.CheckpointError(
                f"checkpoint {folder} belongs to a different run: "
                + "; ".join(diffs)
                + ". Resume with the same settings, or start in a fresh output_dir"
            )


# ---- helpers -----------------------------------------------------------------------------------


class _NoLog:
    """The log of ranks other than 0: rank 0 writes log.jsonl."""

    def __init__(self) -> None:
        self.kept: list[dict[str, Any]] = []
        self.mirrors: list[Any] = []
        self.path = None

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _changed(prefix: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """ "name=old there, new here" for every setting that differs (None: an older checkpoint that
    did not record them, which is not checked)."""
    if saved is None:
        return []
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    return [
        f"{prefix}{k}={flat_saved.get(k)!r} there, {flat_now.get(k)!r} here"
        for k in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(k) != flat_now.get(k)
    ]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"default": {"alpha": 32}} -> {"default.alpha": 32}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _group_names(groups: list[dict], trainable: dict[str, nn.Parameter]) -> list[list[str]]:
    """Names of each group's parameters; every trainable parameter must be in exactly one group."""
    name_of = {id(p): n for n, p in trainable.items()}
    names: list[list[str]] = []
    for group in groups:
        params = list(group["params"])
        group["params"] = params
        unknown = [p for p in params if id(p) not in name_of]
        if unknown:
            raise ValueError(
                f"a parameter group holds {len(unknown)} tensor(s) that are not trainable "
                "parameters of the model (requires_grad=False, or from another model)"
            )
        names.append([name_of[id(p)] for p in params])
    flat = [n for group in names for n in group]
    missing = sorted(set(trainable) - set(flat))
    twice = sorted({n for n in flat if flat.count(n) > 1})
    if missing or twice:
        raise ValueError(
            f"param_groups must hold every trainable parameter exactly once; missing: "
            f"{missing[:5]}, in several groups: {twice[:5]}"
        )
    return names


def _check_master_dtype(trainable: dict[str, nn.Parameter]) -> None:
    low = [f"{n} ({p.dtype})" for n, p in trainable.items() if p.dtype != torch.float32]
    if low:
        raise TypeError(
            f"trainable parameters must be fp32 master weights (bf16 comes from autocast); got "
            f"{', '.join(low[:5])}. Cast them with param.data = param.data.float() before training"
        )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing per decoder layer (transformers 5 name first, then the old one)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(
            "gradient_checkpointing=True needs a Hugging Face model with "
            f"activation_checkpointing_enable(); {type(model).__name__} has none. "
            "Set gradient_checkpointing=False"
        )
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    frozen = embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
    if frozen and hasattr(model, "enable_input_require_grads"):
        # with a frozen embedding, a reentrant checkpoint would see no input that needs grad
        model.enable_input_require_grads()


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _kl_rows(batch: dict[str, Tensor]) -> Tensor:
    """The (B, T) positions the KL-to-base term covers: every attended position of a replay row;
    in a task row the attended positions whose next token carries no loss (the prompt), so the
    task's own answers stay free to move."""
    attended = batch["attention_mask"].bool()
    no_loss = torch.ones_like(attended)
    no_loss[:, :-1] = batch["labels"][:, 1:] == IGNORE_INDEX
    replay = batch.get("replay_rows")
    if replay is not None:
        no_loss = no_loss | replay.to(no_loss.device)[:, None]
    return attended & no_loss


def iter_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters a checkpoint saves: `named_parameters()` with requires_grad."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def _rows_choice(model: nn.Module, collate: Collate, config: TrainConfig) -> tuple[bool, str]:
    """Whether micro-batches are laid out around their shared prefix, and the run's line saying so;
    an explicit request the run cannot honour (or packing it cannot) is an error."""
    wanted = config.share_prefix
    reason = _packing_problem(model, collate)
    if config.packing and reason:
        raise ValueError(f"--packing: {reason}")
    if wanted == "off":
        return False, "rows: " + (
            "packed" if config.packing else "one padded sample each"
        ) + " (--share-prefix off)"
    if reason is None:
        reason = bool_mask_problem(model)
    if reason is None and config.kl_to_base:
        reason = "--kl-to-base reads padded rows"
    if reason and wanted == "on":
        raise ValueError(f"--share-prefix: {reason}")
    if reason:
        return False, f"rows: one padded sample each (shared prefix off: {reason})"
    return True, (
        "rows: each micro-batch's shared prompt prefix computed once, the samples' rests attending to it "
        f"(--share-prefix {wanted}: the padded batch's loss and gradients from fewer tokens)"
    )


def _packing_problem(model: nn.Module, collate: Collate) -> str | None:
    """Why packed or shared-prefix rows would not train what padded rows train here, or None."""
    if not pads_only(collate):
        return "a custom collate function; packing builds its own rows from input_ids and labels"
    return adapters_row_problem(model)
