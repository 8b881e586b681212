"""Cleaning: Unicode NFC, length and script filters, exact and near de-duplication, one document at a time.

NFC comes first because the same word typed on two keyboards can differ in code points (a precomposed
letter, or a base letter plus combining marks; Indic vowel signs are the common case): without it the
tokenizer sees two words and de-duplication misses the copy. De-duplication remembers only the last
`dedup_window` kept documents, so memory is bounded on a corpus of any size; copies further apart than that
are rare in practice, and the window is the knob to trade memory for recall.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from seshu.config import CleanSection
from seshu.data.scripts import SCRIPTS, detect_script
from seshu.errors import UserError

# 64 permutations estimate a Jaccard similarity to about +-0.06, plenty to tell a near-copy (>= 0.8) from
# unrelated text (< 0.2); 128 would double the hashing time and the index memory for no visible gain.
NUM_PERM = 64
SHINGLE_WORDS = 5
SHINGLE_CHARS = 5
# Below this many words, word 5-shingles are too few to estimate similarity, so characters are used; the
# same happens for scripts written without spaces (CJK), where whitespace "words" are whole sentences.
MIN_WORDS_FOR_WORD_SHINGLES = 20
MAX_MEAN_WORD_CHARS = 20
# A document's script is decided on its first characters: a page does not switch script halfway through,
# and detection costs a Python call per character (about 0.2 ms per 1,000).
SCRIPT_SAMPLE_CHARS = 1000


@dataclass
class CleanStats:
    """What cleaning did, for the run log and the model card; `kept_by_script` gives per-language figures."""

    seen: int = 0
    kept: int = 0
    dropped_short: int = 0
    dropped_long: int = 0
    dropped_script: int = 0
    dropped_duplicate: int = 0
    dropped_near_duplicate: int = 0
    kept_by_script: Counter[str] = field(default_factory=Counter)


def clean_documents(docs: Iterable[str], cfg: CleanSection, stats: CleanStats | None = None) -> Iterator[str]:
    """The documents that survive `cfg`'s filters, normalised and stripped, in their original order."""
    unknown = sorted(set(cfg.scripts or ()) - set(SCRIPTS))
    if unknown:
        raise UserError(f"data.clean.scripts: unknown script {unknown[0]!r}; use any of {', '.join(SCRIPTS)}")
    stats = stats if stats is not None else CleanStats()
    exact = RecentHashes(cfg.dedup_window) if cfg.dedup else None
    near = RecentNearDuplicates(cfg.dedup_window, cfg.near_dedup_threshold) if cfg.near_dedup else None
    for doc in docs:
        stats.seen += 1
        text = normalize(doc, cfg.normalize)
        if not text or len(text) < cfg.min_chars:
            stats.dropped_short += 1
            continue
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            stats.dropped_long += 1
            continue
        script = detect_script(text[:SCRIPT_SAMPLE_CHARS])
        if cfg.scripts and script not in cfg.scripts:
            stats.dropped_script += 1
            continue
        if exact is not None and exact.seen_before(text):
            stats.dropped_duplicate += 1
            continue
        if near is not None and near.seen_before(text):
            stats.dropped_near_duplicate += 1
            continue
        stats.kept += 1
        stats.kept_by_script[script] += 1
        yield text


def normalize(text: str, nfc: bool = True) -> str:
    """`text` in Unicode NFC (when asked) without surrounding whitespace."""
    return (unicodedata.normalize("NFC", text) if nfc else text).strip()


class RecentHashes:
    """Exact duplicates among the last `window` distinct documents, by a 16-byte digest of each."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._keys: set[bytes] = set()
        self._order: deque[bytes] = deque()

    def seen_before(self, text: str) -> bool:
        """True if `text` is a copy of a remembered document; otherwise remember it."""
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in self._keys:
            return True
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.window:
            self._keys.discard(self._order.popleft())
        return False


class RecentNearDuplicates:
    """Near duplicates (estimated Jaccard similarity of shingles >= `threshold`) among the last `window`
    documents: MinHash signatures, an LSH index to find candidates, and the signatures to confirm them.

    The LSH bands are chosen for recall (see `lsh_bands`) and every candidate is checked against the
    threshold, so the threshold means what it says; datasketch's own choice for 64 permutations at 0.85
    misses one in twelve pairs that are 0.95 similar. Each remembered document costs about 3.5 KB (its
    signature and one index entry per band), 3.5 GB for the default window of a million documents:
    lower `clean.dedup_window` on a small machine.
    """

    def __init__(self, window: int, threshold: float) -> None:
        # Imported here: only near de-duplication needs it, and every training run imports this module.
        from datasketch import MinHash, MinHashLSH

        self.window = window
        self.threshold = threshold
        self._lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(threshold, NUM_PERM))
        self._signatures: dict[int, np.ndarray] = {}
        self._next_key = 0
        # Every signature starts as a copy of one empty MinHash, which draws its random permutations once
        # instead of once per document (a tenth of a millisecond each).
        self._empty = MinHash(num_perm=NUM_PERM)

    def seen_before(self, text: str) -> bool:
        """True if `text` is close to a remembered document; otherwise remember it."""
        signature = self._empty.copy()
        signature.update_batch(shingles(text))
        values = signature.hashvalues
        for key in self._lsh.query(signature):
            if np.count_nonzero(self._signatures[key] == values) >= self.threshold * NUM_PERM:
                return True
        key = self._next_key
        self._next_key += 1
        self._lsh.insert(key, signature, check_duplication=False)
        self._signatures[key] = values
        if len(self._signatures) > self.window:
            oldest = next(iter(self._signatures))  # dicts keep insertion order
            self._lsh.remove(oldest)
            del self._signatures[oldest]
        return False


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows per band) with the most rows (fewest false candidates to check) for which a pair of
    documents exactly `threshold` similar still becomes a candidate with probability >= `recall`."""
    for rows in range(num_perm, 1, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def shingles(text: str) -> set[bytes]:
    """Word 5-grams of `text`, or character 5-grams when it is short or written without spaces."""
    words = text.lower().split()
    if len(words) >= MIN_WORDS_FOR_WORD_SHINGLES and len(text) / len(words) <= MAX_MEAN_WORD_CHARS:
        grams = (" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))
    else:
        flat = " ".join(words)
        grams = (flat[i : i + SHINGLE_CHARS] for i in range(max(1, len(flat) - SHINGLE_CHARS + 1)))
    return {gram.encode("utf-8") for gram in grams}
