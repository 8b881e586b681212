"""Generalized task arithmetic: B + lambda * consensus(w_i, sparsify(d_i)) over task vectors d_i = X_i - B.

As in mergekit's `generalized_task_arithmetic`, one implementation covers task_arithmetic, ties, dare_linear,
dare_ties, breadcrumbs and breadcrumbs_ties: they differ only in a sparsification rule (none, the largest
magnitudes, a band of magnitudes below the largest, a random draw) and a consensus rule (a weighted sum, or TIES
sign election). `task_arithmetic_method` makes the registry entry of one such combination.

Rules that rank magnitudes take the rank threshold in a first pass over the chunks (`seshu.merge.ranking`), and
with `rescale` the L1 norms before and after pruning in another; the combination then runs chunk by chunk.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from seshu.merge.interpolation import combination_weights, linear_combination, nonzero_weight_sum
from seshu.merge.ranking import RankCut, cut_mask, magnitude_bits, rank_cut
from seshu.merge.spec import DENSITY, GAMMA, LAMBDA, NORMALIZE, RESCALE, WEIGHT, Chunk, MergeMethod, Param, Rows
from seshu.merge.spec import TensorParameters as Params

# A tensor (or its kept part) whose L1 norm is below this is not rescaled (mergekit's eps).
RESCALE_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# Sparsification rules


class Sparsifier(Protocol):
    """Which entries of input `which`'s task vector survive: `prepare` takes what the rule needs of the whole
    tensor (first pass), `keep` gives the mask of one chunk (`counters` carry ties across chunks)."""

    @property
    def parameters(self) -> tuple[Param, ...]: ...  # the ones it adds to the method's

    def prepare(self, rows: Rows, params: Params, which: int) -> RankCut | None: ...

    def keep(
        self, delta: torch.Tensor, cut: RankCut | None, params: Params, which: int, where: tuple[str, int],
        counters: list[int],
    ) -> torch.Tensor: ...  # fmt: skip


@dataclass(frozen=True)
class RankBand:
    """Keeps the entries ranked [skip, skip + keep) by magnitude, largest first; `band(n, params, which)` gives
    (skip, keep) for a tensor of n entries."""

    band: Callable[[int, Params, int], tuple[int, int]]
    parameters: tuple[Param, ...] = ()

    def prepare(self, rows: Rows, params: Params, which: int) -> RankCut | None:
        if params.densities[which] >= 1:
            return None

        def bits_of(chunk: int) -> torch.Tensor:
            return magnitude_bits(rows.read(chunk)[1][which])

        return rank_cut(bits_of, rows.chunks(), *self.band(math.prod(rows.shape), params, which))

    def keep(
        self, delta: torch.Tensor, cut: RankCut | None, params: Params, which: int, where: tuple[str, int],
        counters: list[int],
    ) -> torch.Tensor:  # fmt: skip
        assert cut is not None
        return cut_mask(magnitude_bits(delta), cut, counters)


def _chunk_seed(seed: int, name: str, which: int, chunk: int) -> int:
    key = f"{seed}\0{name}\0{which}\0{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Bernoulli:
    """Keeps each entry with probability density (DARE), drawn from a seed of (seed, tensor, input, chunk)."""

    parameters: tuple[Param, ...] = ()

    def prepare(self, rows: Rows, params: Params, which: int) -> RankCut | None:
        return None

    def keep(
        self, delta: torch.Tensor, cut: RankCut | None, params: Params, which: int, where: tuple[str, int],
        counters: list[int],
    ) -> torch.Tensor:  # fmt: skip
        # numpy's PCG64 draws float32 twice as fast as torch's CPU generator, and DARE draws every mask twice.
        rng = np.random.Generator(np.random.PCG64(_chunk_seed(params.seed, where[0], which, where[1])))
        return torch.from_numpy(rng.random(tuple(delta.shape), dtype=np.float32) < params.densities[which])


def _outlier_band(n: int, params: Params, which: int) -> tuple[int, int]:
    keep = int(params.densities[which] * n)
    return min(int(params.gammas[which] * n), n - keep), keep  # fewer outliers dropped to keep the density


MAGNITUDE = RankBand(lambda n, params, which: (0, max(1, int(params.densities[which] * n))))
OUTLIERS = RankBand(_outlier_band, parameters=(GAMMA,))
RANDOM = Bernoulli()


# --------------------------------------------------------------------------------------------------
# Consensus rules


def summed(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum(w_i d_i), over sum(w_i) when `normalize`."""
    mixed = linear_combination(deltas, weights, False)
    if normalize:
        mixed /= sum(weights)
    return mixed


def elect(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES sign election over weighted task vectors u_i = w_i d_i."""
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    total = torch.zeros_like(weighted[0])
    for u in weighted:
        total += u
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for u, w in zip(weighted, weights, strict=True):
        agree = torch.sign(u) == sign
        mixed += u * agree
        divisor += w * agree
    if normalize:
        mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


@dataclass(frozen=True)
class Consensus:
    mix: Callable[[Sequence[torch.Tensor], Sequence[float], bool], torch.Tensor]
    check: Callable[[Params, bool], str | None] | None = None
    # The coefficients of `mix` when it is a weighted sum of its inputs (weights, normalize), else None.
    coefficients: Callable[[Sequence[float], bool], tuple[float, ...]] | None = None


SUM = Consensus(summed, check=nonzero_weight_sum, coefficients=combination_weights)
SIGN_ELECTION = Consensus(elect)  # its divisor is per entry, and a zero one counts as 1


# --------------------------------------------------------------------------------------------------
# The method


@dataclass
class _Pruning:
    cuts: list[RankCut | None]
    scales: list[float] = field(default_factory=list)  # rescale factor per input (empty: none)
    counters: list[list[int]] = field(default_factory=list)  # ties across chunks, in the combining pass


@dataclass(frozen=True)
class _TaskArithmetic:
    sparsify: Sparsifier | None
    consensus: Consensus

    def pruned(self, delta: torch.Tensor, params: Params, state: _Pruning, which: int, where: tuple[str, int],
               counters: list[int], rescaled: bool = True) -> torch.Tensor:  # fmt: skip
        """Input `which`'s task vector rows after pruning (and rescaling when `rescaled`)."""
        if self.sparsify is None or params.densities[which] >= 1:
            return delta
        kept = delta * self.sparsify.keep(delta, state.cuts[which], params, which, where, counters)
        if rescaled and state.scales and state.scales[which] != 1.0:
            kept = kept * state.scales[which]
        return kept

    def statistics(self, rows: Rows, params: Params) -> _Pruning:
        count = len(params.weights)
        sparsify = self.sparsify
        state = _Pruning([None if sparsify is None else sparsify.prepare(rows, params, i) for i in range(count)])
        if sparsify is not None and params.rescale:
            before, after = [0.0] * count, [0.0] * count
            counters = [[0, 0] for _ in range(count)]
            for c in range(rows.chunks()):
                for i, d in enumerate(rows.read(c)[1]):
                    kept = self.pruned(d, params, state, i, (rows.name, c), counters[i], rescaled=False)
                    before[i] += float(d.abs().sum(dtype=torch.float64))
                    after[i] += float(kept.abs().sum(dtype=torch.float64))
            pairs = zip(before, after, strict=True)
            state.scales = [b / a if b >= RESCALE_EPS and a >= RESCALE_EPS else 1.0 for b, a in pairs]
        state.counters = [[0, 0] for _ in range(count)]
        return state

    def task_vector_weights(self, params: Params) -> tuple[float, ...] | None:
        """lambda * the consensus' coefficients, when nothing is pruned and the consensus is a weighted sum."""
        pruned = self.sparsify is not None and any(d < 1 for d in params.densities)
        if pruned or self.consensus.coefficients is None:
            return None
        return tuple(c * params.lambda_ for c in self.consensus.coefficients(params.weights, params.normalize))

    def combine(self, chunk: Chunk, params: Params, state: _Pruning) -> torch.Tensor:
        where = (chunk.name, chunk.index)
        pruned = [self.pruned(d, params, state, i, where, state.counters[i]) for i, d in enumerate(chunk.inputs)]
        mixed = self.consensus.mix(pruned, params.weights, params.normalize)
        if params.lambda_ != 1:
            mixed *= params.lambda_
        return mixed


def task_arithmetic_method(
    name: str,
    summary: str,
    sparsify: Sparsifier | None = None,
    consensus: Consensus = SUM,
    normalize: bool = False,
    rescale: bool = False,
) -> MergeMethod:
    """The registry entry of one combination of rules, with its defaults of `normalize` and `rescale`.

    Every such method takes a density per input (task_arithmetic ignores it, as mergekit does)."""
    rules = _TaskArithmetic(sparsify, consensus)
    extra = sparsify.parameters if sparsify is not None else ()
    return MergeMethod(
        name,
        summary,
        combine=rules.combine,
        statistics=rules.statistics,
        parameters=(WEIGHT, DENSITY, *extra, NORMALIZE.defaulting(normalize), LAMBDA, RESCALE.defaulting(rescale)),
        check=consensus.check,
        task_vector_weights=rules.task_vector_weights,
    )
