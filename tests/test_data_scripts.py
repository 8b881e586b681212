"""Script detection by Unicode block: the majority script of a document's letters."""

from __future__ import annotations

import pytest

from seshu.data.scripts import SCRIPTS, char_script, detect_script


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("The quick brown fox", "Latin"),
        ("Ça été très bien, Đà Nẵng", "Latin"),
        ("नमस्ते दुनिया", "Devanagari"),
        ("আমি বাংলায় গান গাই", "Bengali"),
        ("ਸਤਿ ਸ੍ਰੀ ਅਕਾਲ", "Gurmukhi"),
        ("કેમ છો", "Gujarati"),
        ("ନମସ୍କାର", "Odia"),
        ("வணக்கம் உலகம்", "Tamil"),
        ("నమస్కారం", "Telugu"),
        ("ನಮಸ್ಕಾರ", "Kannada"),
        ("നമസ്കാരം", "Malayalam"),
        ("مرحبا بالعالم", "Arabic"),
        ("你好世界", "CJK"),
        ("こんにちは", "CJK"),
        ("안녕하세요", "CJK"),
        ("Привет мир", "other"),
    ],
)
def test_detects_the_script_of_each_family(text: str, script: str) -> None:
    assert detect_script(text) == script


def test_majority_wins_in_code_mixed_text() -> None:
    assert detect_script("मैं office जा रहा हूँ और फिर घर") == "Devanagari"
    assert detect_script("please call me ASAP यार") == "Latin"


def test_text_without_letters_is_other() -> None:
    assert detect_script("") == "other"
    assert detect_script("123 456 !?") == "other"


def test_shared_marks_carry_no_script() -> None:
    assert char_script(" ") is None
    assert char_script("7") is None
    assert char_script("\u0964") is None  # danda, shared by several Indic scripts
    assert detect_script("। ॥ hello") == "Latin"


def test_every_answer_is_a_known_script() -> None:
    samples = ["abc", "अ", "ক", "ਕ", "ક", "କ", "க", "క", "ಕ", "ക", "ع", "中", "Ж", "1"]
    assert {detect_script(s) for s in samples} <= set(SCRIPTS)
