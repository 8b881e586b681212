"""The one rule for telling a Hub id from a local path, so every command accepts the same references."""

from __future__ import annotations

import re
from pathlib import Path

# The Hub's repo ids: an optional namespace and a name, each of letters, digits, '-', '_' and '.' ("gpt2",
# "org/name"); huggingface_hub's own validator is stricter about lengths and dots, and says so when asked.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(ref: str) -> bool:
    """Whether `ref` should be sent to the Hub: it has the shape of a repo id and names nothing on disk.
    Anything that starts like a path ('.', '/', '~') or has more than one '/' is a local path."""
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")):
        return False
    return _HUB_ID.fullmatch(ref) is not None
