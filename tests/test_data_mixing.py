"""Mixing by weight (both stop rules, seeded) and the hash-based train/validation split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from seshu.data.mixing import is_validation, mix_sources


def source(tag: str, n: int) -> Callable[[], Iterator[str]]:
    """A factory of n documents named tag0, tag1, ..."""
    return lambda: (f"{tag}{i}" for i in range(n))


def tags(docs: list[str]) -> Counter[str]:
    return Counter(doc.rstrip("0123456789") for doc in docs)


def test_proportions_follow_weights() -> None:
    mixed = list(mix_sources([source("a", 100_000), source("b", 100_000)], [3.0, 1.0], 0, "first_exhausted"))
    first = tags(mixed[:8000])
    assert first["a"] / 8000 == pytest.approx(0.75, abs=0.02)


def test_each_source_keeps_its_own_order() -> None:
    mixed = list(mix_sources([source("a", 50), source("b", 50)], [1.0, 1.0], 3, "all_exhausted"))
    a_docs = [d for d in mixed if d.startswith("a")][:50]
    assert a_docs == [f"a{i}" for i in range(50)]


def test_same_seed_same_mix_and_other_seed_another() -> None:
    def run(seed: int) -> list[str]:
        return list(mix_sources([source("a", 200), source("b", 200)], [1.0, 2.0], seed, "first_exhausted"))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_first_exhausted_stops_when_any_source_runs_out() -> None:
    mixed = list(mix_sources([source("a", 5), source("b", 1000)], [1.0, 1.0], 0, "first_exhausted"))
    counts = tags(mixed)
    assert counts["a"] == 5
    assert counts["b"] < 100
    assert len(set(mixed)) == len(mixed)  # nothing repeated


def test_all_exhausted_oversamples_small_sources_until_every_one_ran_out() -> None:
    mixed = list(mix_sources([source("a", 5), source("b", 400)], [1.0, 1.0], 0, "all_exhausted"))
    counts = tags(mixed)
    assert counts["b"] == 400  # ends the moment the last source runs out
    assert counts["a"] == pytest.approx(400, rel=0.2)  # restarted to keep its half
    assert Counter(d for d in mixed if d.startswith("a"))["a0"] >= 60


def test_empty_source_is_dropped_not_restarted_forever() -> None:
    calls = []

    def empty() -> Iterator[str]:
        calls.append(1)
        return iter([])

    assert list(mix_sources([empty, source("b", 10)], [5.0, 1.0], 0, "all_exhausted")) == [f"b{i}" for i in range(10)]
    assert len(calls) == 1
    # first_exhausted ends as soon as the empty source is drawn.
    assert len(list(mix_sources([empty, source("b", 10)], [5.0, 1.0], 0, "first_exhausted"))) < 10


def test_one_source_is_passed_through() -> None:
    assert list(mix_sources([source("a", 3)], [2.0], 0, "all_exhausted")) == ["a0", "a1", "a2"]


def test_weights_must_match_sources() -> None:
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        list(mix_sources([source("a", 1), source("b", 1)], [1.0], 0, "all_exhausted"))


def test_validation_fraction_is_close_to_the_asked_share() -> None:
    held_out = sum(is_validation(f"doc {i}", 0.1, 0) for i in range(20_000))
    assert held_out / 20_000 == pytest.approx(0.1, abs=0.01)


def test_validation_split_is_stable_across_runs_and_machines() -> None:
    # Pinned values: a change here would silently move documents between train and validation.
    texts = [f"document {i}" for i in range(40)]
    assert [i for i, t in enumerate(texts) if is_validation(t, 0.25, 0)] == [
        3,
        13,
        15,
        20,
        22,
        25,
        32,
        34,
        36,
        38,
    ]
    assert [i for i, t in enumerate(texts) if is_validation(t, 0.25, 1)] != [
        3,
        13,
        15,
        20,
        22,
        25,
        32,
        34,
        36,
        38,
    ]


def test_larger_fraction_holds_out_a_superset() -> None:
    texts = [f"t{i}" for i in range(2000)]
    small = {t for t in texts if is_validation(t, 0.05, 0)}
    large = {t for t in texts if is_validation(t, 0.2, 0)}
    assert small < large
