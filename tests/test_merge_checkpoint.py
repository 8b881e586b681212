"""`seshu.merge.checkpoint`: safetensors read a range of rows at a time and written a chunk at a time, in files
that `safetensors` itself reads; damaged or foreign checkpoints fail with one line naming the file."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seshu.errors import UserError
from seshu.merge.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    PlannedTensor,
    ShardedWriter,
    WriteBehind,
    order_by_file,
    parse_size,
    read_header,
)

TENSORS = {
    "a.weight": torch.arange(60, dtype=torch.float32).reshape(6, 10),
    "b.bias": torch.arange(7, dtype=torch.float32) * -1.5,
    "c.conv": torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2).to(torch.bfloat16),
    "d.count": torch.tensor([3, 1, 4], dtype=torch.int64),
}


def saved(folder: Path, tensors: dict[str, torch.Tensor] = TENSORS, name: str = SINGLE_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    return folder


def raw_file(path: Path, header: bytes, body: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


def test_read_header_matches_what_safetensors_wrote(tmp_path: Path) -> None:
    folder = saved(tmp_path / "m")
    infos = read_header(folder / SINGLE_FILE)
    assert set(infos) == set(TENSORS)
    for name, tensor in TENSORS.items():
        info = infos[name]
        assert (info.dtype, info.shape, info.numel) == (tensor.dtype, tuple(tensor.shape), tensor.numel())
        assert info.nbytes == tensor.numel() * tensor.element_size()
        with open(folder / SINGLE_FILE, "rb") as handle:
            handle.seek(info.offset)
            assert handle.read(info.nbytes) == tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_read_rows_gives_row_ranges_of_the_2d_view_in_the_tensors_own_dtype(tmp_path: Path) -> None:
    checkpoint = Checkpoint(saved(tmp_path / "m"))
    try:
        assert torch.equal(checkpoint.read_rows("a.weight", 2, 5), TENSORS["a.weight"][2:5])
        assert torch.equal(checkpoint.read_rows("b.bias", 0, 1), TENSORS["b.bias"].reshape(1, 7))  # a vector: one row
        conv = checkpoint.read_rows("c.conv", 1, 3)
        assert conv.dtype == torch.bfloat16 and torch.equal(conv, TENSORS["c.conv"].reshape(4, 12)[1:3])
        assert torch.equal(checkpoint.read_rows("d.count", 0, 1), TENSORS["d.count"].reshape(1, 3))
    finally:
        checkpoint.close()


def test_sharded_checkpoints_are_read_through_their_index_or_by_their_files(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    saved(folder, {"a.weight": TENSORS["a.weight"]}, "model-00001-of-00002.safetensors")
    saved(folder, {"b.bias": TENSORS["b.bias"]}, "model-00002-of-00002.safetensors")
    assert set(Checkpoint(folder).tensors) == {"a.weight", "b.bias"}  # no index: every *.safetensors
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = Checkpoint(folder)
    assert torch.equal(checkpoint.read_rows("b.bias", 0, 1)[0], TENSORS["b.bias"])
    assert order_by_file(checkpoint, ["b.bias", "a.weight"]) == ["a.weight", "b.bias"]
    checkpoint.close()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match=r"shard model-00002-of-00002\.safetensors named in .* is missing"):
        Checkpoint(folder)
    (folder / INDEX_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a valid safetensors index"):
        Checkpoint(folder)


def test_folders_without_safetensors_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no safetensors weights"):
        Checkpoint(empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match=r"has only pytorch_model\.bin: pickle checkpoints can run code"):
        Checkpoint(empty)


@pytest.mark.parametrize(
    ("header", "length", "fragment"),
    [
        (None, None, r"too short"),
        (b"{}", 1 << 40, r"header length \d+ does not fit"),
        (b"\xff\xfe not json", None, "its header is not JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (json.dumps({"x": {"dtype": "F32", "shape": [2]}}).encode(), None, "tensor x has a malformed header entry"),
        (json.dumps({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(), None, "malformed"),
        (json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(), None, "damaged"),
        (json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), None, "damaged"),
    ],
)
def test_damaged_files_fail_with_one_line_naming_the_file(
    tmp_path: Path, header: bytes | None, length: int | None, fragment: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    else:
        raw_file(path, header, length=length)  # no data bytes: the last case's 8 bytes are past the end
    with pytest.raises(UserError, match=fragment) as error:
        read_header(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="cannot read"):
        read_header(tmp_path / "missing.safetensors")


def test_a_file_cut_short_after_opening_is_named(tmp_path: Path) -> None:
    folder = saved(tmp_path / "m", {"a.weight": TENSORS["a.weight"]})
    checkpoint = Checkpoint(folder)
    data = (folder / SINGLE_FILE).read_bytes()
    (folder / SINGLE_FILE).write_bytes(data[:-16])
    with pytest.raises(UserError, match=r"ends inside tensor a\.weight; the file is damaged"):
        checkpoint.read_rows("a.weight", 0, 6)
    checkpoint.close()


def test_sharded_writer_writes_chunks_into_shards_that_safetensors_loads(tmp_path: Path) -> None:
    plan = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]
    # a.weight (240 bytes) is over the limit and gets a shard of its own; b and c (28 + 96) share one, d (24) next.
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=130)
    for name, tensor in TENSORS.items():
        rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
        for part in torch.split(rows, 2):
            writer.write(name, part)
    files = writer.finish()
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in plan)
    assert set(index["weight_map"]) == set(TENSORS)
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        (length,) = struct.unpack("<Q", (tmp_path / file).read_bytes()[:8])
        assert length % 8 == 0  # the data starts 8-byte aligned
        loaded.update(load_file(str(tmp_path / file)))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in TENSORS.items())
    assert torch.equal(Checkpoint(tmp_path).read_rows("c.conv", 0, 4), TENSORS["c.conv"].reshape(4, 12))


def test_one_shard_is_model_safetensors_without_an_index(tmp_path: Path) -> None:
    tensor = TENSORS["a.weight"]
    writer = ShardedWriter(tmp_path, [PlannedTensor("a.weight", tensor.dtype, (6, 10))], max_shard_bytes=1 << 20)
    writer.write("a.weight", tensor)
    assert writer.finish() == [SINGLE_FILE] and not (tmp_path / INDEX_FILE).exists()
    assert torch.equal(load_file(str(tmp_path / SINGLE_FILE))["a.weight"], tensor)


def test_the_writer_refuses_what_does_not_follow_its_plan(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", torch.float32, (2, 3)), PlannedTensor("b", torch.float32, (3,))]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match=r"expected a \(torch.float32\), got a \(torch.float16\)"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="more bytes than its shape holds"):
        writer.write("a", torch.zeros(3, 3))
    other = ShardedWriter(tmp_path / "o", plan, max_shard_bytes=1 << 20)
    (tmp_path / "o").mkdir()
    other.write("a", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="tensor b was never written"):
        other.finish()


def test_write_behind_writes_the_same_bytes_on_its_own_thread(tmp_path: Path) -> None:
    plan = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]
    for folder, behind in ((tmp_path / "direct", False), (tmp_path / "behind", True)):
        folder.mkdir()
        writer = ShardedWriter(folder, plan, max_shard_bytes=130)
        with WriteBehind(writer, depth=1) if behind else contextlib.nullcontext(writer) as sink:
            for name, tensor in TENSORS.items():
                for part in torch.split(tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor, 2):
                    sink.write(name, part)
            sink.finish()
    for file in sorted(p.name for p in (tmp_path / "direct").iterdir()):
        assert (tmp_path / "behind" / file).read_bytes() == (tmp_path / "direct" / file).read_bytes(), file


def test_write_behind_hands_the_writers_error_to_the_caller_and_never_blocks(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", torch.float32, (64, 3)), PlannedTensor("b", torch.float32, (3,))]
    with pytest.raises(RuntimeError, match="expected a"), WriteBehind(ShardedWriter(tmp_path, plan, 1 << 20)) as writer:
        for _ in range(50):  # far more than the queue holds: the failed thread keeps taking them
            writer.write("b", torch.zeros(3))
        writer.finish()
    with pytest.raises(KeyError), WriteBehind(ShardedWriter(tmp_path, plan, 1 << 20)) as writer:
        writer.write("a", torch.zeros(1, 3))
        raise KeyError("the caller fails")  # leaving the block stops the thread
    assert not any(t.name == "seshu-write-behind" for t in threading.enumerate())


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29), ("64kib", 2**16), ("10", 10), (123, 123)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["two GB", "5XB", "GB", ""])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UserError, match="is not a size"):
        parse_size(text)
