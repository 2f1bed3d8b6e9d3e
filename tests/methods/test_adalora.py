"""AdaLoRA against reference math written here, its rank budget through the trainer, the error
when the budget is never reallocated, and PEFT interop in both directions."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.methods import METHODS, config_from_peft
from lorakit.methods.adalora import AdaLoRAConfig, AdaLoRADelta
from lorakit.methods.adalora_budget import AdaLoRAScheduleError, RankAllocator, Schedule
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer

VOCAB = 61


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(12, 10)
        self.down = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _samples(n: int = 16) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(12)]
        out.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    return out


def _train(tmp_path, config: AdaLoRAConfig, steps: int = 12, **overrides) -> tuple[nn.Module, Trainer]:
    model = tiny_llama(vocab_size=VOCAB)
    torch.manual_seed(0)  # A and B are drawn from the global generator
    lk.apply(model, config)
    values = dict(
        steps=steps,
        batch_size=4,
        micro_batch_size=4,
        lr=1e-2,
        precision="fp32",
        checkpoint_every=0,
        progress_bar=False,
        output_dir=str(tmp_path / "run"),
    )
    trainer = Trainer(model, _samples(), TrainConfig(**{**values, **overrides}))
    trainer.train()
    return model.eval(), trainer


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def test_forward_is_b_times_a_times_e_scaled_by_alpha_over_init_rank() -> None:
    model = TwoLinear()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    base = model(x)
    lk.apply(model, AdaLoRAConfig(target_rank=2, init_rank=3, alpha=5, target_modules=["up"]))
    delta = model.up.adapters["default"]
    assert torch.equal(delta.lora_E, torch.zeros(3, 1))
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)
    with torch.no_grad():
        delta.lora_E.copy_(torch.tensor([[0.5], [-1.0], [2.0]]))
    A, E, B = delta.lora_A, delta.lora_E, delta.lora_B
    up = model.up.base_layer
    h = x @ (up.weight + (5 / 3) * B @ torch.diag(E.view(-1)) @ A).T + up.bias  # P diag(lambda) Q
    expected = model.down(torch.relu(h))
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_init_matches_the_authors_and_peft() -> None:
    torch.manual_seed(0)
    delta = AdaLoRADelta(lk.AdaptedLayer(nn.Linear(256, 256)), tuple(range(64)), 64, 1.0, 0.0)
    for p in (delta.lora_A, delta.lora_B):
        assert abs(float(p.detach().std()) - 0.02) < 0.001 and abs(float(p.detach().mean())) < 0.001


def test_defaults_follow_the_target_rank_and_the_run_length() -> None:
    assert AdaLoRAConfig().init_rank == 12 and AdaLoRAConfig(target_rank=16).init_rank == 24
    schedule = Schedule.resolve(AdaLoRAConfig(), 150)
    assert (schedule.t_init, schedule.t_final, schedule.delta_t, schedule.final_step) == (15, 45, 5, 105)
    assert Schedule.resolve(AdaLoRAConfig(), 4) == Schedule(4, 1, 1, 1)
    with pytest.raises(AdaLoRAScheduleError, match="no step to reallocate"):
        Schedule.resolve(AdaLoRAConfig(t_init=5, t_final=5), 10)
    with pytest.raises(ValueError, match="target_rank <= init_rank"):
        AdaLoRAConfig(target_rank=8, init_rank=4)


def test_budget_is_the_papers_cubic() -> None:
    s = Schedule(total=100, t_init=10, t_final=20, delta_t=1)
    b0, bT = 300, 100
    for t in (0, 10, 11, 30, 50, 79, 80, 100):
        if t <= 10:
            want = b0
        elif t >= 80:
            want = bT
        else:
            want = int(bT + (b0 - bT) * (1 - (t - 10) / (100 - 10 - 20)) ** 3)
        assert s.budget(t, b0, bT) == want, t
    assert s.budget(45, b0, bT) == 125  # 100 + 200 * 0.5^3


def test_importance_scores_and_global_threshold_follow_the_formulas() -> None:
    model = TwoLinear()
    config = AdaLoRAConfig(target_rank=2, init_rank=3, beta1=0.7, beta2=0.6, target_modules=["up", "down"])
    lk.apply(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    allocator = RankAllocator(config, model, "default")
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(4))
    grads_seen = []
    for step in range(2):
        model.zero_grad()
        model(x * (step + 1)).square().mean().backward()
        grads_seen.append(
            {
                n: (p.detach().clone(), p.grad.clone())
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
        allocator.on_after_backward(model, step)
    expected = {}
    for name in grads_seen[0]:
        ema = unc = 0
        for seen in grads_seen:
            w, g = seen[name]
            ipt = (w * g).abs()
            ema = 0.7 * ema + 0.3 * ipt
            unc = 0.6 * unc + 0.4 * (ipt - ema).abs()
        expected[name] = ema * unc
    scores = allocator.scores()
    for layer in ("up", "down"):
        s = {k: expected[f"{layer}.adapters.default.{k}"] for k in ("lora_A", "lora_E", "lora_B")}
        want = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        torch.testing.assert_close(scores[layer], want)
    allocator.reallocate(3)  # keep the 3 best of 6 triplets over both layers
    everything = torch.cat([scores["up"], scores["down"]])
    best = set(everything.topk(3).indices.tolist())
    kept = [
        i
        for i, k in enumerate(
            model.up.adapters["default"].mask.tolist() + model.down.adapters["default"].mask.tolist()
        )
        if k
    ]
    assert set(kept) == best
    for layer in (model.up, model.down):
        delta = layer.adapters["default"]
        assert torch.all(delta.lora_E[~delta.mask] == 0) and torch.all(delta.lora_E[delta.mask] != 0)


def test_orthogonality_penalty_is_gamma_times_mean_frobenius_norm() -> None:
    model = TwoLinear()
    config = AdaLoRAConfig(target_rank=2, init_rank=3, orth_reg_weight=0.3, target_modules=["up", "down"])
    lk.apply(model, config)
    [hook] = lk.training_hooks(model)
    norms = []
    for layer in (model.up, model.down):
        d = layer.adapters["default"]
        norms.append(((d.lora_A @ d.lora_A.T - torch.eye(3)) ** 2).sum().sqrt())
        norms.append(((d.lora_B.T @ d.lora_B - torch.eye(3)) ** 2).sum().sqrt())
    torch.testing.assert_close(hook.extra_losses(model)["adalora_orth"], 0.3 * torch.stack(norms).mean())
    config0 = AdaLoRAConfig(target_rank=2, init_rank=3, orth_reg_weight=0.0, target_modules=["up"])
    assert RankAllocator(config0, lk.apply(TwoLinear(), config0), "default").extra_losses(model) == {}


def test_trainer_reallocates_down_to_the_target_budget(tmp_path) -> None:
    model, trainer = _train(tmp_path, AdaLoRAConfig(target_rank=2, init_rank=4, alpha=8))
    [allocator] = trainer.hooks
    ranks = allocator.ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # moved, not uniform
    assert allocator.reallocations >= 2 and allocator.fixed
    for _, layer in _layers(model):
        delta = layer.adapters["default"]
        assert torch.all(delta.lora_E[~delta.mask] == 0)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(rec["adalora_orth"] > 0 for rec in log if "loss" in rec)
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["total_step"] == 12 and saved["peft_type"] == "ADALORA"
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks


def _layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lk.AdaptedLayer)]


def test_a_run_that_never_reaches_its_final_allocation_is_an_error(tmp_path) -> None:
    with pytest.raises(AdaLoRAScheduleError, match="configured for total_steps=100"):
        _train(tmp_path / "a", AdaLoRAConfig(target_rank=2, init_rank=4, total_steps=100), steps=3)
    with pytest.raises(AdaLoRAScheduleError, match="no step to reallocate"):
        _train(tmp_path / "b", AdaLoRAConfig(target_rank=2, init_rank=4, t_init=2, t_final=2), steps=3)
    model = TwoLinear()
    lk.apply(model, AdaLoRAConfig(target_rank=2, init_rank=3, target_modules=["up"]))
    [hook] = lk.training_hooks(model)  # a hand-written loop that forgets the per-step hooks
    with pytest.raises(AdaLoRAScheduleError, match="never reached its final rank allocation"):
        hook.on_train_end(model, 10)


def test_resume_gives_the_same_ranks_and_weights(tmp_path) -> None:
    config = dict(target_rank=2, init_rank=4, alpha=8)
    straight, _ = _train(tmp_path / "a", AdaLoRAConfig(**config), steps=10)

    class Stop:
        def on_step_end(self, model, step, total_steps):
            if step == 5:
                raise KeyboardInterrupt

    model = tiny_llama(vocab_size=VOCAB)
    torch.manual_seed(0)
    lk.apply(model, AdaLoRAConfig(**config))
    run = dict(steps=10, batch_size=4, micro_batch_size=4, lr=1e-2, precision="fp32", progress_bar=False)
    run.update(checkpoint_every=3, output_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, _samples(), TrainConfig(**run), hooks=[*lk.training_hooks(model), Stop()]).train()
    model = tiny_llama(vocab_size=VOCAB)
    torch.manual_seed(0)
    lk.apply(model, AdaLoRAConfig(**config))
    Trainer(model, _samples(), TrainConfig(**run, resume=True)).train()
    for (_, a), (_, b) in zip(_layers(straight), _layers(model), strict=True):
        da, db = a.adapters["default"], b.adapters["default"]
        assert torch.equal(da.mask, db.mask)
        torch.testing.assert_close(db.lora_E, da.lora_E, atol=1e-6, rtol=0)


def test_run_options_map_to_the_config() -> None:
    from lorakit.options import RunConfig, method_config

    assert METHODS["adalora"] is AdaLoRAConfig
    default = method_config(RunConfig(method="adalora"))
    assert (default.target_rank, default.init_rank, default.alpha) == (16, 24, 32.0)  # LoRA's budget
    custom = method_config(
        RunConfig(
            method="adalora", init_rank=20, target_rank=8, t_init=3, orth_reg_weight=0.5, adalora_beta2=0.9
        )
    )
    assert (custom.init_rank, custom.target_rank, custom.t_init) == (20, 8, 3)
    assert (custom.orth_reg_weight, custom.beta2, custom.t_final) == (0.5, 0.9, None)
    from lorakit.cli import _options, _run_fields, build_parser
    from lorakit.options import split_options

    flags = ["train", "--method", "adalora", "--init-rank", "20", "--t-final", "0", "--adalora-beta1", "0.8"]
    run, _ = split_options(_options(build_parser().parse_args(flags), _run_fields()))
    parsed = method_config(run)
    assert (parsed.init_rank, parsed.t_final, parsed.beta1, parsed.target_rank) == (20, 0, 0.8, 16)


def test_lorakit_folder_loads_in_peft_with_its_rank_pattern(tmp_path, peft_logits) -> None:
    model, _ = _train(tmp_path, AdaLoRAConfig(target_rank=1, init_rank=3, alpha=8))
    assert 0 in {layer.adapters["default"].rank() for _, layer in _layers(model)}  # a layer lost all
    ids = _ids()
    expected = model(ids).logits
    folder = lk.save_adapter(model, tmp_path / "adapter")[0]
    torch.testing.assert_close(
        peft_logits(lambda: tiny_llama(vocab_size=VOCAB), folder, ids), expected, atol=1e-5, rtol=0
    )
    fresh = tiny_llama(vocab_size=VOCAB).eval()
    lk.load_adapter(fresh, folder)
    torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-6, rtol=0)
    again = lk.save_adapter(fresh, tmp_path / "again")[0]  # a loaded pattern is saved as it came
    assert (
        json.loads((again / "adapter_config.json").read_text())["rank_pattern"]
        == json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    )


def test_peft_trained_adalora_loads_in_lorakit(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=3,
        deltaT=1,
        total_step=8,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(vocab_size=VOCAB), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    for step in range(8):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    ours = tiny_llama(vocab_size=VOCAB).eval()
    loaded = lk.load_adapter(ours, tmp_path)
    assert isinstance(loaded, AdaLoRAConfig) and isinstance(
        config_from_peft(json.loads((tmp_path / "adapter_config.json").read_text())), AdaLoRAConfig
    )
    ranks = {path: layer.adapters["default"].rank() for path, layer in _layers(ours)}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
