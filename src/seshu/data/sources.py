"""Text documents from wherever a corpus lives: local files and folders, or a Hugging Face dataset id.

Every reader is a generator that holds one line, one JSON record or one Parquet/CSV batch at a time, so a
corpus of any size streams through in bounded memory (the one exception is a `.json` file holding a single
JSON list, which has to be parsed whole). Bad input becomes a `UserError` that names the file, the line or
record, and what to do about it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from seshu import assets
from seshu.config import SourceEntry, TextUnit
from seshu.data.clean import normalize
from seshu.data.mixing import Holdout, is_validation
from seshu.errors import UserError, first_line
from seshu.hub.ids import is_hub_id

# Rows per Parquet batch: enough to amortise Arrow's per-batch cost, few enough to stay at a few MB.
_BATCH_ROWS = 1024
_CSV_BLOCK_BYTES = 1 << 22
# A text read whole (`file`) reaches the pipeline in pieces of about this many characters, cut at a blank line
# where there is one: memory stays bounded on a file of any size, and the separator packing puts between
# pieces comes once per ~250k tokens, too rarely to teach the model anything.
PIECE_CHARS = 1 << 20
# `auto` decides from the start of a file: a text with this share of blank lines (paragraphs, speeches,
# functions) or of indented lines (code, verse) is read whole; a file with neither is one record per line.
_AUTO_SAMPLE_BYTES = 1 << 20
_AUTO_MIN_BLANK = 0.02
_AUTO_MIN_INDENTED = 0.10
# Past this many characters, a line across the held-out cut is split at a space rather than at its end.
_LONG_LINE = 1 << 16


def read_documents(
    path: str,
    text_field: str = "text",
    *,
    text_unit: TextUnit = "auto",
    holdout: Holdout | None = None,
    split: str = "train",
    name: str | None = None,
    streaming: bool = True,
) -> Iterator[str]:
    """The non-empty texts of a file, a folder (every supported file inside, recursively, in sorted order)
    or, when no such local path exists, a Hugging Face dataset id.

    `.jsonl`/`.json` records, `.parquet` and `.csv` rows hold a document in `text_field`. A `.txt` file is
    cut by `text_unit`: `line` (one document per non-empty line), `paragraph` (blocks between blank lines,
    newlines kept), `file` (the whole text, newlines kept, in pieces of about `PIECE_CHARS`), or `auto`
    (`file` for a text with blank or indented lines, such as a book, a play or code; `line` for a file with
    neither, such as a corpus of one record per line).

    `holdout` keeps one side of a train/validation split: a text read whole is split by position (its last
    `fraction` is held out), any other document by a hash of its normalised text (`is_validation`).

    The path is checked (and a dataset id loaded) at call time, so a wrong path fails before any work starts;
    the documents themselves are read lazily.
    """
    local = _local(path)
    if not local.exists():
        documents = _hub_documents(path, text_field, split=split, name=name, streaming=streaming)
        return _kept(_require_text(documents, path), holdout)
    files = _corpus_files(local)
    if holdout is None:
        return _require_text(_files_documents(files, text_field, text_unit, None), path)
    # A text read whole gives only its side of the split, which may be empty while the source is not: the
    # pipeline then says which split has no text. A source with no text at all is named here, as without a split.
    whole = partial(_files_documents, files, text_field, text_unit, None)
    return _require_text(_files_documents(files, text_field, text_unit, holdout), path, has_text=whole)


def _local(path: str) -> Path:
    """`path` as a local path; `seshu:NAME` names a file shipped in the package (the sample corpus)."""
    return Path(assets.resolve(path)).expanduser()


def source_documents(entry: SourceEntry, streaming: bool, holdout: Holdout | None = None) -> Iterator[str]:
    """`read_documents` for one `train`/`validation` entry of a recipe."""
    return read_documents(
        entry.path,
        entry.text_field or "text",
        text_unit=entry.text_unit or "auto",
        holdout=holdout,
        split=entry.split,
        name=entry.name,
        streaming=streaming,
    )


def corpus_files(path: str) -> list[Path] | None:
    """The files `read_documents(path)` would read, or None when `path` is not local (a dataset id)."""
    local = _local(path)
    return _corpus_files(local) if local.exists() else None


@dataclass(frozen=True)
class SourceRecord:
    """One record as read, before any of its fields is looked at (that is the caller's job, so that a caller
    which skips bad records can skip this one too)."""

    source: str  # the file, or the dataset id, it came from: records of one source share a layout
    where: str  # how errors name it: "FILE, record N (line L)", the style of every error in this module
    value: Any  # the parsed JSON value or table row; normally a dict


# Structured records live in these; .txt and .csv hold flat text, not records with nested fields.
RECORD_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")


def read_records(
    path: str, *, split: str = "train", name: str | None = None, streaming: bool = True
) -> Iterator[SourceRecord]:
    """The records of a `.jsonl`/`.json`/`.parquet` file, of a folder (those files inside, recursively, in
    sorted order) or, when no such local path exists, of a Hugging Face dataset id, for readers that need
    whole records rather than one text field (instruction data).

    As in `read_documents`, the path is checked at call time and the records are read lazily, one line,
    record or Parquet batch at a time; malformed JSON, bad UTF-8 or a path without records is a `UserError`.
    """
    local = _local(path)
    if local.exists():
        records = _files_records(_corpus_files(local, RECORD_SUFFIXES, "records"))
    else:
        dataset = _load_hub_dataset(path, split=split, name=name, streaming=streaming)
        records = (SourceRecord(path, f"{path}, record {n}", row) for n, row in enumerate(dataset, 1))
    return _require_records(records, path)


def _files_records(files: list[Path]) -> Iterator[SourceRecord]:
    readers = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}
    for file in files:
        for where, value in readers[file.suffix.lower()](file):
            yield SourceRecord(str(file), where, value)


def _require_records(records: Iterator[SourceRecord], path: str) -> Iterator[SourceRecord]:
    empty = True
    for record in records:
        empty = False
        yield record
    if empty:
        raise UserError(f"{path} has no records: it is empty; point at a file or dataset that holds some")


def _corpus_files(local: Path, suffixes: Collection[str] | None = None, what: str = "text") -> list[Path]:
    """The supported files at `local` (a file or a folder); `suffixes` narrows what counts as supported."""
    allowed = SUPPORTED_SUFFIXES if suffixes is None else tuple(suffixes)
    supported = ", ".join(allowed)
    if local.is_file():
        if local.suffix.lower() not in allowed:
            raise UserError(f"{local}: unsupported file type '{local.suffix}'; use {supported}")
        return [local]
    files = sorted(
        p
        for p in local.rglob("*")
        if p.is_file()
        and p.suffix.lower() in allowed
        and not any(part.startswith(".") for part in p.relative_to(local).parts)
    )
    if not files:
        raise UserError(f"{local} has no {what}: the folder holds no {supported} file")
    return files


def _files_documents(files: list[Path], text_field: str, text_unit: TextUnit, holdout: Holdout | None) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() == ".txt":
            yield from _read_txt(file, text_unit, holdout)
            continue
        reader = _reader_for(file)
        assert reader is not None  # _corpus_files only lists supported files
        yield from _kept(reader(file, text_field), holdout)


def _kept(documents: Iterable[str], holdout: Holdout | None) -> Iterator[str]:
    """The documents on `holdout`'s side of the split (all of them without one). The hash is taken on the
    normalised text, as cleaning leaves it, so every copy of a document lands on the same side and
    de-duplication cannot leak one from training into validation."""
    if holdout is None:
        yield from documents
        return
    want = holdout.side == "validation"
    for text in documents:
        if is_validation(normalize(text), holdout.fraction, holdout.seed) == want:
            yield text


def _require_text(
    documents: Iterator[str], path: str, has_text: Callable[[], Iterator[str]] | None = None
) -> Iterator[str]:
    """Pass documents through, and fail if there are none (and `has_text`, all of the source's documents when
    `documents` are one side of a split, has none either): an empty corpus is a mistake in the recipe, and
    saying so here beats a puzzling "no block of N tokens" much later."""
    empty = True
    for text in documents:
        empty = False
        yield text
    if empty and (has_text is None or next(has_text(), None) is None):
        raise UserError(f"{path} has no text: every document in it is empty; point the recipe at a corpus")


# --- local formats -------------------------------------------------------------------------------------


def _read_txt(file: Path, text_unit: TextUnit, holdout: Holdout | None) -> Iterator[str]:
    unit = text_unit if text_unit != "auto" else detect_text_unit(file)
    if unit == "file":
        yield from _text_pieces(file, holdout)
    elif unit == "paragraph":
        yield from _kept(_paragraphs(_text_lines(file)), holdout)
    else:
        yield from _kept((line.rstrip("\r\n") for line in _lines(file) if line.strip()), holdout)


def detect_text_unit(file: Path) -> Literal["line", "file"]:
    """What `auto` reads `file` as, from its first MiB: `file` when enough lines are blank or indented (the
    shape of prose, plays, verse and code) or there is one line only, `line` otherwise (one record per line)."""
    with open(file, "rb") as handle:
        head = handle.read(_AUTO_SAMPLE_BYTES).decode("utf-8", errors="replace")
    lines = head.strip("\r\n").splitlines()
    if len(lines) <= 1:  # a text without line breaks (or with one line only) is one text, not one record
        return "file"
    blank = sum(1 for line in lines if not line.strip())
    indented = sum(1 for line in lines if line[:1] in (" ", "\t") and line.strip())
    filled = len(lines) - blank
    if blank >= _AUTO_MIN_BLANK * len(lines) or (filled and indented >= _AUTO_MIN_INDENTED * filled):
        return "file"
    return "line"


def _text_lines(file: Path) -> Iterator[str]:
    """`_lines` with Windows line ends as '\\n': inside a document a newline is one character, as it is to the
    tokenizer and the model."""
    for line in _lines(file):
        yield line[:-2] + "\n" if line.endswith("\r\n") else line


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blocks of lines between blank lines, with their inner newlines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip()
            block = []
    if block:
        yield "".join(block).rstrip()


def _text_pieces(file: Path, holdout: Holdout | None) -> Iterator[str]:
    """A whole text in pieces of about `PIECE_CHARS`, each ending at a blank line where one comes within
    another `PIECE_CHARS` (else at a line end, or at a space inside a line longer than that). With `holdout`,
    only one side of `_positional_side` is read."""
    piece: list[str] = []
    size = 0
    for line in _positional_side(file, holdout) if holdout is not None else _text_lines(file):
        for part in _spans(line):
            piece.append(part)
            size += len(part)
            if size >= PIECE_CHARS and (not part.strip() or size >= 2 * PIECE_CHARS):
                if text := "".join(piece).strip():
                    yield text
                piece, size = [], 0
    if text := "".join(piece).strip():
        yield text


def _positional_side(file: Path, holdout: Holdout) -> Iterator[str]:
    """The lines (Windows line ends as '\\n') on `holdout`'s side of a text cut once by position: `1 - fraction` of
    its bytes go to training, cut at the next line end, or at the next space when the line there runs on for
    more than `_LONG_LINE` characters (a text of one long line still splits)."""
    with open(file, "rb") as handle:
        offset = 3 if handle.read(3) == b"\xef\xbb\xbf" else 0  # the byte-order mark `_lines` drops
    cut = int(file.stat().st_size * (1 - holdout.fraction))
    validation = holdout.side == "validation"
    for raw in _lines(file):
        start, offset = offset, offset + len(raw.encode("utf-8"))
        line = raw[:-2] + "\n" if raw.endswith("\r\n") else raw
        if offset <= cut or (start < cut and len(line) <= _LONG_LINE):
            if not validation:
                yield line
        elif start >= cut:
            if not validation:
                return
            yield line
        else:  # a long line across the cut: split it at the first space past the cut
            at = len(raw.encode("utf-8")[: cut - start].decode("utf-8", errors="ignore"))
            space = next((i for i in range(at, len(line)) if line[i].isspace()), len(line))
            yield line[space:] if validation else line[:space]


def _spans(line: str) -> Iterator[str]:
    """`line`, cut at spaces into spans of about `PIECE_CHARS` when it is longer than twice that."""
    while len(line) > 2 * PIECE_CHARS:
        space = next((i for i in range(PIECE_CHARS, len(line)) if line[i].isspace()), len(line))
        yield line[: space + 1]
        line = line[space + 1 :]
    if line:
        yield line


def _read_jsonl(file: Path, text_field: str) -> Iterator[str]:
    yield from _texts(_jsonl_records(file), text_field)


def _read_json(file: Path, text_field: str) -> Iterator[str]:
    yield from _texts(_json_records(file), text_field)


def _texts(records: Iterator[tuple[str, Any]], text_field: str) -> Iterator[str]:
    for where, record in records:
        text = _record_text(record, text_field, where)
        if text:
            yield text


def _json_records(file: Path) -> Iterator[tuple[str, Any]]:
    """(where, value) for each record of a JSON Lines file, or of a `.json` file holding one JSON list
    (the first character tells which, whatever the suffix)."""
    with open(file, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(file)
        return
    try:
        records = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{file}, line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg}); fix the file"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{file}: not valid UTF-8 text; convert it to UTF-8") from None
    for record_no, record in enumerate(records, 1):
        yield f"{file}, record {record_no}", record


def _jsonl_records(file: Path) -> Iterator[tuple[str, Any]]:
    record_no = 0
    for line_no, line in enumerate(_lines(file), 1):
        if not line.strip():
            continue
        record_no += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}, line {line_no}: malformed JSON ({exc.msg}); fix or remove that line") from None
        yield f"{file}, record {record_no} (line {line_no})", record


def _parquet_file(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{file}: not a readable Parquet file ({exc}); re-export it") from None


def _parquet_records(file: Path) -> Iterator[tuple[str, Any]]:
    """(where, row as a dict) for each row; nested columns (lists of message structs) come back as Python
    lists of dicts, just as the same records read from JSON."""
    record_no = 0
    for batch in _parquet_file(file).iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            record_no += 1
            yield f"{file}, record {record_no}", row


def _read_parquet(file: Path, text_field: str) -> Iterator[str]:
    parquet = _parquet_file(file)
    _require_column(file, text_field, parquet.schema_arrow.names)
    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        yield from _column_texts(file, text_field, batch.column(0).to_pylist())


def _read_csv(file: Path, text_field: str) -> Iterator[str]:
    """CSV with a header row; quoted fields may span lines, as documents often do."""
    header = next(csv.reader(_lines(file)), None)
    if header is None:
        return
    _require_column(file, text_field, header)
    try:
        reader = pa_csv.open_csv(
            file,
            read_options=pa_csv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(include_columns=[text_field], column_types={text_field: pa.string()}),
        )
        for batch in reader:
            yield from _column_texts(file, text_field, batch.column(0).to_pylist())
    except pa.ArrowInvalid as exc:
        raise UserError(f"{file}: malformed CSV ({exc}); fix the file or export it again") from None


# Readers of record formats, by suffix; `.txt` has a reader of its own (`_read_txt`), as it has no fields.
_READERS: dict[str, Callable[[Path, str], Iterator[str]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", *_READERS)


def _reader_for(file: Path) -> Callable[[Path, str], Iterator[str]] | None:
    return _READERS.get(file.suffix.lower())


def _lines(file: Path) -> Iterator[str]:
    """The lines of a UTF-8 file (a leading byte-order mark removed). Lines are decoded one by one, so a
    bad byte is reported on its own line rather than somewhere in an 8 KB read buffer."""
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{file}, line {line_no}: not valid UTF-8; convert the file to UTF-8") from None


def _record_text(record: Any, text_field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{text_field}' field, found {_kind(record)}")
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise UserError(
            f"{where}: no '{text_field}' field (it has: {fields}); set text_field to the one holding the text"
        )
    return _as_text(record[text_field], text_field, where)


def _column_texts(file: Path, text_field: str, values: list[Any]) -> Iterator[str]:
    for value in values:
        text = _as_text(value, text_field, str(file))
        if text:
            yield text


def _as_text(value: Any, text_field: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise UserError(f"{where}: '{text_field}' holds {_kind(value)}, not text; set text_field to a text field")


def _require_column(file: Path, text_field: str, columns: list[str]) -> None:
    if text_field not in columns:
        raise UserError(
            f"{file}: no '{text_field}' column (it has: {', '.join(columns) or 'none'}); "
            "set text_field to the one holding the text"
        )


def _kind(value: Any) -> str:
    kinds: dict[type, str] = {dict: "an object", list: "a list"}
    return kinds.get(type(value), f"a {type(value).__name__}")


# --- Hugging Face datasets -----------------------------------------------------------------------------


def _hub_documents(path: str, text_field: str, *, split: str, name: str | None, streaming: bool) -> Iterator[str]:
    dataset = _load_hub_dataset(path, split=split, name=name, streaming=streaming)
    return _dataset_texts(dataset, path, text_field)


def _load_hub_dataset(path: str, *, split: str, name: str | None, streaming: bool) -> Iterable[Any]:
    # Anything that is not a Hub id and does not exist is a mistyped path: sending it to the Hub would only add a
    # minute of network retries to the error.
    if not is_hub_id(path) or Path(path).suffix.lower() in SUPPORTED_SUFFIXES:
        raise UserError(f"{path}: no such file or folder; check the path")
    # Imported here: `datasets` takes a second to import and local corpora never need it.
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, split=split, streaming=streaming)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise UserError(
            f"{path}: no such file or folder, and loading it as a Hugging Face dataset failed ({first_line(exc)}); "
            "check the path, or the dataset id, its name/split and your connection"
        ) from None
    return dataset


def _dataset_texts(dataset: Iterable[Any], path: str, text_field: str) -> Iterator[str]:
    for record_no, record in enumerate(dataset, 1):
        text = _record_text(record, text_field, f"{path}, record {record_no}")
        if text:
            yield text
