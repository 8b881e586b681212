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


def test_staged_dir_replaces_the_target_and_leaves_nothing_aside(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with io.staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.*.partial, no .out.*.old


def test_staged_dir_puts_the_old_folder_back_when_the_new_one_cannot_be_renamed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def fail_second(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the first moves the old folder aside; the second would move the new one in
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk gone"), io.staged_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert calls[0][0] == "out" and calls[0][1].endswith(".old") and calls[1][1] == "out"
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
