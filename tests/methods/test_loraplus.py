"""LoRA+: role B trains at lr * ratio, role A at lr, others at an explicit documented rate."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.cli import _options, _run_fields, build_parser
from lorakit.models import tiny_llama
from lorakit.options import method_config, optimizer_groups, split_options


def _model() -> torch.nn.Module:
    model = tiny_llama(bias=True)
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def _lrs_by_param(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_b_gets_ratio_times_lr_and_a_gets_lr() -> None:
    model = _model()
    lrs = _lrs_by_param(lk.loraplus_optimizer(model, lr=1e-4, ratio=16).param_groups)
    for m in model.modules():
        if isinstance(m, lk.Delta):
            assert lrs[id(m.lora_A)] == pytest.approx(1e-4)
            assert lrs[id(m.lora_B)] == pytest.approx(1.6e-3)
    assert set(lrs) == {id(p) for p in model.parameters() if p.requires_grad}


def test_one_step_equals_adamw_with_hand_built_groups() -> None:
    ours, ref = _model(), _model()
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    opt = lk.loraplus_optimizer(ours, lr=1e-3, ratio=8)
    a = [p for n, p in ref.named_parameters() if n.endswith("lora_A")]
    b = [p for n, p in ref.named_parameters() if n.endswith("lora_B")]
    ref_opt = torch.optim.AdamW(
        [{"params": a, "lr": 1e-3}, {"params": b, "lr": 8e-3}], lr=1e-3, weight_decay=0.0
    )
    for model, optimizer in ((ours, opt), (ref, ref_opt)):
        for _ in range(2):
            model(ids).logits.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def test_rates_match_peft_create_loraplus_optimizer() -> None:
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    peft_rates = sorted({g["lr"] for g in theirs.param_groups if g["params"]})
    ours = lk.loraplus_optimizer(_model(), lr=2e-4, ratio=16)
    assert sorted({g["lr"] for g in ours.param_groups}) == pytest.approx(peft_rates)


def test_needs_b_roles() -> None:
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="role B"):
        lk.loraplus_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="positive"):
        lk.loraplus_lr_ratios(0)


def _run(argv: list[str]):
    return split_options(_options(build_parser().parse_args(["train", *argv]), _run_fields()))


@pytest.mark.parametrize(
    ("argv", "b_ratio"),
    [
        (["--method", "loraplus"], 16.0),
        (["--method", "loraplus", "--loraplus-ratio", "4"], 4.0),
        (["--method", "lora", "--loraplus-ratio", "8"], 8.0),
        (["--method", "lora"], 1.0),
    ],
)
def test_command_line_selects_the_rates(argv: list[str], b_ratio: float) -> None:
    run, train = _run([*argv, "--lr", "1e-3", "--rank", "4", "--target-modules", "q_proj"])
    model = tiny_llama()
    config = method_config(run)
    lk.apply(model, config)
    lrs = {g["role"]: g["lr"] for g in optimizer_groups(model, config, run, train)}
    assert lrs["A"] == pytest.approx(1e-3) and lrs["B"] == pytest.approx(1e-3 * b_ratio)
