"""Mixing several corpora by weight, and a train/validation split that needs no memory.

Both are deterministic functions of a seed, so a run can be repeated exactly, and both work on streams:
nothing is shuffled in memory and no corpus has to be counted first.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal


def mix_sources(
    factories: Sequence[Callable[[], Iterator[str]]],
    weights: Sequence[float],
    seed: int,
    stop: Literal["first_exhausted", "all_exhausted"],
) -> Iterator[str]:
    """Interleave documents, drawing each next one from source i with probability weights[i] / sum(weights).

    `first_exhausted` ends when any source runs out, so no document is repeated and the mix holds exactly.
    `all_exhausted` restarts a source that runs out (calling its factory again) until every source has run
    out at least once: small corpora are oversampled to their weight, as `datasets.interleave_datasets`
    does. A source that yields nothing on a whole pass is dropped rather than restarted forever.
    """
    if len(factories) != len(weights):
        raise ValueError(f"{len(factories)} sources but {len(weights)} weights")
    if len(factories) == 1:
        yield from factories[0]()
        return
    rng = random.Random(seed)
    live = list(weights)
    iterators = [factory() for factory in factories]
    fresh = [True] * len(factories)  # nothing drawn since the last (re)start
    exhausted = [False] * len(factories)
    while any(live):
        i = _draw(rng, live)
        try:
            doc = next(iterators[i])
        except StopIteration:
            if stop == "first_exhausted":
                return
            exhausted[i] = True
            if all(exhausted):
                return
            if fresh[i]:
                live[i] = 0.0
            else:
                iterators[i] = factories[i]()
                fresh[i] = True
            continue
        fresh[i] = False
        yield doc


def _draw(rng: random.Random, weights: Sequence[float]) -> int:
    """An index with probability proportional to its weight (zero weights are never drawn)."""
    cumulative = list(accumulate(weights))
    index = bisect(cumulative, rng.random() * cumulative[-1])
    # Float rounding can put the draw on the very end of the range; fall back to the last live source.
    return min(index, max(j for j, w in enumerate(weights) if w > 0))


@dataclass(frozen=True)
class Holdout:
    """One side of a train/validation split that holds out `fraction` of the text, drawn with `seed`."""

    fraction: float
    seed: int
    side: Literal["train", "validation"]


def is_validation(text: str, fraction: float, seed: int) -> bool:
    """Whether `text` belongs to the held-out split: a hash of seed and text, not a random draw, so the split
    is the same on every run and machine, needs no memory on a stream, and every copy of a document lands on
    the same side (duplicates cannot leak from training into validation)."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64
