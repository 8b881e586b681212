"""The federation's artifact store: files and folders kept under their sha256, over fsspec.

Layout under the store's root (a local folder, `s3://bucket/prefix`, `hf://datasets/org/repo/prefix`):

    blobs/<first 2 hex>/<sha256>   every file, and every folder's manifest, stored once by its content
    tmp/                           local stores only: uploads in progress (leftovers of a crash are safe to delete)

A blob's key is its content's sha256, so a key never names two contents and a blob, once complete, never changes.
What the store does not decide is when a blob *counts*: a blob exists from the moment it is written, but only a
row that the coordinator commits to its database makes it part of a submission or a release. A crash between the
two leaves an unreferenced blob, never a reference to a missing or partial one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from seshu.errors import UserError
from seshu.hub.manifest import (
    ManifestEntry,
    check_relative_path,
    check_sha256,
    decode_manifest,
    encode_manifest,
    is_sha256,
)
from seshu.io import sha256_file, staged_dir

CHUNK = 1 << 20  # 1 MiB: large enough that per-read overhead (a ranged GET on S3) is small, small enough to stream
MAX_MANIFEST_BYTES = 64 << 20  # ~150 bytes per file: room for 400k files; anything larger is not a manifest

# What to install for a protocol whose fsspec implementation lives in an optional package.
_INSTALL_HINTS = {"s3": "pip install 'seshu[s3]'", "s3a": "pip install 'seshu[s3]'", "gs": "pip install gcsfs"}


class MissingBlobError(UserError):
    """The store holds no blob under that sha256."""


class CorruptBlobError(RuntimeError):
    """A blob's content no longer hashes to its key: the store was damaged, not the user's input."""


class Store:
    """Content-addressed put/get of files and folders on one fsspec filesystem under one root path."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        # Only a local folder has an atomic rename; every other filesystem is treated as an object store.
        self.local = isinstance(fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def blob_path(self, sha256: str) -> str:
        """The filesystem path of a blob (whether or not it exists)."""
        check_sha256(sha256)
        return f"{self.root}/blobs/{sha256[:2]}/{sha256}"

    # Writing

    def put_file(self, path: str | os.PathLike[str]) -> str:
        """Store a local file; returns its sha256."""
        return self._put_file(Path(path))[0]

    def put_stream(
        self, chunks: Iterable[bytes], expected_sha256: str | None = None, max_bytes: int | None = None
    ) -> str:
        """Store bytes as they arrive (an upload); returns their sha256.

        Refused, with nothing left in the store, when more than `max_bytes` arrive (reading stops there) or when
        the content's sha256 is not `expected_sha256`.
        """
        expected = None if expected_sha256 is None else check_sha256(expected_sha256.lower())
        tmp, sha, _ = self._spool(chunks, max_bytes)
        try:
            if expected is not None and sha != expected:
                raise UserError(f"the upload's sha256 is {sha}, not the announced {expected}; it was not stored")
            self._publish(tmp, sha)
        finally:
            tmp.unlink(missing_ok=True)
        return sha

    def put_bytes(self, data: bytes) -> str:
        """Store a small piece of content held in memory (a manifest, a JSON record); returns its sha256."""
        return self.put_stream([data])

    def put_dir(self, folder: str | os.PathLike[str]) -> str:
        """Store every file of `folder` and a manifest listing them; returns the manifest's sha256.

        Symbolic links and special files are refused: a stored folder is exactly the bytes it holds, and a link
        could pull in files from outside it. Empty sub-folders are not recorded.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; pass the folder to store")
        files = list(_folder_files(folder))  # every refusal happens before anything is stored
        entries = []
        for file, name in files:
            sha, size = self._put_file(file)
            entries.append(ManifestEntry(name, sha, size))
        return self.put_bytes(encode_manifest(entries))

    def delete(self, sha256: str) -> bool:
        """Remove a blob; False when there was none. Only the coordinator's garbage collection should call this:
        the store cannot know whether a committed row still points at the blob."""
        path = self.blob_path(sha256)
        if not self.fs.exists(path):
            return False
        self.fs.rm_file(path)
        self.fs.invalidate_cache(path)
        return True

    # Reading

    def exists(self, sha256: str) -> bool:
        return bool(self.fs.exists(self.blob_path(sha256)))

    def size(self, sha256: str) -> int:
        """The blob's size in bytes."""
        path = self.blob_path(sha256)
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            raise self._missing(sha256) from None

    def open_blob(self, sha256: str, offset: int = 0) -> BinaryIO:
        """A binary file object on the blob, positioned at `offset`; the caller closes it. Unverified: use it to
        serve bytes, and `get_file` to obtain a file whose content is checked."""
        handle = self._open(sha256)
        if offset:
            handle.seek(offset)
        return handle

    def iter_blob(self, sha256: str, start: int = 0, end: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
        """Bytes `start` up to (not including) `end` of the blob, in chunks of at most `chunk` bytes: the body of an
        HTTP Range response. A missing blob or a range outside it is refused now, before any byte is sent."""
        total = self.size(sha256)
        stop = total if end is None else end
        if not 0 <= start <= stop <= total:
            raise UserError(f"bytes {start}-{stop} are outside blob {sha256}, which holds {total} bytes")
        return self._read_range(sha256, start, stop, chunk)

    def read_bytes(self, sha256: str) -> bytes:
        """A small blob's content, verified against its sha256."""
        with self._open(sha256) as handle:
            data = handle.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise self._corrupt(sha256)
        return bytes(data)

    def get_file(self, sha256: str, dest: str | os.PathLike[str]) -> None:
        """Write the blob to `dest`, replacing it only once the whole content is written and verified; a corrupt
        blob raises CorruptBlobError and leaves `dest` as it was."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"
        try:
            digest = hashlib.sha256()
            with self._open(sha256) as source, open(tmp, "xb") as out:
                while block := source.read(CHUNK):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != sha256:
                raise self._corrupt(sha256)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_manifest(self, sha256: str) -> list[ManifestEntry]:
        """The files of a stored folder, sorted by path, each path checked to stay inside the folder."""
        if self.size(sha256) > MAX_MANIFEST_BYTES:
            raise UserError(f"blob {sha256} is too large to be a folder manifest; pass the sha256 that put_dir gave")
        return decode_manifest(self.read_bytes(sha256), f"blob {sha256}")

    def get_dir(self, manifest_sha256: str, dest: str | os.PathLike[str]) -> None:
        """Rebuild a stored folder at `dest`, every file verified; `dest` is replaced only when all of it is."""
        entries = self.read_manifest(manifest_sha256)
        with staged_dir(Path(dest)) as staging:
            for entry in entries:
                target = staging.joinpath(*entry.path.split("/"))
                self.get_file(entry.sha256, target)
                if target.stat().st_size != entry.size:
                    raise CorruptBlobError(
                        f"manifest {manifest_sha256} gives {entry.path} {entry.size} bytes but its blob holds "
                        f"{target.stat().st_size}; the manifest was not made by put_dir"
                    )

    def list_blobs(self) -> list[str]:
        """The sha256 of every blob in the store, sorted (for garbage collection and checks)."""
        found = []
        for path in self.fs.find(f"{self.root}/blobs"):
            folder, _, name = str(path).rstrip("/").rpartition("/")
            if is_sha256(name) and folder.endswith(f"/{name[:2]}"):
                found.append(name)
        return sorted(found)

    # Internals

    def _put_file(self, source: Path) -> tuple[str, int]:
        if not source.is_file():
            raise UserError(f"{source} is not a file; pass a file to store")
        if self.local:
            tmp, sha, size = self._spool(_read_chunks(source), None)
            try:
                self._publish(tmp, sha)
            finally:
                tmp.unlink(missing_ok=True)
            return sha, size
        # Object store: hash first (remembered for large files, which cards hashed already), then upload straight
        # to the final key, so no partial object is ever visible under a sha256.
        before = _stamp(source)
        sha = sha256_file(source)
        target = self.blob_path(sha)
        if not self.fs.exists(target):
            self._upload(source, target)
            if _stamp(source) != before:
                self.fs.rm_file(target)
                raise UserError(f"{source} changed while it was being stored; store it again once nothing writes it")
        return sha, before[0]

    def _spool(self, chunks: Iterable[bytes], max_bytes: int | None) -> tuple[Path, str, int]:
        """Write `chunks` to a new local temp file while hashing and counting; (temp file, sha256, size). On any
        failure the temp file is removed."""
        # A local store spools inside its own root so that publishing is a rename on the same filesystem; an
        # object store spools in the system's temp folder (TMPDIR) and uploads from there.
        folder = Path(self.root) / "tmp" if self.local else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{uuid.uuid4().hex}.partial"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "xb") as out:
                for block in chunks:
                    size += len(block)
                    if max_bytes is not None and size > max_bytes:
                        raise UserError(f"the upload is larger than the limit of {max_bytes} bytes; it was not stored")
                    digest.update(block)
                    out.write(block)
                if self.local:
                    # The blob must be on disk before the coordinator commits a row pointing at it.
                    out.flush()
                    os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _publish(self, tmp: Path, sha: str) -> None:
        """Make a complete, hashed temp file the blob `sha`. An existing blob is kept: same key, same content."""
        target = self.blob_path(sha)
        if self.local:
            if not os.path.exists(target):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                _fsync_dir(Path(target).parent)
        elif not self.fs.exists(target):
            self._upload(tmp, target)

    def _upload(self, source: Path, target: str) -> None:
        # An object store has no atomic rename, and needs none here: the key is only written once the content's
        # hash is known, an object appears only when its upload completes (S3 multipart included), and what makes
        # a blob count is the coordinator's database commit, not the store.
        self.fs.put_file(str(source), target)
        self.fs.invalidate_cache(target)

    def _open(self, sha256: str, **options: Any) -> Any:
        try:
            return self.fs.open(self.blob_path(sha256), "rb", **options)
        except FileNotFoundError:
            raise self._missing(sha256) from None

    def _read_range(self, sha256: str, start: int, stop: int, chunk: int) -> Iterator[bytes]:
        # No read cache: each read is then one ranged GET of exactly the bytes asked for, where the default
        # read-ahead would fetch a whole block (50 MiB on S3) to serve a short range.
        with self._open(sha256, cache_type="none") as handle:
            handle.seek(start)
            position = start
            while position < stop:
                block = handle.read(min(chunk, stop - position))
                if not block:
                    raise CorruptBlobError(f"blob {sha256} in {self.url} ended at byte {position}, before {stop}")
                position += len(block)
                yield bytes(block)

    def _missing(self, sha256: str) -> MissingBlobError:
        return MissingBlobError(f"there is no blob {sha256} in the store {self.url}")

    def _corrupt(self, sha256: str) -> CorruptBlobError:
        return CorruptBlobError(
            f"blob {sha256} in the store {self.url} does not hash to its name: it is corrupt; delete it and store "
            "the file again"
        )


def open_store(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Store:
    """The store at `url`: a local folder (a path or `file://`), `s3://bucket/prefix` (s3fs) or
    `hf://datasets|models/org/repo/prefix` (huggingface_hub's HfFileSystem); any other fsspec URL works too, as an
    object store. `storage_options` go to the filesystem (credentials, `endpoint_url`, `token`).

    An S3 endpoint comes, first found, from `storage_options` (`endpoint_url`, or `client_kwargs.endpoint_url`),
    $FSSPEC_S3_ENDPOINT_URL, $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL; else AWS itself.
    """
    text = os.fspath(url)
    protocol, path = split_protocol(text)
    options = dict(storage_options or {})
    if protocol in (None, "file", "local"):
        root = Path(path).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise UserError(f"store {text!r} is a file, not a folder; pass a folder (it is created if missing)")
        root.mkdir(parents=True, exist_ok=True)
        return Store(LocalFileSystem(**options), root.as_posix(), text)
    if protocol in ("s3", "s3a"):
        options = _s3_options(options)
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as err:
        hint = _INSTALL_HINTS.get(protocol, "install the fsspec package for it")
        raise UserError(f"{protocol}:// stores need a package that is missing ({err}): {hint}") from None
    except ValueError:
        raise UserError(
            f"store {text!r}: fsspec knows no protocol {protocol!r}; use a folder, s3:// or hf://"
        ) from None
    root = path.strip("/")
    if not root:
        raise UserError(f"store {text!r} names no bucket or repository; write e.g. {protocol}://bucket/prefix")
    return Store(fs, root, text)


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    client = options.get("client_kwargs") or {}
    if "endpoint_url" not in options and "endpoint_url" not in client:
        for name in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            # Read here, not left to fsspec's config (read once, at import) or botocore (versions differ), so
            # that the endpoint set in the environment when the store is opened is the one used.
            if os.environ.get(name):
                options["endpoint_url"] = os.environ[name]
                break
    # Workers and the coordinator write blobs from separate processes: a cached listing would make exists() and
    # size() answer from the past.
    options.setdefault("use_listings_cache", False)
    return options


def _folder_files(folder: Path) -> Iterator[tuple[Path, str]]:
    """Each regular file under `folder` with its posix path relative to it; links and special files refused."""

    def fail(error: OSError) -> None:  # os.walk would otherwise skip an unreadable sub-folder in silence
        raise error

    for here, dirs, files in os.walk(folder, onerror=fail):
        for name in [*dirs, *files]:
            path = Path(here, name)
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link; a stored folder holds real files only: copy it in")
            if name in files and not path.is_file():
                raise UserError(f"{path} is not a regular file (a socket, pipe or device); remove it and retry")
        for name in files:
            path = Path(here, name)
            yield path, check_relative_path(path.relative_to(folder).as_posix())


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            yield block


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes whenever a file is written: size first (the size this stamp vouches for), times, identity."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _fsync_dir(folder: Path) -> None:
    # The rename must be as durable as the content: after a power cut the coordinator's committed row must not
    # point at a blob whose directory entry was lost.
    with suppress(OSError):  # Windows cannot open a folder this way; its renames are durable enough
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
