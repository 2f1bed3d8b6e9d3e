"""Sample order, micro-batches and a default collate.

The order is a seeded permutation per epoch, and the position in it is two integers (epoch, index):
that is all a checkpoint needs to continue with exactly the samples an uninterrupted run would see.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorakit.train.loss import IGNORE_INDEX

Collate = Callable[[Sequence[Any], int], dict[str, Tensor]]


def field_of(sample: Any, name: str) -> list[int]:
    """Samples may be dicts or dataclasses; the trainer only reads input_ids and labels."""
    return sample[name] if isinstance(sample, Mapping) else getattr(sample, name)


def default_collate(samples: Sequence[Any], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sample; padded labels are ignored by the loss."""
    length = max(len(field_of(s, "input_ids")) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(field_of(sample, "input_ids"))
        ids[row, :n] = torch.tensor(field_of(sample, "input_ids"), dtype=torch.long)
        labels[row, :n] = torch.tensor(field_of(sample, "labels"), dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of sample indices, each row's lengths summing to at most
    `capacity` (raised to the longest sample, which is never split); deterministic."""
    capacity = max(capacity, max(lengths))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([i])
            free.append(capacity - lengths[i])
        else:
            rows[row].append(i)
            free[row] -= lengths[i]
    return rows


def _empty_rows(rows: int, width: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """input_ids (all padding), labels (all ignored), real-token mask and positions (all 0)."""
    shape = (rows, width)
    return (
        torch.full(shape, pad_id, dtype=torch.long),
        torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
    )


def packed_collate(samples: Sequence[Any], pad_id: int, capacity: int) -> dict[str, Tensor]:
    """Several samples per row, back to back (`pack`), with `position_ids` restarting at 0 for each:
    given position ids, no attention mask and no cache (`use_cache=False`: with a cache transformers
    does not look for segments), its mask builders make each sample attend to itself only (a new
    segment wherever the position does not go up by one). The label at each
    sample's first token is ignored, as its prediction would come from the previous sample's last
    position. `attention_mask` marks the real tokens (for counting; the trainer does not pass it to
    the model); the padding at a row's end is a segment of its own, with no labels."""
    lengths = [len(field_of(s, "input_ids")) for s in samples]
    rows = pack(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids, labels, mask, positions = _empty_rows(len(rows), width, pad_id)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(field_of(samples[i], "input_ids"), dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(field_of(samples[i], "labels")[1:], dtype=torch.long)
            mask[r, at : at + n] = 1
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


MIN_SHARED = 8
"""Below this many shared tokens a micro-batch is not laid out around its shared prefix."""


def shared_prefix_length(samples: Sequence[Any]) -> int:
    """The longest prefix of input_ids every sample starts with, cut so that no position inside it
    predicts a labelled token (position j predicts the token at j + 1): the prefix's positions are
    computed once for all the samples, so none of them may carry one sample's loss. At least one
    token of each sample stays outside it."""
    ids = [field_of(s, "input_ids") for s in samples]
    limit = min(len(x) for x in ids) - 1
    for sample in samples:
        labels = field_of(sample, "labels")
        labelled = next((j for j in range(1, len(labels)) if labels[j] != IGNORE_INDEX), len(labels))
        limit = min(limit, labelled - 1)
    return common_prefix_length(ids, limit)


def common_prefix_length(ids: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all of `ids` share, at most `limit`."""
    first, n = ids[0], 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n


def shared_prefix_collate(samples: Sequence[Any], pad_id: int, capacity: int = 0) -> dict[str, Tensor]:
    """Rows that hold the samples' shared prefix once, then each sample's rest (its suffix), with a
    mask that lets every suffix see the prefix and itself, never another suffix: each sample's
    tokens see exactly the keys and values they would see in a row of their own, so the loss and
    every gradient are the padded batch's (the prefix's gradient sums what each sample sends it),
    while the prefix's tokens are computed once per row instead of once per sample.

    `capacity` > 0 caps a row's length (suffixes packed first-fit decreasing, the prefix repeated in
    each row); 0 puts the whole micro-batch in one row. Without a shared prefix of `MIN_SHARED`
    tokens, the samples are packed (`packed_collate`) or, with no capacity, padded as usual.

    Returns input_ids, labels, position_ids, attention_mask (the real tokens, for counting) and
    `attention_4d` (rows, 1, T, T) bool, which the trainer hands the model as its attention mask."""
    shared = shared_prefix_length(samples)
    if shared < MIN_SHARED:
        return packed_collate(samples, pad_id, capacity) if capacity else default_collate(samples, pad_id)
    prefix = list(field_of(samples[0], "input_ids")[:shared])
    rests = [len(field_of(s, "input_ids")) - shared for s in samples]
    rows = pack(rests, capacity - shared) if capacity else [list(range(len(samples)))]
    width = max(shared + sum(rests[i] for i in row) for row in rows)
    ids, labels, real, positions = _empty_rows(len(rows), width, pad_id)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        ids[r, :shared] = torch.tensor(prefix)
        real[r, :shared] = 1
        positions[r, :shared] = torch.arange(shared)
        allowed[r, 0, :shared, :shared] = causal[:shared, :shared]
        at = shared
        for i in row:
            n = rests[i]
            part = slice(at, at + n)
            ids[r, part] = torch.tensor(field_of(samples[i], "input_ids")[shared:], dtype=torch.long)
            labels[r, part] = torch.tensor(field_of(samples[i], "labels")[shared:], dtype=torch.long)
            real[r, part] = 1
            positions[r, part] = torch.arange(shared, shared + n)
            allowed[r, 0, part, :shared] = True
            allowed[r, 0, part, part] = causal[:n, :n]
            at += n
        allowed[r, 0, range(at, width), range(at, width)] = True  # padding sees itself only (no NaN)
    return {"input_ids": ids, "attention_mask": real, "labels": labels, "position_ids": positions,
            "attention_4d": allowed, "sample_tokens": torch.tensor(sum(rests) + shared * len(samples))}  # fmt: skip


def bool_mask_problem(model: Any) -> str | None:
    """Why the model cannot take a laid-out batch's boolean 4-D mask (`attention_4d`), or None."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager":
        return "eager attention adds a float mask; shared-prefix rows pass a boolean one: use sdpa or lorakit"
    return None


def model_mask(batch: dict[str, Tensor]) -> Tensor | None:
    """The attention mask the model gets: a laid-out micro-batch's own 4-D mask; none for packed rows
    (transformers builds it from where the positions restart); the padding mask otherwise."""
    if "attention_4d" in batch:
        return batch["attention_4d"]
    return None if "position_ids" in batch else batch["attention_mask"]


def sample_tokens(batch: dict[str, Tensor]) -> int:
    """The samples' own tokens in a micro-batch (a shared prefix counted once per sample, as the
    samples hold it), whatever its layout."""
    if "sample_tokens" in batch:
        return int(batch["sample_tokens"])
    return int(batch["attention_mask"].sum())


default_collate.pads_only = True  # type: ignore[attr-defined]  # see pads_only()


def pads_only(collate: Collate) -> bool:
    """A collate that only right-pads input_ids and labels (and builds the mask), marked with
    `pads_only = True`: packed and shared-prefix rows can stand in for it."""
    return bool(getattr(collate, "pads_only", False))


def loss_token_count(labels: Tensor) -> int:
    """Tokens that contribute to the loss: a label at position 0 has no prediction, so skip it."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class SampleOrder:
    """An endless stream of sample indices: a fresh seeded permutation for every epoch."""

    def __init__(
        self, num_samples: int, seed: int, epoch: int = 0, index: int = 0, stream: str = "data"
    ) -> None:
        self.num_samples, self.seed, self.stream = num_samples, seed, stream
        self.epoch, self.index = epoch, index
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        # A string seed is hashed by Python itself: the same order on every platform and version.
        order = list(range(self.num_samples))
        random.Random(f"lorakit-{self.stream}:{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        """The next `count` indices; a batch that crosses an epoch end continues into the next."""
        out: list[int] = []
        while len(out) < count:
            if self.index == self.num_samples:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(count - len(out), self.num_samples - self.index)
            out.extend(self._perm[self.index : self.index + take])
            self.index += take
        return out

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Replay:
    """Samples mixed into every optimizer batch (general data against forgetting): `ratio` is the
    share of each batch's samples drawn from them, in [0, 1); the batch size stays the same. Step s
    takes floor((s + 1) r B) - floor(s r B) of them, so over any run the share is r to within one
    sample, also for ratios that do not divide the batch."""

    samples: Sequence[Any]
    ratio: float

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"replay ratio {self.ratio} is outside [0, 1): the share of each batch replayed")
        if not self.samples:
            raise ValueError("replay has no samples")

    def count(self, step: int, batch_size: int) -> int:
        return math.floor((step + 1) * self.ratio * batch_size + 1e-9) - math.floor(
            step * self.ratio * batch_size + 1e-9
        )


def micro_batches(
    samples: Sequence[Any],
    indices: list[int],
    micro_batch_size: int,
    collate: Collate,
    pad_id: int,
    replay: tuple[Sequence[Any], list[int]] | None = None,
    shard: tuple[int, int] = (0, 1),
    packing: int = 0,
    share_prefix: bool = False,
) -> list[dict[str, Tensor]]:
    """Split one optimizer batch; sorting by length first keeps padding inside each micro-batch low.

    `shard` = (rank, world size): this rank keeps every world-size-th micro-batch from its rank on
    (train/distributed.py), so each micro-batch is the one a single process would form and terms
    computed per micro-batch (a router's balancing loss) come out the same.

    Sorting does not change the step's gradient: the loss is a sum over all tokens of the batch.
    `replay` = (samples, indices) drawn from replay data: sorted in with the rest (a micro-batch may
    hold both, so replay adds no forward of its own), each batch then carries `replay_rows` (B,)
    bool, by which the loss is reported per source.

    `packing` > 0: each micro-batch's samples go into rows of up to that many tokens
    (`packed_collate`), replay samples and task samples in rows of their own. `share_prefix`: each
    source's samples are laid out around their shared prefix (`shared_prefix_collate`), in rows of
    up to `packing` tokens (0: one row per source).
    """
    pool = [(samples, i, False) for i in indices]
    if replay is not None:
        pool += [(replay[0], i, True) for i in replay[1]]
    pool.sort(key=lambda e: (len(field_of(e[0][e[1]], "input_ids")), e[2], e[1]))
    layout = shared_prefix_collate if share_prefix else packed_collate if packing else None
    rows = functools.partial(layout, capacity=packing) if layout else None
    side_by_side = share_prefix and not packing  # one row per source: both sources in one row
    batches = []
    for start in range(0, len(pool), micro_batch_size):
        part = pool[start : start + micro_batch_size]
        if rows is not None:
            batches.append(_by_source(part, pad_id, rows, replay is not None, side_by_side))
            continue
        batch = collate([source[i] for source, i, _ in part], pad_id)
        if replay is not None:
            batch["replay_rows"] = torch.tensor([is_replay for *_, is_replay in part])
        batches.append(batch)
    rank, size = shard
    return batches[rank::size]


def _by_source(
    part: list[tuple[Sequence[Any], int, bool]],
    pad_id: int,
    rows: Collate,
    flag: bool,
    side_by_side: bool = False,
) -> dict[str, Tensor]:
    """One micro-batch whose rows (from `rows(samples, pad_id)`) each hold one source's samples
    (task or replay), the sources' rows joined at the width of the widest; with `side_by_side`,
    where each source made one row, the two rows are put end to end in one row instead
    (`_end_to_end`: no padding, and `replay_tokens` marks which source each position is)."""
    pieces = []
    for replayed in (False, True):
        group = [source[i] for source, i, is_replay in part if is_replay == replayed]
        if group:
            batch = rows(group, pad_id)
            batch["replay_rows"] = torch.full((batch["input_ids"].shape[0],), replayed)
            pieces.append(batch)
    if len(pieces) == 1:
        out = pieces[0]
    elif side_by_side and all(b["input_ids"].shape[0] == 1 for b in pieces):
        out = _end_to_end(pieces)
    else:
        out = _join_rows(pieces, pad_id)
    if not flag:
        out.pop("replay_rows")
    return out


def _end_to_end(pieces: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One-row batches put end to end in one row: a block-diagonal 4-D mask keeps each piece's own
    (so nothing attends across pieces) and each keeps its positions, so every token sees what it
    saw in its piece's row, without the padding a shorter row would get to join a wider one. The
    label at each piece's first position is dropped, as in its own row (where nothing predicts it;
    here the previous piece's last position would)."""
    pieces = [_with_positions(b) for b in pieces]
    widths = [b["input_ids"].shape[1] for b in pieces]
    width = sum(widths)
    mask = torch.zeros(1, 1, width, width, dtype=torch.bool)
    labels = torch.cat([b["labels"] for b in pieces], 1)
    at = 0
    for b, n in zip(pieces, widths, strict=True):
        mask[:, :, at : at + n, at : at + n] = _mask_4d(b, n)
        labels[:, at] = IGNORE_INDEX
        at += n
    replay = torch.cat(
        [b["replay_rows"][:, None].expand(-1, n) for b, n in zip(pieces, widths, strict=True)], 1
    )
    return {
        "input_ids": torch.cat([b["input_ids"] for b in pieces], 1),
        "labels": labels,
        "attention_mask": torch.cat([b["attention_mask"] for b in pieces], 1),
        "position_ids": torch.cat([b["position_ids"] for b in pieces], 1),
        "attention_4d": mask,
        "replay_rows": replay.any(1),  # the row holds replay
        "replay_tokens": replay,
        "sample_tokens": torch.tensor(sum(sample_tokens(b) for b in pieces)),
    }


def _with_positions(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch with position_ids (a padded batch's: counting its real tokens)."""
    if "position_ids" in batch:
        return batch
    return {**batch, "position_ids": (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)}


def _join_rows(pieces: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Stack row sets of different widths, each padded on the right (padding positions go on from
    the row's last; under an explicit 4-D mask padding sees only itself)."""
    width = max(b["input_ids"].shape[1] for b in pieces)
    pieces = [_with_positions(b) for b in pieces]  # padded rows beside laid-out ones: positions of their own
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out: dict[str, Tensor] = {
        "replay_rows": torch.cat([b["replay_rows"] for b in pieces]),
        "sample_tokens": torch.tensor(sum(sample_tokens(b) for b in pieces)),
    }
    for key in ("input_ids", "labels", "attention_mask", "position_ids"):
        parts = []
        for b in pieces:
            t, extra = b[key], width - b[key].shape[1]
            if extra and key == "position_ids":
                t = torch.cat([t, torch.arange(1, extra + 1).add(t[:, -1:])], dim=1)
            elif extra:
                t = torch.cat([t, t.new_full((t.shape[0], extra), fill[key])], dim=1)
            parts.append(t)
        out[key] = torch.cat(parts)
    if any("attention_4d" in b for b in pieces):
        out["attention_4d"] = torch.cat([_mask_4d(b, width) for b in pieces])
    return out


def _mask_4d(batch: dict[str, Tensor], width: int) -> Tensor:
    """A row set's (rows, 1, width, width) bool mask: its own, or built from its real tokens and
    where its positions restart, widened with padding that sees only itself."""
    rows, length = batch["input_ids"].shape
    if "attention_4d" in batch:
        mask = batch["attention_4d"]
    else:
        positions = batch["position_ids"]
        starts = torch.cat(
            [torch.ones(rows, 1, dtype=torch.bool), positions[:, 1:] != positions[:, :-1] + 1], 1
        )
        segment = starts.cumsum(1)
        same = segment[:, :, None] == segment[:, None, :]
        real = batch["attention_mask"].bool()
        mask = same & real[:, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
        mask = (mask | torch.eye(length, dtype=torch.bool))[:, None]  # padding sees itself (no empty row)
    out = torch.zeros(rows, 1, width, width, dtype=torch.bool)
    out[:, :, :length, :length] = mask
    out[:, 0, range(length, width), range(length, width)] = True
    return out


def fingerprint(samples: Sequence[Any]) -> str:
    """A hash of the token data, stored in checkpoints so resuming on other data is refused."""
    digest = hashlib.sha256(str(len(samples)).encode())
    for sample in samples:
        digest.update(array("q", field_of(sample, "input_ids")).tobytes())
        digest.update(array("q", field_of(sample, "labels")).tobytes())
    return digest.hexdigest()[:16]


def check_has_loss_tokens(samples: Sequence[Any]) -> None:
    for sample in samples:
        if any(label != IGNORE_INDEX for label in field_of(sample, "labels")[1:]):
            return
    raise ValueError(
        f"none of the {len(samples)} training samples has a label other than {IGNORE_INDEX} after "
        "position 0, so there is nothing to learn; check the loss mask (assistant-only labels)"
    )
