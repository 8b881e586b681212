"""Which entries of a tensor rank among its largest magnitudes, found chunk by chunk in bounded memory.

TIES keeps each task vector's largest |d|, breadcrumbs a band below its largest. Sorting the whole tensor would
hold it (and its indices) in memory; instead a radix select over the float32 bit patterns (two histogram passes
of 16 bits each over the chunks) finds the exact magnitude at a rank, and entries equal to it are taken in
flattened order, so exactly the asked number is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    # |d| ranked as float32 (mergekit ranks in float32 on the CPU too). A non-negative float32's bit pattern read
    # as an integer orders the same way as its value, which is what lets a radix select work chunk by chunk.
    return delta.abs().to(torch.float32).view(torch.int32).to(torch.int64)


@dataclass(frozen=True)
class RankCut:
    """The entries of a tensor ranked by magnitude (largest first) that fall in [skip, skip + keep): all entries
    whose magnitude bits lie strictly between `low` and `high`, plus the first `low_ties` entries equal to `low`
    (in flattened order) and all but the first `high_ties_dropped` entries equal to `high`."""

    low: int
    low_ties: int
    high: int
    high_ties_dropped: int


def select_bits(bits_of: Callable[[int], torch.Tensor], chunks: int, rank: int) -> tuple[int, int]:
    """The magnitude bits of the entry ranked `rank` (0 = largest) of a tensor whose chunk i has the magnitude
    bits `bits_of(i)`, and how many entries rank above it with the same bits. Two histogram passes of 16 bits
    each (a radix select), so the memory is one chunk's, not the tensor's."""
    high_counts = torch.zeros(1 << 15, dtype=torch.int64)
    for i in range(chunks):
        bits = bits_of(i)
        high_counts += torch.bincount((bits >> 16).flatten(), minlength=1 << 15)
    above = torch.flip(high_counts, [0]).cumsum(0)  # entries in this bucket or a larger one
    bucket = (1 << 15) - 1 - int(torch.searchsorted(above, rank, right=True))
    before = int(above[(1 << 15) - 2 - bucket]) if bucket < (1 << 15) - 1 else 0
    low_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for i in range(chunks):
        bits = bits_of(i).flatten()
        low_counts += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
    above_low = torch.flip(low_counts, [0]).cumsum(0)
    low = (1 << 16) - 1 - int(torch.searchsorted(above_low, rank - before, right=True))
    greater = before + (int(above_low[(1 << 16) - 2 - low]) if low < (1 << 16) - 1 else 0)
    return (bucket << 16) | low, rank - greater


def rank_cut(bits_of: Callable[[int], torch.Tensor], chunks: int, skip: int, keep: int) -> RankCut:
    """The entries ranked [skip, skip + keep) by magnitude (largest first; equal ones by position)."""
    if keep == 0:
        return RankCut(low=1 << 31, low_ties=0, high=1 << 31, high_ties_dropped=0)  # keeps nothing
    low_bits, low_rank = select_bits(bits_of, chunks, skip + keep - 1)
    if skip == 0:
        high, high_dropped = 1 << 31, 0  # above every finite magnitude
    else:
        high, high_dropped = select_bits(bits_of, chunks, skip)
    return RankCut(low=low_bits, low_ties=low_rank + 1, high=high, high_ties_dropped=high_dropped)


def cut_mask(bits: torch.Tensor, cut: RankCut, counters: list[int] | None) -> torch.Tensor:
    """Which entries a `RankCut` keeps. Ties at either edge go by flattened order, counted across chunks in
    `counters` ([low ties kept so far, high ties seen so far]); without counters the chunk is the whole tensor."""
    counters = counters if counters is not None else [0, 0]
    keep = (bits > cut.low) & (bits < cut.high)
    if cut.low == cut.high:  # one magnitude spans the whole range: the ties at it are all there is
        at = (bits == cut.low).flatten()
        order = at.cumsum(0) + counters[1]
        take = at & (order > cut.high_ties_dropped) & (order <= cut.low_ties)
        counters[1] += int(at.sum())
        return keep | take.reshape(bits.shape)
    low_at = (bits == cut.low).flatten()
    low_order = low_at.cumsum(0) + counters[0]
    keep = keep | (low_at & (low_order <= cut.low_ties)).reshape(bits.shape)
    counters[0] += int(low_at.sum())
    if cut.high < (1 << 31):
        high_at = (bits == cut.high).flatten()
        high_order = high_at.cumsum(0) + counters[1]
        keep = keep | (high_at & (high_order > cut.high_ties_dropped)).reshape(bits.shape)
        counters[1] += int(high_at.sum())
    return keep
