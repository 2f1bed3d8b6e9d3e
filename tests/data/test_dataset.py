"""Dataset building (skipping answerless samples) and the padding collator."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorakit.data import IGNORE_INDEX, Encoded, build_sft_dataset, collate, count_loss_tokens


def test_build_counts_samples_truncated_to_no_answer_as_skipped(smol_tokenizer: Any) -> None:
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "words " * 200}, {"role": "assistant", "content": "ok"}]
    data = build_sft_dataset(smol_tokenizer, [short, long, short], max_length=64)
    assert len(data) == 2
    assert data.skipped == 1
    assert all(len(sample.input_ids) <= 64 for sample in data.samples)
    assert data.num_loss_tokens == 2 * data[0].num_loss_tokens > 0


def test_last_turn_only_trains_fewer_tokens(smol_tokenizer: Any) -> None:
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    every = build_sft_dataset(smol_tokenizer, [chat], max_length=256)
    last = build_sft_dataset(smol_tokenizer, [chat], max_length=256, last_turn_only=True)
    assert every[0].input_ids == last[0].input_ids
    assert 0 < last.num_loss_tokens < every.num_loss_tokens


def test_collate_right_pads_with_pad_id_and_masks_padding() -> None:
    samples = [Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8])]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_pads_with_the_real_pad_token(smol_tokenizer: Any) -> None:
    chats = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "a longer question"}, {"role": "assistant", "content": "ok"}],
    ]
    data = build_sft_dataset(smol_tokenizer, chats, max_length=128)
    batch = collate(data.samples, pad_id=smol_tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.tolist() == [len(s.input_ids) for s in data.samples]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert count_loss_tokens(batch["labels"]) == data.num_loss_tokens


def test_collate_rejects_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


def test_count_loss_tokens_on_lists_and_tensors() -> None:
    labels = [-100, 3, -100, 4, 5]
    assert count_loss_tokens(labels) == 3
    assert count_loss_tokens(torch.tensor([labels, labels])) == 6
