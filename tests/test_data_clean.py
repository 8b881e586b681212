"""Cleaning: NFC, length and script filters, exact and near de-duplication within a bounded window."""

from __future__ import annotations

import random
import unicodedata

import pytest

from seshu.config import CleanSection
from seshu.data.clean import CleanStats, clean_documents, lsh_bands, normalize, shingles
from seshu.errors import UserError

WORDS = [f"w{i}" for i in range(500)]


def random_doc(rng: random.Random, n_words: int = 200) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def with_one_word_changed(doc: str, position: int) -> str:
    words = doc.split()
    words[position] = "CHANGED"
    return " ".join(words)


def clean(docs: list[str], stats: CleanStats | None = None, **settings) -> list[str]:
    return list(clean_documents(docs, CleanSection(**settings), stats))


def test_nfc_makes_decomposed_and_precomposed_text_equal() -> None:
    decomposed = "cafe\u0301  "
    assert normalize(decomposed) == "caf\u00e9"
    assert normalize(decomposed, nfc=False) == "cafe\u0301"
    hindi = unicodedata.normalize("NFD", "क़िला")  # nukta letter: NFD splits it into base + combining dot
    assert clean([hindi]) == [unicodedata.normalize("NFC", hindi)]


def test_exact_duplicates_are_dropped_after_normalisation() -> None:
    stats = CleanStats()
    docs = ["caf\u00e9 open", "cafe\u0301 open", "  caf\u00e9 open\n", "other"]
    assert clean(docs, stats) == ["caf\u00e9 open", "other"]
    assert (stats.seen, stats.kept, stats.dropped_duplicate) == (4, 2, 2)
    assert clean(docs, dedup=False) == ["caf\u00e9 open"] * 3 + ["other"]


def test_length_filters_count_what_they_drop() -> None:
    stats = CleanStats()
    kept = clean(["ab", "abcd", "abcdef", "abcdefgh"], stats, min_chars=3, max_chars=6)
    assert kept == ["abcd", "abcdef"]
    assert (stats.dropped_short, stats.dropped_long, stats.kept) == (1, 1, 2)


def test_whitespace_only_documents_are_dropped_as_short() -> None:
    assert clean(["   ", "x"], min_chars=0) == ["x"]


def test_script_filter_and_per_script_counts() -> None:
    stats = CleanStats()
    docs = ["hello world", "नमस्ते दुनिया", "வணக்கம் உலகம்", "नया दिन"]
    assert clean(docs, stats, scripts=["Devanagari", "Tamil"]) == docs[1:]
    assert stats.dropped_script == 1
    assert stats.kept_by_script == {"Devanagari": 2, "Tamil": 1}


def test_unknown_script_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"data\.clean\.scripts: unknown script 'Hindi'; use any of Latin"):
        clean(["x"], scripts=["Hindi"])


def test_near_duplicates_differing_by_a_word_are_dropped_and_distinct_docs_kept() -> None:
    rng = random.Random(0)
    originals = [random_doc(rng) for _ in range(20)]
    variants = [with_one_word_changed(doc, 50 + i) for i, doc in enumerate(originals)]
    stats = CleanStats()
    kept = clean(originals + variants, stats, near_dedup=True)
    assert kept == originals
    assert stats.dropped_near_duplicate == 20 and stats.dropped_duplicate == 0


def test_near_dedup_of_short_documents_uses_characters() -> None:
    sentence = "the monsoon rains arrived early this year across the southern coast of the peninsula"
    typo = sentence.replace("peninsula", "peninsla")
    other = "a completely different sentence about trains leaving the station before dawn every day"
    assert clean([sentence, typo, other], near_dedup=True, near_dedup_threshold=0.8) == [sentence, other]
    assert all(len(s) == 5 for s in shingles(sentence))  # character 5-grams


def test_shingles_use_words_for_long_spaced_text() -> None:
    doc = " ".join(f"word{i}" for i in range(30))
    assert shingles(doc) == {" ".join(f"word{j}" for j in range(i, i + 5)).encode() for i in range(26)}


def test_lsh_bands_favour_recall_at_the_threshold() -> None:
    bands, rows = lsh_bands(0.85, 64)
    assert bands * rows <= 64
    assert 1 - (1 - 0.85**rows) ** bands >= 0.95  # a pair right at the threshold is nearly always checked
    assert 1 - (1 - 0.85 ** (rows + 1)) ** (64 // (rows + 1)) < 0.95  # and no fewer candidates would do


def test_exact_dedup_window_forgets_old_documents() -> None:
    docs = ["a", "b", "c", "d", "a"]
    assert clean(docs, dedup_window=4) == ["a", "b", "c", "d"]
    # After window + 1 distinct documents, the first one has been evicted and its copy passes.
    assert clean(docs, dedup_window=3) == docs


def test_near_dedup_window_forgets_old_documents() -> None:
    rng = random.Random(1)
    first = random_doc(rng)
    others = [random_doc(rng) for _ in range(3)]
    docs = [first, *others, with_one_word_changed(first, 10)]
    assert clean(docs, dedup=False, near_dedup=True, dedup_window=4) == docs[:4]
    assert clean(docs, dedup=False, near_dedup=True, dedup_window=3) == docs


def test_cleaning_is_lazy() -> None:
    def endless():
        i = 0
        while True:
            yield f"doc {i}"
            i += 1

    stream = clean_documents(endless(), CleanSection())
    assert [next(stream) for _ in range(3)] == ["doc 0", "doc 1", "doc 2"]
