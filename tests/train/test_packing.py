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
    with pytest.raises(ValueError, match="--share-prefix: adapter 'default' \\(ALoRAConfig\\)"):
        Trainer(model, tiny.samples(4), make_config(share_prefix="on"))
    with pytest.raises(ValueError, match="share_prefix='on' with kl_to_base"):
        make_config(share_prefix="on", kl_to_base=0.1)
    with pytest.raises(ValueError, match="share_prefix='yes'"):
        make_config(share_prefix="yes")


def test_auto_shares_the_prefix_where_it_can_and_says_why_not(tiny, make_config) -> None:
    from lorakit.train.batching import default_collate

    runs = iter(range(10))

    def rows_line(model, **kw) -> tuple[str, bool]:
        lines: list[str] = []
        collate = kw.pop("collate", default_collate)
        config = make_config(steps=1, output_dir=f"{make_config().output_dir}-{next(runs)}", **kw)
        trainer = Trainer(model, _with_prefix(tiny, 8), config, collate, log=lines.append)
        trainer.train()
        return next(line for line in lines if line.startswith("rows:")), trainer.share_prefix

    model = tiny.llama()
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
    line, shared = rows_line(model)
    assert shared and "shared prompt prefix computed once" in line
    from lorakit.data import collate  # `lorakit train`'s own padding collate shares too

    _, shared = rows_line(model, collate=collate)
    assert shared
    model = tiny.llama()
    lk.apply(model, lk.ALoRAConfig(rank=4, alpha=8, invocation_tokens=[7]))
    line, shared = rows_line(model)
    assert not shared and "shared prefix off: adapter 'default' (ALoRAConfig): it activates" in line
    model = tiny.llama()
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
    line, shared = rows_line(model, collate=lambda samples, pad: default_collate(samples, pad))
    assert not shared and "a custom collate function" in line
    line, shared = rows_line(model, kl_to_base=0.1)
    assert not shared and "--kl-to-base reads padded rows" in line


def _with_prefix(tiny, n: int, prefix: int = 12, seed: int = 0) -> list[dict]:
    """Samples that start with the same `prefix` tokens (a system prompt and an instruction), then a
    question and an answer of their own; labels on the answers only."""
    import random

    rng = random.Random(seed)
    shared = [rng.randrange(3, tiny.VOCAB) for _ in range(prefix)]
    out = []
    for _ in range(n):
        question = [rng.randrange(3, tiny.VOCAB) for _ in range(rng.randint(2, 9))]
        answer = [rng.randrange(3, tiny.VOCAB) for _ in range(rng.randint(1, 6))]
        ids = shared + question + answer
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) - len(answer)) + answer})
    return out


def test_the_shared_prefix_stops_before_any_labelled_prediction(tiny) -> None:
    from lorakit.train.batching import shared_prefix_length

    samples = _with_prefix(tiny, 4, prefix=12)
    assert shared_prefix_length(samples) >= 12
    early = [dict(s) for s in samples]
    early[2] = {"input_ids": early[2]["input_ids"], "labels": [-100] * 6 + early[2]["input_ids"][6:]}
    assert shared_prefix_length(early) == 5  # the label at 6 is predicted from position 5
    one = samples[0]
    first_label = next(j for j, x in enumerate(one["labels"]) if x != -100)
    assert shared_prefix_length([one, one]) == first_label - 1  # identical samples: up to the answer


def test_the_shared_prefix_layout(tiny) -> None:
    """Each sample reads back whole from prefix + its rest, at its own positions 0..n-1, seeing the
    prefix and its own earlier tokens only; padding sees itself."""
    from lorakit.train.batching import shared_prefix_collate, shared_prefix_length

    samples = _with_prefix(tiny, 5)
    shared = shared_prefix_length(samples)
    batch = shared_prefix_collate(samples, 0, capacity=40)
    assert batch["input_ids"].shape[0] > 1  # rows of at most 40 tokens, the prefix in each
    seen = []
    for r in range(batch["input_ids"].shape[0]):
        mask, ids, pos = batch["attention_4d"][r, 0], batch["input_ids"][r], batch["position_ids"][r]
        assert pos[:shared].tolist() == list(range(shared))
        at = shared
        while at < ids.shape[0] and batch["attention_mask"][r, at]:
            end = at + 1
            while end < ids.shape[0] and batch["attention_mask"][r, end] and pos[end] == pos[end - 1] + 1:
                end += 1
            seen.append(ids[:shared].tolist() + ids[at:end].tolist())
            assert pos[at:end].tolist() == list(range(shared, shared + end - at))
            expected = torch.zeros(end - at, ids.shape[0], dtype=torch.bool)
            expected[:, :shared] = True
            expected[:, at:end] = torch.ones(end - at, end - at, dtype=torch.bool).tril()
            assert torch.equal(mask[at:end], expected)
            at = end
        for j in range(at, ids.shape[0]):  # padding
            assert mask[j].nonzero().flatten().tolist() == [j]
    assert sorted(seen) == sorted(s["input_ids"] for s in samples)


def _lora_moved(tiny, attention: str | None = None) -> torch.nn.Module:
    """A tiny Llama with a LoRA whose B is moved off zero, so A gets gradients too."""
    model = tiny.llama()
    if attention:
        model.set_attn_implementation(attention)
    torch.manual_seed(0)
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "lorakit"])
@pytest.mark.parametrize("capacity", [0, 30])
def test_a_shared_prefix_gives_the_padded_batch_loss_and_every_gradient(tiny, attention, capacity) -> None:
    from lorakit.train.attention import register
    from lorakit.train.batching import default_collate, shared_prefix_collate
    from lorakit.train.loss import chunked_causal_lm_loss

    samples = _with_prefix(tiny, 6)
    results = []
    for layout in ("padded", "shared"):
        model = _lora_moved(tiny, register() if attention == "lorakit" else attention)
        if layout == "padded":
            batch = default_collate(samples, 0)
            mask, positions = batch["attention_mask"], None
        else:
            batch = shared_prefix_collate(samples, 0, capacity)
            mask, positions = batch["attention_4d"], batch["position_ids"]
            assert batch["attention_mask"].sum() < sum(len(s["input_ids"]) for s in samples)
        total, count = chunked_causal_lm_loss(
            model, batch["input_ids"], mask, batch["labels"], position_ids=positions
        )
        total.backward()
        results.append(
            (float(total), count, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        )
    (padded, n_padded, g_padded), (shared, n_shared, g_shared) = results
    assert n_padded == n_shared and shared == pytest.approx(padded, rel=1e-5)
    for name in g_padded:
        torch.testing.assert_close(g_shared[name], g_padded[name], rtol=1e-4, atol=1e-6)


def test_a_replay_row_goes_end_to_end_with_the_task_row(tiny) -> None:
    """With a shared prefix and no --packing each source makes one row; the two go in one row, each
    keeping its mask and positions, no padding, a source marked per position."""
    samples, general = _with_prefix(tiny, 5, seed=2), _with_prefix(tiny, 2, prefix=9, seed=7)
    (batch,) = micro_batches(samples, list(range(5)), 7, None, 0, (general, [0, 1]), share_prefix=True)
    (task,) = micro_batches(samples, list(range(5)), 7, None, 0, share_prefix=True)
    (replay,) = micro_batches(general, [0, 1], 7, None, 0, share_prefix=True)
    n = task["input_ids"].shape[1]
    assert batch["input_ids"].shape == (1, n + replay["input_ids"].shape[1])  # one row, no padding
    assert int(batch["attention_mask"].sum()) == batch["input_ids"].numel()
    assert batch["replay_tokens"].tolist() == [[False] * n + [True] * (batch["input_ids"].shape[1] - n)]
    assert torch.equal(batch["position_ids"], torch.cat([task["position_ids"], replay["position_ids"]], 1))
    mask = batch["attention_4d"][0, 0]
    assert torch.equal(mask[:n, :n], task["attention_4d"][0, 0]) and torch.equal(
        mask[n:, n:], replay["attention_4d"][0, 0]
    )
    assert not mask[:n, n:].any() and not mask[n:, :n].any()  # nothing attends across the sources
    assert int(batch["sample_tokens"]) == sum(len(s["input_ids"]) for s in samples + general)


def test_task_and_replay_end_to_end_give_the_padded_losses_and_every_gradient(tiny) -> None:
    from lorakit.train.batching import default_collate
    from lorakit.train.loss import chunked_causal_lm_loss

    samples, general = _with_prefix(tiny, 5, seed=2), _with_prefix(tiny, 2, prefix=9, seed=7)
    results = []
    for layout in ("padded", "end to end"):
        model = _lora_moved(tiny)
        if layout == "padded":
            batch = default_collate(samples + general, 0)
            mask, positions, groups = batch["attention_mask"], None, torch.tensor([False] * 5 + [True] * 2)
        else:
            (batch,) = micro_batches(
                samples, list(range(5)), 7, None, 0, (general, [0, 1]), share_prefix=True
            )
            mask, positions, groups = batch["attention_4d"], batch["position_ids"], batch["replay_tokens"]
        sums: dict = {}
        total, count = chunked_causal_lm_loss(
            model,
            batch["input_ids"],
            mask,
            batch["labels"],
            position_ids=positions,
            row_groups=groups,
            group_sums=sums,
        )
        total.backward()
        results.append(
            (float(total), count, sums, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        )
    (padded, n_padded, s_padded, g_padded), (joined, n_joined, s_joined, g_joined) = results
    assert n_padded == n_joined and joined == pytest.approx(padded, rel=1e-5)
    for group in (False, True):  # the task's and the replay's parts apart
        assert s_joined[group][1] == s_padded[group][1] and s_joined[group][0] == pytest.approx(
            s_padded[group][0], rel=1e-5
        )
    for name in g_padded:
        torch.testing.assert_close(g_joined[name], g_padded[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("replay_prefix", [False, True])
def test_training_with_a_shared_prefix_equals_training_padded(tiny, make_config, replay_prefix) -> None:
    results = []
    for share in ("off", "on"):
        model = tiny.llama()
        torch.manual_seed(0)
        lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
        config = make_config(share_prefix=share, steps=3, batch_size=8, micro_batch_size=4,
                             output_dir=str(make_config().output_dir) + f"-{share}")  # fmt: skip
        # replay without a shared prefix: rows of their own; with one: a row end to end with the task's
        general = _with_prefix(tiny, 8, prefix=9, seed=5) if replay_prefix else tiny.samples(8, seed=5)
        result = Trainer(model, _with_prefix(tiny, 24, seed=2), config, replay=Replay(general, 0.25)).train()
        log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
        results.append((log, tiny.params_of(model)))
    (padded_log, padded), (shared_log, shared) = results
    for a, b in zip(padded_log, shared_log, strict=True):
        assert a["loss_tokens"] == b["loss_tokens"] and a["tokens"] == b["tokens"]  # the samples' tokens
        for key in ("loss", "loss_task", "loss_replay"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name in padded:  # Adam's step divides by sqrt(v): a near-zero gradient's rounding moves ~1e-6
        torch.testing.assert_close(shared[name], padded[name], rtol=1e-4, atol=1e-5)
