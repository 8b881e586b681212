"""Safetensors checkpoints read and written a tensor (or a range of rows) at a time.

Why not `safetensors.safe_open`: it memory-maps each file, and every page a merge touches then counts in the
process's resident memory until the mapping goes, so merging three 3 GB models shows ~9 GB resident however
little the merge itself holds. Reading rows with `pread` into a buffer of our own keeps the file cache outside
the process. Writing likewise: `save_file` wants every tensor of a shard in memory at once, while a shard's
header only needs the names, dtypes and shapes, which are known before the first tensor is merged, so
`ShardedWriter` writes the header first and then each tensor's bytes as they come, and `WriteBehind` does that
on a thread of its own while the caller reads and merges the next chunk.
The format is the documented one (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
length, a JSON header, then the tensors' bytes; files written here load with `safetensors` and `transformers`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from seshu.errors import UserError
from seshu.merge.methods import chunk_rows

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' own limit on a header (it refuses larger ones as hostile).
MAX_HEADER_BYTES = 100_000_000
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# posix_fadvise is Linux/BSD only; elsewhere reads are simply not announced ahead.
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)
# Chunks a `WriteBehind` queue holds: two keep the writer busy while the reader fills the next one, and cost two
# chunks (2 x 8 MB at the default chunk size) of memory.
WRITE_BEHIND_DEPTH = 2


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{path}: not a safetensors file (header length {length} does not fit)")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has a malformed header entry") from None
        info = TensorInfo(path, dtype, shape, start + begin)
        if any(d < 0 for d in shape) or end - begin != info.nbytes or start + end > size:
            raise UserError(f"{path}: tensor {name} does not fit its shape or the file; the file is damaged")
        tensors[name] = info
    return tensors


class Checkpoint:
    """The safetensors weights of a model folder: one file, or shards with an index."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files(folder):
            self.tensors.update(read_header(file))
        self._fds: dict[Path, int] = {}

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                raise UserError(f"{index}: not a valid safetensors index") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise UserError(f"{folder}: shard {missing[0]} named in {INDEX_FILE} is missing")
            return [folder / n for n in names]
        if (folder / SINGLE_FILE).is_file():
            return [folder / SINGLE_FILE]
        shards = sorted(folder.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(p.name for p in (*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")))
        if pickles:
            raise UserError(
                f"{folder}: has only {', '.join(pickles)}: pickle checkpoints can run code when loaded, so Seshu "
                "reads safetensors only (convert it with transformers' save_pretrained first)"
            )
        raise UserError(f"{folder}: holds no safetensors weights")

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor seen as [rows, columns] (a vector is one row), in its own dtype."""
        info = self.tensors[name]
        _, cols = chunk_rows(info.shape)
        count = (stop - start) * cols
        buffer = torch.empty(count * info.dtype.itemsize, dtype=torch.uint8)
        fd = self._fd(info.file)
        view = buffer.numpy().data
        offset, done = info.offset + start * cols * info.dtype.itemsize, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise UserError(f"{info.file}: ends inside tensor {name}; the file is damaged")
            done += got
        if _WILLNEED is not None and done:  # (a length of 0 would mean: the whole rest of the file)
            # Reads go front to back (`order_by_file`): ask the kernel to fetch the next range of the same size
            # now, asynchronously, so that from a cold cache the disk reads it while this chunk is merged and
            # written. From a warm cache this finds the pages present and does nothing.
            os.posix_fadvise(fd, offset + done, done, _WILLNEED)
        return buffer.view(info.dtype).reshape(stop - start, cols)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_bytes` (a tensor larger than that
    gets a shard of its own), with an index when there is more than one shard."""

    def __init__(self, folder: Path, plan: Sequence[PlannedTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if self.shards[-1] and size + tensor.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(self.shards)
        self.names = (
            [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._queue = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._open_shard = -1
        self._written = 0  # bytes of the current tensor so far

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append `data` (all or the next part of tensor `name`, already in the planned dtype)."""
        shard_index, planned = self._queue[self._next]
        if name != planned.name or data.dtype != planned.dtype:
            raise RuntimeError(f"expected {planned.name} ({planned.dtype}), got {name} ({data.dtype})")
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._handle is not None
        self._handle.write(raw.data)
        self._written += raw.nbytes
        if self._written > planned.nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape holds")
        if self._written == planned.nbytes:
            self._next += 1
            self._written = 0

    def _start_shard(self, index: int) -> None:
        self._close_shard()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[index]:
            header[tensor.name] = {
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.nbytes],
            }
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        handle = open(self.folder / self.names[index], "wb")  # noqa: SIM115 (closed in _close_shard)
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._handle, self._open_shard = handle, index

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; the shard file names."""
        self._close_shard()
        if self._next != len(self._queue):
            raise RuntimeError(f"tensor {self._queue[self._next][1].name} was never written")
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return list(self.names)


class WriteBehind:
    """A `ShardedWriter` written on a thread of its own: `write` queues the chunk (at most `depth` wait) and
    returns, so the caller reads and merges the next chunk while this one is written. A merge from disk then takes
    about the longer of its reads and its writes instead of their sum (file reads and writes release the GIL).

    Use it as a context manager; `finish` waits for the queued chunks and closes the writer. An error on the
    writing thread is raised in the caller's at its next `write` or at `finish`."""

    def __init__(self, writer: ShardedWriter, depth: int = WRITE_BEHIND_DEPTH) -> None:
        self._writer = writer
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="seshu-write-behind", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        # After an error it keeps taking items (without writing them), so that the caller never blocks on a full
        # queue; the caller sees the error at its next call.
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(*item)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def write(self, name: str, data: torch.Tensor) -> None:
        """Queue `data` (the caller must not change it afterwards) for `ShardedWriter.write`."""
        self._raise()
        self._queue.put((name, data))

    def finish(self) -> list[str]:
        self._stop()
        self._raise()
        return self._writer.finish()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop()


def parse_size(text: str | int) -> int:
    """Bytes from '2GB', '500MB', '1.5GiB' or a plain number."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"'{text}' is not a size (like 2GB or 500MB)") from None


def order_by_file(checkpoint: Checkpoint, names: Iterable[str]) -> list[str]:
    """`names` in the order their bytes lie on disk, so that a merge reads each file front to back."""
    return sorted(names, key=lambda n: (str(checkpoint.tensors[n].file), checkpoint.tensors[n].offset))
