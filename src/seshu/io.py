"""Files written so that a failure never leaves half an artifact behind, and files hashed once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# Files from this size on have their sha256 remembered (see `sha256_file`); smaller ones hash in no time.
CACHED_HASH_BYTES = 1 << 24


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256. Large files' hashes are remembered in Seshu's cache folder, keyed by the file's identity
    and change stamps (device, inode, size, mtime and ctime, which no write leaves as it was): hashing a model's
    weights costs seconds per GB, and cards hash the same inputs again on every merge, fold or fine-tune."""
    path = Path(path)
    stat = path.stat()
    stamp = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    key = str(path.resolve())
    cached = _hash_cache().get(key) if stat.st_size >= CACHED_HASH_BYTES else None
    if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("sha256"), str):
        return str(cached["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    if stat.st_size >= CACHED_HASH_BYTES:
        _remember_hash(key, stamp, value)
    return value


def cache_dir() -> Path:
    """Seshu's cache folder: $SESHU_CACHE_DIR, else $XDG_CACHE_HOME/seshu, else ~/.cache/seshu."""
    if os.environ.get("SESHU_CACHE_DIR"):
        return Path(os.environ["SESHU_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seshu"


def _hash_cache() -> dict[str, object]:
    try:
        loaded = json.loads((cache_dir() / "sha256.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _remember_hash(key: str, stamp: list[int], value: str) -> None:
    entries = {k: v for k, v in _hash_cache().items() if Path(k).exists()}  # forget files that are gone
    entries[key] = {"stamp": stamp, "sha256": value}
    with suppress(OSError):  # a read-only home is no reason to fail: the hash is simply not remembered
        write_text_atomic(cache_dir() / "sha256.json", json.dumps(entries))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `target` only when the block succeeds.

    On any error the temporary folder is removed and `target` is left as it was. The old `target` is renamed
    aside (to a hidden sibling) before the new one is renamed in, and deleted only then: a crash at any moment
    leaves the old folder or the new one at `target` (or, between the two renames, the old one aside, under
    `.NAME.*.old`), never neither.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old folder there stays whole (at `target`, or aside and put back on a failed
    rename) until the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    # A fresh name, not a reserved empty folder: renaming a folder onto an existing one fails on Windows.
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old one back: the caller sees the error and the old folder
        raise
    shutil.rmtree(aside, ignore_errors=True)


def publish_files(staging: Path, target: Path) -> None:
    """Move every file of `staging` into `target` (created if needed), each by atomic rename."""
    target.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        dest = target / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staging.rmdir()
