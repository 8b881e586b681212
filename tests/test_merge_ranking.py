"""`seshu.merge.ranking`: the radix select and the rank band it cuts agree with a stable sort, chunk by chunk."""

from __future__ import annotations

import pytest
import torch

from seshu.merge.ranking import RankCut, cut_mask, magnitude_bits, rank_cut, select_bits


def reference_band(x: torch.Tensor, skip: int, keep: int) -> torch.Tensor:
    """The entries ranked [skip, skip + keep) by |x|, largest first, equal ones in flattened order."""
    flat = x.flatten().abs().to(torch.float32)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[skip : skip + keep]] = True
    return mask.reshape(x.shape)


def chunked(x: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return list(torch.split(x, rows))


def band_mask(x: torch.Tensor, skip: int, keep: int, rows: int) -> torch.Tensor:
    parts = chunked(x, rows)
    cut = rank_cut(lambda i: magnitude_bits(parts[i]), len(parts), skip, keep)
    counters = [0, 0]
    return torch.cat([cut_mask(magnitude_bits(p), cut, counters) for p in parts])


def test_magnitude_bits_order_as_the_magnitudes_do() -> None:
    x = torch.tensor([0.0, -1e-30, 1e-30, 0.5, -0.75, 3.0, -1e30, float("inf")])
    bits = magnitude_bits(x)
    assert bits.dtype == torch.int64 and bool((bits >= 0).all())
    assert torch.equal(torch.argsort(bits, stable=True), torch.argsort(x.abs(), stable=True))
    assert bits[1] == bits[2]  # the sign does not count
    half = torch.tensor([0.5, -2.0], dtype=torch.bfloat16)
    assert torch.equal(magnitude_bits(half), magnitude_bits(half.float()))  # ranked as float32


@pytest.mark.parametrize("rows", [1, 3, 7, 40])
def test_select_bits_finds_the_magnitude_at_a_rank_and_the_ties_above_it(rows: int) -> None:
    x = torch.randint(-5, 6, (40, 9), generator=torch.Generator().manual_seed(0)).float()  # many equal magnitudes
    parts = chunked(x, rows)
    ranked = torch.sort(magnitude_bits(x).flatten(), descending=True).values
    for rank in (0, 1, 17, 200, 359):
        bits, above = select_bits(lambda i: magnitude_bits(parts[i]), len(parts), rank)
        assert bits == int(ranked[rank])
        assert above == int((ranked[:rank] == bits).sum())


@pytest.mark.parametrize(("skip", "keep"), [(0, 1), (0, 100), (5, 30), (36, 150), (0, 360), (359, 1), (10, 0)])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_rank_cut_keeps_exactly_the_band_a_stable_sort_gives(skip: int, keep: int, rows: int) -> None:
    x = torch.randint(-4, 5, (40, 9), generator=torch.Generator().manual_seed(1)).float() * 0.25
    mask = band_mask(x, skip, keep, rows)
    assert int(mask.sum()) == keep
    assert torch.equal(mask, reference_band(x, skip, keep))


def test_distinct_magnitudes_band_and_one_magnitude_everywhere() -> None:
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(band_mask(x, 8, 40, rows=6), reference_band(x, 8, 40))
    ones = torch.ones(10, 10)  # every entry ties: the band is taken in flattened order
    mask = band_mask(ones, 20, 37, rows=3)
    assert torch.equal(mask.flatten().nonzero().flatten(), torch.arange(20, 57))


def test_keeping_nothing_and_a_cut_without_counters_covers_the_whole_tensor() -> None:
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    nothing = rank_cut(lambda i: magnitude_bits(x), 1, 0, 0)
    assert isinstance(nothing, RankCut) and not bool(cut_mask(magnitude_bits(x), nothing, None).any())
    cut = rank_cut(lambda i: magnitude_bits(x), 1, 3, 10)
    assert torch.equal(cut_mask(magnitude_bits(x), cut, None), reference_band(x, 3, 10))
