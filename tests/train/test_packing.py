"""Packing (issue 26): several samples per row, attention kept within each and positions restarting.
The reference is each sample run alone, unpadded, with the loss written out here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.train import Trainer
from lorakit.train.batching import Replay, micro_batches, pack, packed_collate


def test_first_fit_decreasing_rows() -> None:
    lengths = [5, 9, 3, 7, 2, 12, 4]
    rows = pack(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == pack(lengths, 12)  # deterministic
    assert len(rows) == 4  # 42 tokens, rows of 12: [12] [9 3] [7 5] [4 2]
    assert pack([20, 3], 8) == [[0], [1]]  # a sample longer than the row length is never split


def test_the_packed_layout(tiny) -> None:
    samples = tiny.samples(5, seed=3)
    batch = packed_collate(samples, pad_id=0, capacity=32)
    rows = pack([len(s["input_ids"]) for s in samples], 32)
    assert batch["input_ids"].shape[0] == len(rows) < len(samples)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            assert batch["input_ids"][r, at : at + n].tolist() == samples[i]["input_ids"]
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            assert batch["labels"][r, at] == -100  # not predicted from the previous sample
            assert batch["labels"][r, at + 1 : at + n].tolist() == samples[i]["labels"][1:]
            at += n
        assert int(batch["attention_mask"][r].sum()) == at


def _alone_losses(model, samples) -> list[torch.Tensor]:
    """Each sample's summed next-token CE over its labels, the sample run by itself."""
    out = []
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        out.append(F.cross_entropy(logits, torch.tensor(s["labels"][1:]), ignore_index=-100, reduction="sum"))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager", "lorakit"])
def test_each_sample_in_a_packed_row_scores_as_it_does_alone(tiny, attention: str) -> None:
    from lorakit.train.attention import register

    model = tiny.llama()
    model.set_attn_implementation(register() if attention == "lorakit" else attention)
    for p in model.parameters():
        p.requires_grad_(True)  # the lorakit kernel runs where gradients flow
    samples = tiny.samples(6, seed=1)
    batch = packed_collate(samples, pad_id=0, capacity=40)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    alone = _alone_losses(model, samples)
    rows = pack([len(s["input_ids"]) for s in samples], 40)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            labels = batch["labels"][r, at + 1 : at + n]
            packed = F.cross_entropy(logits[r, at : at + n - 1], labels, ignore_index=-100, reduction="sum")
            torch.testing.assert_close(packed, alone[i], rtol=1e-5, atol=1e-5)
            at += n


def test_attention_never_crosses_a_sample_boundary(tiny) -> None:
    model = tiny.llama()
    samples = tiny.samples(2, seed=4, min_len=8, max_len=8)
    batch = packed_collate(samples, pad_id=0, capacity=16)
    assert batch["input_ids"].shape == (1, 16)
    changed = batch["input_ids"].clone()
    changed[0, :8] = (changed[0, :8] + 7) % tiny.VOCAB  # the first sample, entirely
    before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    after = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(after[0, 8:], before[0, 8:], rtol=0, atol=1e-6)
    assert (after[0, :8] - before[0, :8]).abs().max() > 1e-3


def test_replay_rows_stay_apart(tiny) -> None:
    samples, general = tiny.samples(6, seed=2), tiny.samples(3, seed=9)
    batches = micro_batches(samples, list(range(6)), 9, None, 0, (general, [0, 1, 2]), packing=64)
    (batch,) = batches
    assert batch["replay_rows"].tolist() == [False, True]  # 6 task samples in one row, 3 replay in another
    assert int(batch["attention_mask"].sum()) == sum(len(s["input_ids"]) for s in samples + general)


def test_training_packed_equals_training_padded(tiny, make_config) -> None:
    """The same samples, steps and micro-batches: the same losses and weights, replay included."""
    results = []
    for packing in (0, 64):
        model = tiny.llama()
        torch.manual_seed(0)  # LoRA's A
        lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
        replay = Replay(tiny.samples(8, seed=5), 0.25)
        config = make_config(packing=packing, steps=3, batch_size=8, micro_batch_size=4,
                             output_dir=str(make_config().output_dir) + f"-{packing}")  # fmt: skip
        result = Trainer(model, tiny.samples(24, seed=6), config, replay=replay).train()
        log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
        results.append((log, tiny.params_of(model)))
    (padded_log, padded), (packed_log, packed) = results
    for a, b in zip(padded_log, packed_log, strict=True):
        assert a["loss_tokens"] == b["loss_tokens"] and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss_replay"] == pytest.approx(b["loss_replay"], rel=1e-5)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6)


def test_packing_is_refused_where_it_would_train_something_else(tiny, make_config) -> None:
    model = tiny.llama()
    lk.apply(model, lk.ALoRAConfig(rank=4, alpha=8, invocation_tokens=[7]))
    with pytest.raises(ValueError, match="--packing: adapter 'default' \\(ALoRAConfig\\): it activates"):
        Trainer(model, tiny.samples(4), make_config(packing=64))
    with pytest.raises(ValueError, match="packing with kl_to_base"):
        make_config(packing=64, kl_to_base=0.1)
    with pytest.raises(ValueError, match="packing=-1"):
        make_config(packing=-1)
