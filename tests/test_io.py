"""seshu.io: remembered sha256 of large files, and staged folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from seshu import io


def test_large_files_hashes_are_remembered_and_renewed_when_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(io, "CACHED_HASH_BYTES", 10)
    monkeypatch.setenv("SESHU_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"0123456789abcdef")
    assert io.sha256_file(path) == hashlib.sha256(b"0123456789abcdef").hexdigest()
    remembered = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert remembered[str(path.resolve())]["sha256"] == hashlib.sha256(b"0123456789abcdef").hexdigest()

    # Same size, same mtime put back: ctime still changes, so the old hash is not trusted.
    stat = path.stat()
    path.write_bytes(b"0123456789ABCDEF")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert io.sha256_file(path) == hashlib.sha256(b"0123456789ABCDEF").hexdigest()


def test_a_remembered_hash_is_used_without_reading_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "CACHED_HASH_BYTES", 10)
    monkeypatch.setenv("SESHU_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 64)
    first = io.sha256_file(path)
    monkeypatch.setattr(io.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert io.sha256_file(path) == first


def test_small_files_and_an_unwritable_cache_are_hashed_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SESHU_CACHE_DIR", str(blocker))
    monkeypatch.setattr(io, "CACHED_HASH_BYTES", 1)
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert io.sha256_file(path) == hashlib.sha256(b"abc").hexdigest()


def test_staged_dir_leaves_the_target_alone_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), io.staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
