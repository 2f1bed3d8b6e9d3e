"""The training loop: token-weighted accumulation, determinism, hooks, precision, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.train import Trainer
from lorakit.train.batching import default_collate, loss_token_count, micro_batches
from lorakit.train.metrics import eval_curves


class GradCatcher:
    """Records the gradients of the first accumulated batch, before clipping."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_after_backward(self, model, step):
        if step == 0:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def first_step_grads(tiny, make_config, samples, **overrides) -> dict[str, torch.Tensor]:
    catcher = GradCatcher()
    config = make_config(steps=1, max_grad_norm=0.0, **overrides)
    Trainer(tiny.llama(), samples, config, hooks=[catcher]).train()
    return catcher.grads


def test_accumulation_equals_one_big_batch(tiny, make_config, tmp_path) -> None:
    samples = tiny.samples(8, seed=3)
    k_micro = first_step_grads(tiny, make_config, samples, batch_size=8, micro_batch_size=2)
    one = first_step_grads(
        tiny, make_config, samples, batch_size=8, micro_batch_size=8, output_dir=str(tmp_path / "b")
    )
    for name in one:
        torch.testing.assert_close(k_micro[name], one[name], rtol=0, atol=1e-6)

    # the test has teeth: the micro-batches have uneven loss-token counts, so a mean of
    # per-micro-batch means would give another gradient
    batches = micro_batches(samples, list(range(8)), 2, default_collate, 0)
    counts = [loss_token_count(b["labels"]) for b in batches]
    assert len(set(counts)) > 1


def test_same_seed_same_run_other_seed_other_run(tiny, make_config, tmp_path) -> None:
    def run(seed: int, folder: str) -> dict[str, torch.Tensor]:
        model = tiny.gpt2(dropout=0.1)  # dropout makes the RNG matter
        config = make_config(seed=seed, output_dir=str(tmp_path / folder))
        Trainer(model, tiny.samples(10), config).train()
        return tiny.params_of(model)

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_batch_without_loss_tokens_is_skipped_and_counted(tiny, make_config) -> None:
    empty = [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4} for _ in range(4)]
    samples = empty + tiny.samples(4)
    config = make_config(steps=6, batch_size=2, micro_batch_size=1)
    model = tiny.llama()
    result = Trainer(model, samples, config).train()
    assert result.steps == 6 and result.skipped_batches > 0
    assert math.isfinite(result.final_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_samples_without_any_loss_token_are_refused(tiny, make_config) -> None:
    empty = [{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}]
    with pytest.raises(ValueError, match="nothing to learn"):
        Trainer(tiny.llama(), empty, make_config())


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step_start(self, model, step):
        self.calls.append(("start", step))

    def extra_losses(self, model):
        self.calls.append(("extra",))
        return {}

    def on_after_backward(self, model, step):
        has_grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        self.calls.append(("after_backward", step, has_grads))

    def on_step_end(self, model, step, total_steps):
        self.calls.append(("end", step, total_steps))

    def on_train_end(self, model, total_steps):
        self.calls.append(("train_end", total_steps))


class OnlyEnd:
    """A hook with one method: the trainer must call only what is present."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, model, step, total_steps):
        self.steps.append(step)


def test_hooks_are_called_in_order_with_their_arguments(tiny, make_config) -> None:
    recorder, partial = Recorder(), OnlyEnd()
    Trainer(tiny.llama(), tiny.samples(8), make_config(steps=2), hooks=[recorder, partial]).train()
    expected = []
    for step in range(2):
        expected += [("start", step), ("extra",), ("after_backward", step, True), ("end", step, 2)]
    assert recorder.calls == expected + [("train_end", 2)]
    assert partial.steps == [0, 1]


class L2Penalty:
    """An extra loss c * sum(w^2) on one weight: its gradient 2cw must reach that weight."""

    def __init__(self, name: str, c: float) -> None:
        self.name, self.c = name, c

    def extra_losses(self, model):
        weight = dict(model.named_parameters())[self.name]
        return {"l2": self.c * weight.pow(2).sum()}


def test_extra_losses_are_added_to_the_loss_and_logged(tiny, make_config, tmp_path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    samples = tiny.samples(8)
    plain = first_step_grads(tiny, make_config, samples, output_dir=str(tmp_path / "plain"))

    catcher, penalty = GradCatcher(), L2Penalty(name, c=0.5)
    config = make_config(steps=1, max_grad_norm=0.0, output_dir=str(tmp_path / "l2"))
    model = tiny.llama()
    weight = dict(model.named_parameters())[name].detach().clone()
    result = Trainer(model, samples, config, hooks=[penalty, catcher]).train()

    torch.testing.assert_close(catcher.grads[name], plain[name] + 2 * 0.5 * weight)
    record = json.loads(result.log_path.read_text().splitlines()[0])
    assert record["l2"] == pytest.approx(0.5 * float(weight.pow(2).sum()), rel=1e-5)
    assert record["loss"] == pytest.approx(record["task_loss"] + record["l2"])


class ActivationPenalty:
    """A per-micro-batch term c * mean(h^2) of layer 0's MLP output h, recorded by a forward hook:
    it depends on the forward's graph, so it must be added before that micro-batch's backward."""

    def __init__(self, model: torch.nn.Module, c: float) -> None:
        self.c, self.seen = c, None
        model.model.layers[0].mlp.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self.seen = output.pow(2).mean()

    def micro_batch_losses(self, model):
        seen, self.seen = self.seen, None
        return {"act": self.c * seen}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batch_losses_are_weighted_like_the_task_loss_and_logged(
    tiny, make_config, tmp_path, checkpointing
) -> None:
    from lorakit.train.loss import chunked_causal_lm_loss

    samples, c = tiny.samples(6, seed=5), 0.7
    model = tiny.llama()
    catcher, penalty = GradCatcher(), ActivationPenalty(model, c)
    config = make_config(
        steps=1, batch_size=6, micro_batch_size=1, max_grad_norm=0.0, gradient_checkpointing=checkpointing
    )
    result = Trainer(model, samples, config, hooks=[penalty, catcher]).train()

    reference = tiny.llama()  # by hand: sum_i loss_i / N + sum_i (n_i / N) c mean(h_i^2)
    recorded = ActivationPenalty(reference, c)
    total_tokens = sum(loss_token_count(torch.tensor([s["labels"]])) for s in samples)
    task, act, objective = 0.0, 0.0, 0.0
    for sample in samples:
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
        loss_sum, count = chunked_causal_lm_loss(reference, ids, torch.ones_like(ids), labels)
        share = count / total_tokens
        term = recorded.micro_batch_losses(reference)["act"]
        objective = objective + loss_sum / total_tokens + share * term
        task, act = task + float(loss_sum.detach()) / total_tokens, act + share * float(term.detach())
    objective.backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(catcher.grads[name], param.grad, rtol=1e-5, atol=1e-6)
    record = json.loads(result.log_path.read_text().splitlines()[0])
    assert record["act"] == pytest.approx(act, rel=1e-5) and record["task_loss"] == pytest.approx(
        task, rel=1e-5
    )
    assert record["loss"] == pytest.approx(task + act, rel=1e-5)


class Clash:
    def micro_batch_losses(self, model):
        return {"x": torch.zeros(())}

    def extra_losses(self, model):
        return {"x": torch.zeros(())}


def test_a_loss_name_used_twice_is_refused(tiny, make_config) -> None:
    with pytest.raises(ValueError, match="'x' from Clash is already used"):
        Trainer(tiny.llama(), tiny.samples(4), make_config(steps=1), hooks=[Clash()]).train()


def test_bf16_autocast_on_cpu_keeps_fp32_master_weights(tiny, make_config) -> None:
    model = tiny.llama()
    tiny.freeze_all_but(model, "q_proj", "v_proj")
    before = tiny.params_of(model)
    trainer = Trainer(model, tiny.samples(8), make_config(precision="bf16"))
    assert trainer.amp_dtype == torch.bfloat16
    result = trainer.train()
    assert math.isfinite(result.final_loss)
    frozen_linears = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32
            assert not torch.equal(param, before[name])  # it trained
        elif name.endswith("proj.weight"):  # frozen linear weights are stored in bf16 (train.fast)
            assert param.dtype == torch.bfloat16
            frozen_linears += 1
        else:  # embeddings (the tied head) and norms keep fp32
            assert param.dtype == torch.float32
    assert frozen_linears > 0
    state = trainer.optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_bf16_trainable_parameters_are_refused(tiny, make_config) -> None:
    model = tiny.llama()
    model.lm_head.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"lm_head.weight \(torch.bfloat16\)"):
        Trainer(model, tiny.samples(4), make_config())


def test_gradient_checkpointing_with_a_frozen_embedding_gives_the_same_gradients(
    tiny, make_config, tmp_path
) -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny.llama()
        tiny.freeze_all_but(model, "q_proj", "down_proj")
        catcher = GradCatcher()
        config = make_config(
            steps=1, gradient_checkpointing=checkpointing, output_dir=str(tmp_path / str(checkpointing))
        )
        Trainer(model, tiny.samples(8), config, hooks=[catcher]).train()
        assert model.is_activation_checkpointing == checkpointing
        return catcher.grads

    plain, recomputed = grads(False), grads(True)
    assert plain and plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_param_groups_must_cover_every_trainable_parameter(tiny, make_config) -> None:
    model = tiny.llama()
    groups = [{"params": [model.lm_head.weight], "lr": 1e-3}]
    with pytest.raises(ValueError, match="missing: .*model.embed_tokens.weight"):
        Trainer(model, tiny.samples(4), make_config(), param_groups=groups)


def test_param_groups_keep_their_own_learning_rates(tiny, make_config) -> None:
    model = tiny.llama()
    tiny.freeze_all_but(model, "q_proj", "k_proj")
    q = [p for n, p in model.named_parameters() if "q_proj" in n]
    k = [p for n, p in model.named_parameters() if "k_proj" in n]
    groups = [{"params": q, "lr": 0.01}, {"params": k, "lr": 0.16}]
    trainer = Trainer(model, tiny.samples(8), make_config(warmup_ratio=0.0), param_groups=groups)
    trainer.train()
    peak = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    assert peak == [0.01, 0.16]


def test_log_plot_and_result(tiny, make_config) -> None:
    evals = []

    def eval_fn(model) -> dict[str, float]:
        evals.append(model.training)
        return {"loss": 1.5, "exact_match": 0.25}

    config = make_config(steps=4, eval_every=2, checkpoint_every=2)
    result = Trainer(tiny.llama(), tiny.samples(8), config, eval_fn=eval_fn).train()
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    steps = [r for r in records if "task_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed", "loss_tokens"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert eval_curves(records) == {
        "eval_loss": [(2, 1.5), (4, 1.5)],
        "eval_exact_match": [(2, 0.25), (4, 0.25)],
    }
    assert evals == [False, False]  # evaluated in eval mode
    assert result.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert result.steps == 4 and result.final_loss == steps[-1]["loss"]
    assert result.tokens_per_s > 0 and result.elapsed_s > 0
    assert [e["step"] for e in result.evals] == [2, 4]
    assert result.checkpoint_dir.name == "step-000004"


def test_tensorboard_gets_the_same_scalars_as_log_jsonl(tiny, make_config, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(steps=3, report_to="tensorboard", output_dir=str(tmp_path / "tb"))
    result = Trainer(tiny.llama(), tiny.samples(8), config, eval_fn=lambda m: {"answer_nll": 1.5}).train()
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == losses
    assert [e.value for e in events.Scalars("eval/answer_nll")] == [1.5]


def test_tensorboard_missing_is_a_clear_error_before_training(make_config, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ValueError, match="needs the tensorboard package: pip install tensorboard"):
        make_config(report_to="tensorboard")
    with pytest.raises(ValueError, match="report_to='wandb'; expected one of none, tensorboard"):
        make_config(report_to="wandb")
