"""Folder manifests: the list of files (relative path, sha256, size) that a stored folder is made of.

Pure functions only: the store (`seshu.hub.store`) reads and writes the bytes. A manifest is checked the same way
when it is made and when it is read back, because a manifest can come from anywhere (an upload, an old store) and
`get_dir` must never write outside the folder it rebuilds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from seshu.errors import UserError

FORMAT = "seshu-folder/1"

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a stored folder: its posix path relative to the folder, its content's sha256 and size."""

    path: str
    sha256: str
    size: int


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 as the store writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def check_sha256(value: str) -> str:
    """`value` if it is a sha256, else a UserError: a blob key is built from it, so nothing else may pass."""
    if not is_sha256(value):
        raise UserError(f"{value!r} is not a sha256 (64 lowercase hex digits)")
    return value


def check_relative_path(path: str) -> str:
    """`path` if it names a file inside a folder on every system, else a UserError.

    Refused: absolute paths, drives, empty, `.` and `..` parts, and backslashes (a separator on Windows, so
    `a\\..\\..\\x` would leave the folder there even though it is one harmless name on Linux).
    """
    parts = path.split("/")
    if (
        not path
        or "\\" in path
        or "\0" in path
        or PurePosixPath(path).is_absolute()
        or PureWindowsPath(path).drive
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UserError(f"file name {path!r} would leave its folder; store only plain relative names")
    return path


def encode_manifest(entries: list[ManifestEntry]) -> bytes:
    """The manifest's canonical bytes: sorted by path, fixed key order and spacing, so one folder's content always
    gives one manifest sha256."""
    checked = _checked(entries, "the folder")
    files = [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in checked]
    text = json.dumps({"format": FORMAT, "files": files}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def decode_manifest(data: bytes, where: str) -> list[ManifestEntry]:
    """The entries of a manifest read from `where` (named in errors), checked as strictly as when it was made."""
    try:
        loaded = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        loaded = None
    if not isinstance(loaded, dict) or loaded.get("format") != FORMAT or not isinstance(loaded.get("files"), list):
        raise UserError(f"{where} is not a Seshu folder manifest (expected JSON with format {FORMAT!r})")
    entries = []
    for item in loaded["files"]:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and is_sha256(item.get("sha256"))
            and type(item.get("size")) is int
            and item["size"] >= 0
        ):
            raise UserError(f"{where} has a malformed entry {item!r}; expected {{path, sha256, size}}")
        entries.append(ManifestEntry(item["path"], item["sha256"], item["size"]))
    return _checked(entries, where)


def _checked(entries: list[ManifestEntry], where: str) -> list[ManifestEntry]:
    """Entries sorted by path, each path safe, none twice, and no file standing where another needs a folder
    (`a` and `a/b`), which could not both be written."""
    ordered = sorted(entries, key=lambda e: e.path)
    names = set()
    for entry in ordered:
        check_relative_path(entry.path)
        if entry.path in names:
            raise UserError(f"{where} lists {entry.path!r} twice")
        names.add(entry.path)
    for entry in ordered:
        parents = entry.path.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            if "/".join(parents[:depth]) in names:
                raise UserError(f"{where} lists {entry.path!r} inside {'/'.join(parents[:depth])!r}, which is a file")
    return ordered
