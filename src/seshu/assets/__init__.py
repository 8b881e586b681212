"""Files shipped inside the package (the quickstart corpus and recipe), addressed as `seshu:NAME`."""

from __future__ import annotations

from pathlib import Path

PREFIX = "seshu:"
ROOT = Path(__file__).parent


def resolve(ref: str) -> str:
    """`seshu:corpus/en.txt` -> the file's path inside the installed package; other references unchanged."""
    if not ref.startswith(PREFIX):
        return ref
    return str(ROOT / ref[len(PREFIX) :])
