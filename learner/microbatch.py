"""Micro-batches of a learner shard under a token budget, for gradient accumulation.

The surrogate loss is a sum over rows divided by the step's GLOBAL normaliser
(`learner.step.global_normaliser`), so any partition of a shard's rows into micro-batches,
each with that same normaliser, has losses and gradients that add up to the shard's. Rows are
sorted by length (longest first) and packed greedily; each micro-batch is cut to its own
longest row, which also removes most of the shard's padding.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor

from learner.batch import TrainBatch


def row_lengths(batch: TrainBatch) -> Tensor:
    """[B] real tokens per row (rows are right-padded, so row b occupies columns 0 .. len−1)."""
    return batch.attention_mask_BT.sum(-1)


def plan_micro_batches(
    batch: TrainBatch, token_budget: int, *, min_count: int = 1
) -> list[TrainBatch]:
    """Split `batch` into micro-batches of at most `token_budget` padded tokens each.

    A micro-batch of n rows whose longest row has L tokens costs n·L (what its forward pass
    processes). A single row longer than the budget is a micro-batch of its own.
    token_budget: 0 = off, the batch is returned unchanged as the only micro-batch.
    min_count: split further (largest micro-batch in halves) until there are at least this
        many, as long as some micro-batch has two rows or more; data-parallel ranks need equal
        counts. The result may still be shorter when the batch has fewer rows than min_count.
    """
    if token_budget < 0:
        raise ValueError(f"token_budget must be >= 0 (0 = off), got {token_budget}")
    if token_budget == 0:
        return [batch]
    lengths = row_lengths(batch).tolist()
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])  # stable: ties keep row order
    groups: list[list[int]] = []
    for b in order:
        # Longest first, so a group's first row sets its padded length.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(b)
        else:
            groups.append([b])
    while len(groups) < min_count:
        largest = max(range(len(groups)), key=lambda g: len(groups[g]))
        rows = groups[largest]
        if len(rows) < 2:
            break
        half = len(rows) // 2
        groups[largest : largest + 1] = [rows[:half], rows[half:]]
    return [take_rows(batch, rows, width=max(1, max(lengths[b] for b in rows))) for rows in groups]


def take_rows(batch: TrainBatch, rows: list[int], *, width: int) -> TrainBatch:
    """The rows `rows` of `batch` (in that order), cut to the first `width` columns."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids_BT.device)
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            value = value.index_select(0, index)
            if value.dim() >= 2:  # [B, T, ...] per-token tensors
                value = value[:, :width].contiguous()
        elif f.name == "sample_ids":
            value = tuple(value[b] for b in rows)
        values[f.name] = value
    return TrainBatch(**values)


def padding_cells(micro_batches: list[TrainBatch]) -> tuple[int, int]:
    """(cells, padded cells): B·T summed over the micro-batches, and those that are padding."""
    cells = sum(mb.input_ids_BT.numel() for mb in micro_batches)
    real = sum(int(mb.attention_mask_BT.sum().item()) for mb in micro_batches)
    return cells, cells - real
