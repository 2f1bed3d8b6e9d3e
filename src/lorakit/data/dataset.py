"""Tokenised SFT datasets and the padding collator.

Samples whose answers are cut away by truncation are dropped and counted (``SFTData.skipped``)
rather than kept with zero loss tokens: such a sample would dilute the loss average and hide the
truncation from the user.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lorakit.data.chat import IGNORE_INDEX, Encoded, encode_chat


@dataclass
class SFTData:
    """Encoded samples ready for ``collate``, plus how many conversations were skipped."""

    samples: list[Encoded] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        return self.samples[index]

    @property
    def num_loss_tokens(self) -> int:
        """Total trained positions; the trainer normalises the loss by this, not by samples."""
        return sum(sample.num_loss_tokens for sample in self.samples)


def build_sft_dataset(
    tokenizer: Any,
    conversations: Iterable[Sequence[Mapping[str, str]]],
    max_length: int,
    last_turn_only: bool = False,
) -> SFTData:
    """Encode every conversation; those left without a loss token after truncation are skipped."""
    data = SFTData()
    for conversation in conversations:
        encoded = encode_chat(tokenizer, conversation, max_length, last_turn_only=last_turn_only)
        if encoded is None:
            data.skipped += 1
        else:
            data.samples.append(encoded)
    return data


def count_loss_tokens(labels: Tensor | Sequence[int]) -> int:
    """Positions whose label is not ``IGNORE_INDEX``.

    Use it to normalise the loss over gradient-accumulation micro-batches by trained tokens.
    Note that causal-LM heads shift labels, so the first position never contributes; that
    position is always a prompt token here, so the count is exact.
    """
    if isinstance(labels, Tensor):
        return int((labels != IGNORE_INDEX).sum().item())
    return sum(label != IGNORE_INDEX for label in labels)


def collate(samples: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its longest sample.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (long tensors of shape
    ``(batch, longest)``); padded positions get ``pad_id``, mask 0 and label ``IGNORE_INDEX``.
    """
    if not samples:
        raise ValueError("collate got an empty batch; pass at least one Encoded sample")
    longest = max(len(sample.input_ids) for sample in samples)
    shape = (len(samples), longest)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


collate.pads_only = True  # type: ignore[attr-defined]  # plain right padding: train/batching.pads_only
