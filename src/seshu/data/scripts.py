"""Writing-system detection, so that every later step can report figures per language family.

Detection is by Unicode block: a document's script is the one most of its letters belong to. Blocks are
cheaper and more robust than a language-ID model on short, noisy or code-mixed text, and the script is what
tokenizer fertility actually depends on.
"""

from __future__ import annotations

from collections import Counter

SCRIPTS: tuple[str, ...] = (
    "Latin",
    "Devanagari",
    "Bengali",
    "Gurmukhi",
    "Gujarati",
    "Odia",
    "Tamil",
    "Telugu",
    "Kannada",
    "Malayalam",
    "Arabic",
    "CJK",
    "other",
)

# (first code point, last code point, script), sorted by first code point.
_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "Latin"),
    (0x0061, 0x007A, "Latin"),
    (0x00C0, 0x024F, "Latin"),
    (0x0600, 0x06FF, "Arabic"),
    (0x0750, 0x077F, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"),
    (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"),
    (0x0B00, 0x0B7F, "Odia"),
    (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"),
    (0x0C80, 0x0CFF, "Kannada"),
    (0x0D00, 0x0D7F, "Malayalam"),
    (0x1E00, 0x1EFF, "Latin"),
    (0x3040, 0x30FF, "CJK"),  # kana
    (0x3400, 0x4DBF, "CJK"),
    (0x4E00, 0x9FFF, "CJK"),
    (0xA8E0, 0xA8FF, "Devanagari"),  # Devanagari Extended
    (0xAC00, 0xD7AF, "CJK"),  # Hangul syllables
    (0xF900, 0xFAFF, "CJK"),
    (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"),
)


def char_script(ch: str) -> str | None:
    """The script of one character, or None for characters that carry no script (digits, punctuation,
    spaces, and the Devanagari danda, which Bengali, Gurmukhi and others share)."""
    cp = ord(ch)
    if cp < 0x41 or cp in (0x0964, 0x0965):
        return None
    for first, last, script in _BLOCKS:
        if cp < first:
            break
        if cp <= last:
            return script
    return "other" if ch.isalpha() else None


def detect_script(text: str) -> str:
    """The script most letters of `text` belong to; "other" when it has no letters we know."""
    counts = Counter(s for s in map(char_script, text) if s is not None)
    if not counts:
        return "other"
    return counts.most_common(1)[0][0]
