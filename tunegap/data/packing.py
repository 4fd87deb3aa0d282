"""Turn tokenised examples into tensors with no FLOP spent on padding.

Packing puts several examples in one row; position ids restart at each example, and transformers then
builds a block-diagonal causal mask from them (`find_packed_sequence_indices`, needs use_cache=False), so
no example attends to another. A test checks packed logits equal per-example logits.
Targets are shifted per example *before* packing, so no example learns to predict its neighbour's first token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..losses import IGNORE_INDEX as IGNORE

if TYPE_CHECKING:  # for annotations only: torch is imported where a tensor is made
    import torch


@dataclass
class Batch:
    input_ids: "torch.Tensor"  # [rows, width]
    position_ids: "torch.Tensor"  # [rows, width]
    targets: "torch.Tensor"  # [rows, width], next-token ids or IGNORE
    attention_mask: "torch.Tensor | None"  # only for unpacked (padded) batches
    n_examples: int
    n_tokens: int  # real tokens, padding excluded
    # flat indices (into rows x width) of the loss-bearing positions: selecting them with `index_select`
    # instead of a boolean mask keeps every shape known before the step runs, which is what lets
    # `costs.counted.count_on_fake_tensors` replay a step on fake tensors (a mask's `nonzero` has no known shape)
    loss_positions: "torch.Tensor"

    @property
    def n_loss_tokens(self) -> int:
        return len(self.loss_positions)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def to_device(batch, device, *, non_blocking: bool = False):
    """Any batch dataclass (this `Batch`, an objective's own) with its tensors on `device`, counts untouched."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=non_blocking)
                                         for f in dataclasses.fields(batch) if hasattr(getattr(batch, f.name), "to")})


def shifted_targets(labels: list[int]) -> list[int]:
    return list(labels[1:]) + [IGNORE]


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of example indices into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def make_batch(examples, *, capacity: int, pad_id: int, pack: bool = True) -> Batch:
    """`examples` have `input_ids` and unshifted `labels` (IGNORE where no loss). Rows are as wide as the fullest."""
    import torch

    lengths = [len(e.input_ids) for e in examples]
    if max(lengths) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds the row capacity {capacity}")
    groups = first_fit_rows(lengths, capacity) if pack else [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in g) for g in groups)
    ids, pos, tgt, mask = [], [], [], []
    for group in groups:
        row_ids, row_pos, row_tgt = [], [], []
        for i in group:
            row_ids += examples[i].input_ids
            row_pos += range(lengths[i])
            row_tgt += shifted_targets(examples[i].labels)
        pad = width - len(row_ids)
        mask.append([1] * len(row_ids) + [0] * pad)
        # the padding tail is its own "sequence" (positions restart) so packed masking isolates it
        ids.append(row_ids + [pad_id] * pad)
        pos.append(row_pos + list(range(pad)))
        tgt.append(row_tgt + [IGNORE] * pad)
    targets = torch.tensor(tgt)
    return Batch(
        input_ids=torch.tensor(ids), position_ids=torch.tensor(pos), targets=targets,
        attention_mask=None if pack else torch.tensor(mask), n_examples=len(examples), n_tokens=sum(lengths),
        loss_positions=(targets.flatten() != IGNORE).nonzero().squeeze(1),
    )
