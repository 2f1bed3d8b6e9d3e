"""Mitigations of forgetting in the trainer: replay mixed into the batches (its share counted, its
loss logged apart, its stream position resumed exactly) and the KL-to-base term (zero while the
adapter is off, the gradient of the reference math written out here); the general-question probe's
scoring; bad --replay specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.core.model import disable_adapters
from lorakit.data.general import answer_contains, general_questions
from lorakit.run_data import parse_replay
from lorakit.train import Trainer
from lorakit.train.batching import Replay, default_collate

REPLAY_MARK = 2  # the first token of every replay sample (task samples start at 3 or above)


def _replay_samples(tiny, n: int = 10) -> list[dict]:
    samples = tiny.samples(n, seed=7)
    for s in samples:
        s["input_ids"][0] = REPLAY_MARK
    return samples


def _counting_collate(seen: list[list[int]]):
    def collate(samples, pad_id):
        seen.append([s["input_ids"][0] for s in samples])
        return default_collate(samples, pad_id)

    return collate


def _lora(tiny, seed: int = 0) -> torch.nn.Module:
    model = tiny.llama(seed)
    torch.manual_seed(seed)  # LoRA's A is drawn from the global generator: the same A in every run
    lk.apply(model, lk.LoRAConfig(rank=2, alpha=4))
    return model


@pytest.mark.parametrize("ratio", [0.25, 0.3])
def test_replay_share_is_counted_in_the_batches(tiny, make_config, ratio: float) -> None:
    seen: list[list[int]] = []
    config = make_config(steps=10, batch_size=8, micro_batch_size=4)
    Trainer(
        _lora(tiny),
        tiny.samples(24),
        config,
        _counting_collate(seen),
        replay=Replay(_replay_samples(tiny), ratio),
    ).train()
    firsts = [t for batch in seen for t in batch]
    assert len(firsts) == 10 * 8  # the batch size is unchanged
    replayed = sum(t == REPLAY_MARK for t in firsts)
    assert replayed == int(10 * 8 * ratio + 1e-9)  # 20 of 80, and 24 of 80 for 0.3
    # replay rides in the task's micro-batches: two forwards a step, as without replay, and some
    # micro-batches hold both sources (their loss is still reported per source, below)
    assert len(seen) == 10 * 2
    assert any(len({t == REPLAY_MARK for t in batch}) == 2 for batch in seen)


def test_losses_are_logged_per_source(tiny, make_config) -> None:
    config = make_config(steps=3, batch_size=8, micro_batch_size=4)
    Trainer(_lora(tiny), tiny.samples(24), config, replay=Replay(_replay_samples(tiny), 0.5)).train()
    records = [json.loads(line) for line in (Path(config.output_dir) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_task" in r]
    assert len(steps) == 3 and all("loss_replay" in r for r in steps)
    for r in steps:  # the step's loss is between the two sources' means (a token-weighted mean of them)
        low, high = sorted((r["loss_task"], r["loss_replay"]))
        assert low - 1e-6 <= r["task_loss"] <= high + 1e-6


def test_per_source_losses_of_a_mixed_micro_batch_are_each_sources_own(tiny) -> None:
    from lorakit.train.batching import micro_batches
    from lorakit.train.loss import chunked_causal_lm_loss

    model = _lora(tiny)
    task, replay = tiny.samples(6), _replay_samples(tiny, 4)
    (batch,) = micro_batches(task, list(range(6)), 10, default_collate, 0, (replay, list(range(4))))
    assert int(batch["replay_rows"].sum()) == 4
    sums: dict = {}
    total, count = chunked_causal_lm_loss(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], row_groups=batch["replay_rows"],
        group_sums=sums,
    )  # fmt: skip
    for is_replay, part in ((False, task), (True, replay)):  # each source alone, its own batch
        alone = default_collate(part, 0)
        expected, n = chunked_causal_lm_loss(
            model, alone["input_ids"], alone["attention_mask"], alone["labels"]
        )
        assert sums[is_replay][1] == n
        assert sums[is_replay][0] == pytest.approx(float(expected), rel=1e-5)
    assert float(total) == pytest.approx(sums[False][0] + sums[True][0], rel=1e-6)
    assert count == sums[False][1] + sums[True][1]


def test_resume_continues_the_replay_stream(tiny, make_config, tmp_path) -> None:
    def run(folder: Path, seen: list, resume: bool = False, hooks=None) -> torch.nn.Module:
        model = _lora(tiny)
        config = make_config(
            steps=6,
            batch_size=4,
            micro_batch_size=2,
            checkpoint_every=2,
            resume=resume,
            output_dir=str(folder),
        )
        replay = Replay(_replay_samples(tiny, 5), 0.5)  # 5 replay samples, 2 a step: epochs cross
        Trainer(model, tiny.samples(12), config, _counting_collate(seen), hooks=hooks, replay=replay).train()
        return model

    whole_seen: list = []
    whole = run(tmp_path / "whole", whole_seen)
    first_seen: list = []
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", first_seen, hooks=[tiny.Interrupt(after=3)])
    rest_seen: list = []
    resumed = run(tmp_path / "cut", rest_seen, resume=True)
    # steps 1-2 before the checkpoint, then (step 3 redone) 3-6: the same samples in the same order
    assert first_seen[:4] + rest_seen == whole_seen
    for (name, a), (_, b) in zip(tiny.params_of(whole).items(), tiny.params_of(resumed).items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resume_with_other_replay_data_is_refused(tiny, make_config, tmp_path) -> None:
    config = make_config(steps=2, checkpoint_every=2, output_dir=str(tmp_path / "r"))
    Trainer(_lora(tiny), tiny.samples(12), config, replay=Replay(_replay_samples(tiny), 0.5)).train()
    longer = make_config(steps=4, checkpoint_every=2, resume=True, output_dir=str(tmp_path / "r"))
    with pytest.raises(Exception, match="replay samples differ"):
        Trainer(_lora(tiny), tiny.samples(12), longer, replay=Replay(_replay_samples(tiny, 11), 0.5)).train()


def test_kl_to_base_is_zero_while_the_adapter_is_off(tiny, make_config) -> None:
    config = make_config(steps=1, kl_to_base=1.0)
    Trainer(_lora(tiny), tiny.samples(8), config).train()  # LoRA's B starts at zero: the model is the base
    (record,) = [json.loads(x) for x in (Path(config.output_dir) / "log.jsonl").read_text().splitlines()]
    assert abs(record["kl_to_base"]) < 1e-6


def test_kl_to_base_has_the_reference_gradient(tiny, make_config) -> None:
    """One accumulation of the trainer against the objective written out in full logits:
    mean CE over the loss tokens + W * mean over the non-loss positions of KL(base || model)."""
    weight = 0.7
    samples = tiny.samples(6, seed=3)

    def model_with_moved_adapter() -> torch.nn.Module:
        torch.manual_seed(5)  # LoRA's A is drawn from the global generator
        model = _lora(tiny)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        return model

    trainer_model = model_with_moved_adapter()
    trainer = Trainer(
        trainer_model, samples, make_config(steps=1, kl_to_base=weight, batch_size=6, micro_batch_size=3)
    )
    batches = [default_collate(samples[:3], 0), default_collate(samples[3:], 0)]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    _, terms, _ = trainer._accumulate(batches, tokens, 0)
    got = {n: p.grad.clone() for n, p in trainer_model.named_parameters() if p.requires_grad}

    model = model_with_moved_adapter()
    ce, kl, rows = 0.0, 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        with torch.no_grad(), disable_adapters(model):
            base = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        targets = b["labels"][:, 1:]
        ce = ce + F.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100], reduction="sum")
        positions = b["attention_mask"].bool().clone()
        positions[:, :-1] &= targets == -100  # no loss on the next token; the last position has none
        log_p, log_b = F.log_softmax(logits[positions], -1), F.log_softmax(base[positions], -1)
        kl = kl + (log_b.exp() * (log_b - log_p)).sum()
        rows += int(positions.sum())
    (ce / tokens + weight * kl / rows).backward()
    assert terms["kl_to_base"] == pytest.approx(weight * float(kl.detach()) / rows, rel=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch:0.3", "neither a built-in source"),
        ("chatterbot:1.0", r"in \[0, 1\)"),
        ("chatterbot:-0.1", r"in \[0, 1\)"),
        ("chatterbot", "SOURCE:RATIO"),
        ("chatterbot:lots", "SOURCE:RATIO"),
    ],
)
def test_bad_replay_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_replay(spec)


def test_replay_from_a_file(tmp_path) -> None:
    data = tmp_path / "general.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n')
    assert parse_replay(f"{data}:0.2") == (str(data), 0.2)


def test_general_question_probe() -> None:
    assert answer_contains("It is the Andromeda galaxy, about 2.5 million ly away.", "The Andromeda Galaxy.")
    assert answer_contains("A.A. Milne wrote them", "A. A. Milne")
    assert not answer_contains("Venusian", "Venus")  # whole words only
    assert not answer_contains("anything", "  ")
    first = general_questions(5)
    assert len(first) == 5 and first == general_questions(5)
    assert general_questions(260)[:5] == first and general_questions(0) == []


def test_replay_is_on_by_default_and_none_switches_it_off() -> None:
    from lorakit.options import RunConfig
    from lorakit.run_data import read_replay

    conversations, ratio = read_replay(RunConfig())
    assert ratio == 0.125 and len(conversations) == 488  # chatterbot's English chat, trivia excluded
    assert read_replay(RunConfig(replay="none")) is None and read_replay(RunConfig(replay="OFF")) is None
