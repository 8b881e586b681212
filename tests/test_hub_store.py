"""seshu.hub.store: content-addressed files and folders on a local folder, and on S3 (a real moto server)."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import s3_bucket_fixture, s3_endpoint_fixture  # noqa: F401  (the s3_bucket, s3_endpoint fixtures)

from seshu.errors import UserError
from seshu.hub.manifest import ManifestEntry
from seshu.hub.store import CorruptBlobError, MissingBlobError, Store, open_store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative posix path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stored_files(store: Store) -> list[str]:
    """Every object under the store's root, whatever its name (blobs, temp files, anything else)."""
    return sorted(str(p).removeprefix(store.root + "/") for p in store.fs.find(store.root))


def make_folder(root: Path) -> Path:
    folder = root / "adapter"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(random.Random(1).randbytes(3000) + bytes(range(256)))
    (folder / "adapter_config.json").write_text('{"r": 8}', encoding="utf-8")
    (folder / "sub" / "same.json").write_text('{"r": 8}', encoding="utf-8")  # same content: one blob
    (folder / "sub" / "deeper" / "empty.bin").write_bytes(b"")
    (folder / "sub" / "नमस्ते.txt").write_text("नमस्ते\n", encoding="utf-8")
    return folder


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "store")


# Round trips, run on a local folder and on S3.


def check_file_round_trip(store: Store, tmp_path: Path) -> None:
    data = random.Random(0).randbytes(2_500_000)  # more than two read chunks
    source = tmp_path / "weights.bin"
    source.write_bytes(data)

    digest = store.put_file(source)
    assert digest == sha(data)
    assert store.blob_path(digest) == f"{store.root}/blobs/{digest[:2]}/{digest}"
    assert store.exists(digest) and store.size(digest) == len(data)
    assert store.put_file(source) == digest  # stored once
    assert stored_files(store) == [f"blobs/{digest[:2]}/{digest}"]

    out = tmp_path / "out" / "weights.bin"
    store.get_file(digest, out)
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["weights.bin"]

    with store.open_blob(digest, offset=1_000_000) as handle:
        assert handle.read(10) == data[1_000_000:1_000_010]
    assert b"".join(store.iter_blob(digest, 5, 1_500_000, chunk=400_000)) == data[5:1_500_000]
    assert [len(b) for b in store.iter_blob(digest, 0, 1_000_000, chunk=400_000)] == [400_000, 400_000, 200_000]
    assert b"".join(store.iter_blob(digest, len(data))) == b""

    assert store.delete(digest) and not store.exists(digest) and not store.delete(digest)
    with pytest.raises(MissingBlobError, match=digest):
        store.get_file(digest, out)
    assert out.read_bytes() == data  # a failed get leaves dest alone


def check_folder_round_trip(store: Store, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    manifest = store.put_dir(folder)

    entries = store.read_manifest(manifest)
    assert [e.path for e in entries] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/deeper/empty.bin",
        "sub/same.json",
        "sub/नमस्ते.txt",
    ]
    assert all(
        e == ManifestEntry(e.path, sha((folder / e.path).read_bytes()), (folder / e.path).stat().st_size)
        for e in entries
    )
    assert store.put_dir(folder) == manifest  # canonical manifest: same folder, same sha256
    assert len(store.list_blobs()) == 5  # four distinct contents and the manifest

    dest = tmp_path / "restored"
    dest.mkdir()
    (dest / "stale.txt").write_text("from before")
    store.get_dir(manifest, dest)
    assert tree(dest) == tree(folder)


def check_failed_uploads_leave_nothing(store: Store) -> None:
    data = b"x" * 5000
    before = stored_files(store)
    with pytest.raises(UserError, match="not the announced"):
        store.put_stream([data[:3000], data[3000:]], expected_sha256=sha(b"something else"))
    assert stored_files(store) == before

    sent = []

    def chunks() -> Iterator[bytes]:
        for i in range(10):
            sent.append(i)
            yield data[i * 500 : (i + 1) * 500]

    with pytest.raises(UserError, match="limit of 4999 bytes"):
        store.put_stream(chunks(), max_bytes=4999)
    assert stored_files(store) == before
    assert len(sent) == 10  # the last chunk crossed the limit; reading stopped there

    assert store.put_stream(chunks(), expected_sha256=sha(data).upper(), max_bytes=5000) == sha(data)
    assert store.read_bytes(sha(data)) == data


def test_local_file_round_trip(store: Store, tmp_path: Path) -> None:
    check_file_round_trip(store, tmp_path)


def test_local_folder_round_trip(store: Store, tmp_path: Path) -> None:
    check_folder_round_trip(store, tmp_path)


def test_local_failed_uploads_leave_nothing(store: Store) -> None:
    check_failed_uploads_leave_nothing(store)
    assert not any((Path(store.root) / "tmp").iterdir())


def test_s3_round_trips_and_failed_uploads(s3_bucket: str, tmp_path: Path) -> None:
    s3 = open_store(f"s3://{s3_bucket}/federation")  # endpoint from AWS_ENDPOINT_URL
    for part in ("file", "folder"):
        (tmp_path / part).mkdir()
    check_file_round_trip(s3, tmp_path / "file")
    check_folder_round_trip(s3, tmp_path / "folder")
    check_failed_uploads_leave_nothing(s3)


def test_s3_corrupt_blob_and_explicit_endpoint(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there: the option must win
    s3 = open_store(f"s3://{s3_bucket}", storage_options={"endpoint_url": s3_endpoint})
    digest = s3.put_bytes(b"good content")
    with s3.fs.open(s3.blob_path(digest), "wb") as handle:
        handle.write(b"evil content")
    dest = tmp_path / "out.bin"
    with pytest.raises(CorruptBlobError, match="corrupt"):
        s3.get_file(digest, dest)
    assert list(tmp_path.iterdir()) == []


# Integrity and refusals (local).


def test_a_corrupt_blob_is_detected_and_dest_is_left_alone(store: Store, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    manifest = store.put_dir(folder)
    weights = sha((folder / "adapter_model.safetensors").read_bytes())
    blob = Path(store.blob_path(weights))
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # same size, one byte changed

    dest = tmp_path / "weights.bin"
    dest.write_bytes(b"old")
    with pytest.raises(CorruptBlobError, match=f"blob {weights} .* corrupt"):
        store.get_file(weights, dest)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "store", "weights.bin"]

    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "keep.txt").write_text("old")
    with pytest.raises(CorruptBlobError):
        store.get_dir(manifest, restored)
    assert tree(restored) == {"keep.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "restored", "store", "weights.bin"]


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "a/../../evil", "a\\..\\..\\evil", "C:/evil", "a//b", "./a"])
def test_a_manifest_naming_a_path_outside_the_folder_is_refused(store: Store, tmp_path: Path, name: str) -> None:
    payload = store.put_bytes(b"payload")
    manifest = {"format": "seshu-folder/1", "files": [{"path": name, "sha256": payload, "size": 7}]}
    bad = store.put_bytes(json.dumps(manifest).encode())
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(UserError, match="would leave its folder"):
        store.get_dir(bad, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_inconsistent_manifests_and_non_manifests_are_refused(store: Store, tmp_path: Path) -> None:
    payload = store.put_bytes(b"payload")
    clash = [{"path": "a", "sha256": payload, "size": 7}, {"path": "a/b", "sha256": payload, "size": 7}]
    bad = store.put_bytes(json.dumps({"format": "seshu-folder/1", "files": clash}).encode())
    with pytest.raises(UserError, match="inside 'a', which is a file"):
        store.read_manifest(bad)
    with pytest.raises(UserError, match="not a Seshu folder manifest"):
        store.get_dir(payload, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_put_dir_refuses_links_and_names_unsafe_elsewhere(store: Store, tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (folder / "link.txt").symlink_to(outside)
    with pytest.raises(UserError, match=r"link\.txt is a symbolic link"):
        store.put_dir(folder)
    (folder / "link.txt").unlink()

    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UserError, match="linked is a symbolic link"):
        store.put_dir(folder)
    (folder / "linked").unlink()

    (folder / "a\\..\\..\\evil").write_text("x")  # one name here, a path that climbs out on Windows
    with pytest.raises(UserError, match="would leave its folder"):
        store.put_dir(folder)
    assert store.list_blobs() == []  # refused before anything was stored


def test_bad_keys_and_missing_inputs_are_user_errors(store: Store, tmp_path: Path) -> None:
    for key in ["../../etc/passwd", "ab", "A" * 64, "g" * 64]:
        with pytest.raises(UserError, match="is not a sha256"):
            store.exists(key)
    with pytest.raises(UserError, match="is not a file"):
        store.put_file(tmp_path / "nope.bin")
    with pytest.raises(UserError, match="is not a folder"):
        store.put_dir(tmp_path / "nope")
    with pytest.raises(MissingBlobError):
        store.size("0" * 64)
    digest = store.put_bytes(b"0123456789")
    with pytest.raises(UserError, match="outside blob"):
        store.iter_blob(digest, 5, 11)


# Opening stores by URL.


def test_local_paths_and_file_urls_open_the_same_store(tmp_path: Path) -> None:
    by_path = open_store(tmp_path / "s")
    digest = by_path.put_bytes(b"hello")
    by_url = open_store(f"file://{(tmp_path / 's').as_posix()}")
    assert by_url.local and by_url.read_bytes(digest) == b"hello"
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        open_store(tmp_path / "f")


def test_s3_endpoint_comes_from_options_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("s3fs", reason="s3:// stores need s3fs (pip install -e '.[s3]')")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws.invalid")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", "http://fsspec.invalid")
    store = open_store("s3://bucket/some/prefix", storage_options={"anon": True})
    assert type(store.fs).__name__ == "S3FileSystem" and not store.local
    assert store.root == "bucket/some/prefix"
    assert store.fs.endpoint_url == "http://fsspec.invalid"
    explicit = open_store("s3://bucket", storage_options={"anon": True, "endpoint_url": "http://mine.invalid"})
    assert explicit.fs.endpoint_url == "http://mine.invalid"


def test_hf_urls_resolve_to_the_hub_filesystem_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfFileSystem

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = open_store("hf://datasets/seshu-org/federation/store", storage_options={"token": "hf_dummy"})
    assert isinstance(store.fs, HfFileSystem) and not store.local
    assert store.blob_path("a" * 64) == f"datasets/seshu-org/federation/store/blobs/aa/{'a' * 64}"


def test_unknown_protocols_and_bare_buckets_are_user_errors() -> None:
    with pytest.raises(UserError, match="knows no protocol 'nosuch'"):
        open_store("nosuch://bucket")
    with pytest.raises(UserError, match="names no bucket"):
        open_store("memory://")
