"""Reading corpora: every local format, folders, dataset ids, and a one-sentence error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seshu.config import SourceEntry
from seshu.data import sources
from seshu.data.mixing import Holdout
from seshu.data.sources import (
    SourceRecord,
    corpus_files,
    detect_text_unit,
    read_documents,
    read_records,
    source_documents,
)
from seshu.errors import UserError


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_by_line_is_one_document_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n   \nsecond line\r\nनमस्ते दुनिया\n", encoding="utf-8")
    assert list(read_documents(str(path), text_unit="line")) == ["first line", "second line", "नमस्ते दुनिया"]


PLAY = "ROMEO:\nBut soft, what light?\n\nJULIET:\nAy me!\r\n\nROMEO:\nShe speaks.\n"


def test_txt_by_paragraph_keeps_newlines_inside_blocks(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    assert list(read_documents(str(path), text_unit="paragraph")) == [
        "ROMEO:\nBut soft, what light?",
        "JULIET:\nAy me!",
        "ROMEO:\nShe speaks.",
    ]


def test_txt_by_file_is_the_whole_text_with_its_newlines(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    assert list(read_documents(str(path), text_unit="file")) == [PLAY.replace("\r\n", "\n").strip()]


def test_auto_reads_texts_whole_and_record_per_line_files_by_line(tmp_path: Path) -> None:
    play = tmp_path / "play.txt"
    play.write_text(PLAY * 20, encoding="utf-8")
    code = tmp_path / "code.txt"  # no blank line, but indented: code (or verse) stays whole
    code.write_text("def f(x):\n    y = x + 1\n    return y\nprint(f(2))\n", encoding="utf-8")
    records = tmp_path / "records.txt"
    records.write_text("".join(f"record number {i} of the corpus\n" for i in range(200)), encoding="utf-8")
    assert [detect_text_unit(p) for p in (play, code, records)] == ["file", "file", "line"]
    assert len(list(read_documents(str(play)))) == 1
    assert list(read_documents(str(code))) == [code.read_text(encoding="utf-8").strip()]
    assert len(list(read_documents(str(records)))) == 200


def test_a_long_text_comes_in_pieces_cut_at_blank_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    paragraphs = [f"paragraph {i}\n" + " ".join(["word"] * (i % 7 + 3)) for i in range(60)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    pieces = list(read_documents(str(path), text_unit="file"))
    assert len(pieces) > 5
    assert all(piece.startswith("paragraph") for piece in pieces)  # each piece starts a paragraph
    assert "\n\n".join(pieces) == path.read_text(encoding="utf-8").strip()  # nothing lost or doubled


@pytest.mark.parametrize("fraction", [0.1, 0.37])
def test_holdout_of_a_text_read_whole_is_its_end(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "book.txt"
    lines = [f"line {i}:" + " abc" * (i % 5) for i in range(500)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    train = list(read_documents(str(path), text_unit="file", holdout=Holdout(fraction, 0, "train")))
    held = list(read_documents(str(path), text_unit="file", holdout=Holdout(fraction, 0, "validation")))
    assert len(train) == len(held) == 1  # one document, split by position rather than sent to one side whole
    assert train[0] + "\n" + held[0] == path.read_text(encoding="utf-8").strip()
    share = len(held[0].encode()) / path.stat().st_size
    assert abs(share - fraction) < 0.01


def test_holdout_of_records_is_by_hash_disjoint_and_complete(tmp_path: Path) -> None:
    path = tmp_path / "records.txt"
    path.write_text("".join(f"record {i}\n" for i in range(400)) + "record 7\n", encoding="utf-8")
    train = list(read_documents(str(path), holdout=Holdout(0.25, 3, "train")))
    held = list(read_documents(str(path), holdout=Holdout(0.25, 3, "validation")))
    assert sorted(train + held) == sorted(read_documents(str(path)))
    assert not set(train) & set(held)  # the repeated record lands on one side only
    assert 60 < len(held) < 140


def test_jsonl_reads_the_configured_field_and_skips_empty_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "one", "id": 1}, {"body": ""}, {"body": None}, {"body": "two"}])
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    assert list(read_documents(str(path), "body")) == ["one", "two"]


def test_json_list_and_json_lines_both_read(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", [{"text": "c"}, {"text": "d"}])
    assert list(read_documents(str(listed))) == ["a", "b"]
    assert list(read_documents(str(lines))) == ["c", "d"]


def test_parquet_reads_row_group_by_row_group(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    table = pa.table({"text": [f"doc {i}" for i in range(7)] + [None], "n": list(range(8))})
    pq.write_table(table, path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert list(read_documents(str(path))) == [f"doc {i}" for i in range(7)]


def test_parquet_written_by_pandas(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"content": ["x y", "z"]}).to_parquet(path)
    assert list(read_documents(str(path), "content")) == ["x y", "z"]


def test_csv_handles_quoted_commas_newlines_and_numeric_looking_text(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('id,text\n1,"hello, world"\n2,"two\nlines"\n3,\n4,42\n', encoding="utf-8")
    assert list(read_documents(str(path))) == ["hello, world", "two\nlines", "42"]


def test_folder_reads_every_supported_file_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inner.txt").write_text("from b\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from a\n", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "from c"}])
    (tmp_path / "README.md").write_text("not a corpus file\n", encoding="utf-8")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("hidden\n", encoding="utf-8")
    assert list(read_documents(str(tmp_path))) == ["from a", "from b", "from c"]
    assert corpus_files(str(tmp_path)) == [
        tmp_path / "a.txt",
        tmp_path / "b" / "inner.txt",
        tmp_path / "c.jsonl",
    ]


def test_source_entry_uses_its_own_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": "one"}])
    assert list(source_documents(SourceEntry(path=str(path), text_field="body"), streaming=True)) == ["one"]


def test_missing_local_path_fails_at_call_time_without_trying_the_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not reach the Hub"))
    path = tmp_path / "corpus" / "missing.jsonl"
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file or folder"):
        read_documents(str(path))


def test_missing_field_names_file_record_line_and_the_fields_it_has(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "x", "lang": "hi"}])
    path.write_text("\n" + path.read_text(), encoding="utf-8")
    with pytest.raises(UserError) as info:
        list(read_documents(str(path)))
    message = str(info.value)
    assert f"{path}, record 2 (line 3)" in message
    assert "no 'text' field (it has: body, lang)" in message
    assert "\n" not in message


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_missing_column_names_the_file_and_its_columns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    frame = pd.DataFrame({"body": ["x"], "lang": ["en"]})
    frame.to_parquet(path) if suffix == ".parquet" else frame.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"a\.(parquet|csv): no 'text' column \(it has: body, lang\)"):
        list(read_documents(str(path)))


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    docs = read_documents(str(path))
    assert next(docs) == "ok"  # lazy: good records before the bad line still arrive
    with pytest.raises(UserError, match=r"a\.jsonl, line 2: malformed JSON"):
        next(docs)


def test_malformed_json_list_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.json, line 3, column \d+: malformed JSON"):
        list(read_documents(str(path)))


def test_record_that_is_not_an_object_or_field_that_is_not_text(tmp_path: Path) -> None:
    listed = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    listed.write_text(listed.read_text() + "[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError, match="record 2 \\(line 2\\): expected a JSON object"):
        list(read_documents(str(listed)))
    numeric = write_jsonl(tmp_path / "b.jsonl", [{"text": 3}])
    with pytest.raises(UserError, match="'text' holds a int, not text"):
        list(read_documents(str(numeric)))


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"a\.txt, line 2: not valid UTF-8"):
        list(read_documents(str(path)))


def test_empty_corpus_says_it_has_no_text(tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match=r"blank\.txt has no text"):
        list(read_documents(str(blank)))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty has no text: the folder holds no \.txt"):
        read_documents(str(empty_dir))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "a.docx"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match=r"a\.docx: unsupported file type '\.docx'; use \.txt, \.jsonl"):
        read_documents(str(path))


def test_dataset_id_is_loaded_with_name_split_and_streaming(monkeypatch) -> None:
    calls = []

    def fake_load(path, name=None, *, split, streaming):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_list([{"content": "uno"}, {"content": ""}, {"content": "dos"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = read_documents("someone/corpus", "content", split="validation", name="es", streaming=False)
    assert calls == [("someone/corpus", "es", "validation", False)]
    assert list(docs) == ["uno", "dos"]


def test_dataset_id_missing_field_names_the_record(monkeypatch) -> None:
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"body": "x"}, {"body": "y"}])
    )
    with pytest.raises(UserError, match=r"someone/corpus, record 1: no 'text' field \(it has: body\)"):
        list(read_documents("someone/corpus"))


@pytest.mark.parametrize(
    "error",
    [
        datasets.exceptions.DatasetNotFoundError("Dataset 'someone/corpus' doesn't exist on the Hub"),
        ConnectionError("Couldn't reach 'someone/corpus' on the Hub"),
        FileNotFoundError("no such dataset"),
        ValueError("BuilderConfig 'xx' not found"),
    ],
)
def test_dataset_id_that_cannot_be_loaded_is_a_user_error(monkeypatch, error: Exception) -> None:
    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing_load)
    with pytest.raises(UserError) as info:
        read_documents("someone/corpus")
    message = str(info.value)
    assert message.startswith("someone/corpus: no such file or folder, and loading it as a Hugging Face dataset")
    assert str(error).splitlines()[0] in message


def test_read_records_yields_whole_records_named_by_file_and_record(tmp_path: Path) -> None:
    lines = write_jsonl(tmp_path / "a.jsonl", [{"q": "x", "n": [1, 2]}])
    lines.write_text("\n" + lines.read_text() + "[1]\n", encoding="utf-8")
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps([{"q": "y"}]), encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}]}]), parquet)
    (tmp_path / "notes.txt").write_text("flat text is not records\n", encoding="utf-8")
    assert list(read_records(str(tmp_path))) == [
        SourceRecord(str(lines), f"{lines}, record 1 (line 2)", {"q": "x", "n": [1, 2]}),
        SourceRecord(str(lines), f"{lines}, record 2 (line 3)", [1]),  # checking the value is the caller's job
        SourceRecord(str(listed), f"{listed}, record 1", {"q": "y"}),
        SourceRecord(str(parquet), f"{parquet}, record 1", {"messages": [{"role": "user", "content": "hi"}]}),
    ]


def test_read_records_refuses_flat_text_and_empty_input(tmp_path: Path, monkeypatch) -> None:
    text = tmp_path / "a.txt"
    text.write_text("x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"a\.txt: unsupported file type '\.txt'; use \.jsonl, \.json, \.parquet"):
        read_records(str(text))
    with pytest.raises(UserError, match=r"has no records: the folder holds no \.jsonl, \.json, \.parquet file"):
        read_records(str(tmp_path))
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"e\.jsonl has no records"):
        list(read_records(str(empty)))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([{"q": "z"}]))
    assert list(read_records("someone/data")) == [SourceRecord("someone/data", "someone/data, record 1", {"q": "z"})]


def test_packaged_files_are_readable_by_their_seshu_name() -> None:
    from seshu.data.sources import read_documents

    assert next(read_documents("seshu:corpus/hi.txt"))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("fraction", [0.03, 0.1])
def test_holdout_share_is_by_bytes_whatever_the_line_ends(tmp_path: Path, newline: str, fraction: float) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(("\ufeff" + newline.join(f"line {i}:" + " abc" * (i % 5) for i in range(2000))).encode())
    held = list(read_documents(str(path), text_unit="file", holdout=Holdout(fraction, 0, "validation")))
    share = len(held[0].replace("\n", newline).encode()) / path.stat().st_size
    assert abs(share - fraction) < 0.005


def test_a_text_of_one_long_line_is_read_whole_and_still_splits_by_position(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(100_000)]
    path = tmp_path / "one-line.txt"
    path.write_text(" ".join(words), encoding="utf-8")
    assert detect_text_unit(path) == "file"
    train = list(read_documents(str(path), holdout=Holdout(0.1, 0, "train")))
    held = list(read_documents(str(path), holdout=Holdout(0.1, 0, "validation")))
    assert len(train) == len(held) == 1
    assert (train[0] + " " + held[0]).split() == words  # cut at a space, nothing lost or doubled
    assert abs(len(held[0]) / path.stat().st_size - 0.1) < 0.01


def test_a_line_longer_than_two_pieces_is_cut_at_spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "PIECE_CHARS", 100)
    words = [f"word{i}" for i in range(300)]
    path = tmp_path / "long.txt"
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    pieces = list(read_documents(str(path), text_unit="file"))
    assert len(pieces) > 5 and all(len(piece) <= 220 for piece in pieces)
    assert " ".join(pieces).split() == words
