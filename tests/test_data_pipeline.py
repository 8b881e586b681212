"""The recipe's data section end to end: split, mix, clean, and the block datasets pretraining reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from seshu.config import DataSection
from seshu.data.clean import CleanStats
from seshu.data.packing import pack_documents
from seshu.data.pipeline import build_block_datasets, training_documents, validation_documents
from seshu.errors import UserError

VOCAB = [f"w{i}" for i in range(60)]


def write_corpus(path: Path, n_docs: int, seed: int, prefix: str) -> Path:
    rng = random.Random(seed)
    docs = [f"{prefix}{i} " + " ".join(rng.choices(VOCAB, k=12)) for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": write_corpus(tmp_path / "a.jsonl", 300, 0, "a"),
        "b": write_corpus(tmp_path / "b.jsonl", 100, 1, "b"),
        "val": write_corpus(tmp_path / "val.jsonl", 30, 2, "v"),
    }


@pytest.fixture
def tokenizer(corpus: dict[str, Path]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [json.loads(line)["text"] for path in corpus.values() for line in path.read_text().splitlines()]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def section(**fields) -> DataSection:
    return DataSection.model_validate(fields)


def test_held_out_fraction_splits_training_sources_without_overlap(corpus: dict[str, Path]) -> None:
    data = section(train=str(corpus["a"]), validation=0.2)
    train = list(training_documents(data, seed=0))
    held_out = list(validation_documents(data, seed=0))
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == 300
    assert len(held_out) / 300 == pytest.approx(0.2, abs=0.07)


def test_validation_sources_are_read_and_cleaned(corpus: dict[str, Path]) -> None:
    data = section(train=str(corpus["a"]), validation=str(corpus["val"]), clean={"min_chars": 1})
    assert [d.split()[0] for d in validation_documents(data, seed=0)] == [f"v{i}" for i in range(30)]
    assert len(list(training_documents(data, seed=0))) == 300  # nothing held out of training


def test_training_mixes_sources_by_weight_and_counts_cleaning(corpus: dict[str, Path]) -> None:
    data = section(
        train=[{"path": str(corpus["a"]), "weight": 1.0}, {"path": str(corpus["b"]), "weight": 3.0}],
        validation=str(corpus["val"]),
        mix_stop="first_exhausted",
    )
    stats = CleanStats()
    docs = list(training_documents(data, seed=0, stats=stats))
    from_b = sum(d.startswith("b") for d in docs)
    # b runs out first (three times the weight, a third of the size) and ends the mix long before a would.
    assert from_b == 100
    assert 0 < len(docs) - from_b < 100
    assert stats.kept == len(docs) and stats.kept_by_script == {"Latin": len(docs)}


def test_oversampled_source_is_not_removed_as_duplicates(corpus: dict[str, Path]) -> None:
    data = section(
        train=[{"path": str(corpus["a"]), "weight": 1.0}, {"path": str(corpus["b"]), "weight": 1.0}],
        validation=str(corpus["val"]),
        mix_stop="all_exhausted",
    )
    docs = list(training_documents(data, seed=0))
    assert sum(d.startswith("b") for d in docs) > 200  # b (100 documents) repeated to keep its half


def test_non_streaming_blocks_are_cached_on_disk_and_reused(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    data = section(train=str(corpus["a"]), validation=0.1, max_eval_blocks=3)
    cache = tmp_path / "cache"
    train, val = build_block_datasets(data, tokenizer, seq_len=16, seed=0, cache_dir=cache)
    assert isinstance(train, datasets.Dataset) and train.column_names == ["input_ids"]
    assert train.cache_files and all(Path(f["filename"]).is_relative_to(cache) for f in train.cache_files)
    expected = list(pack_documents(training_documents(data, seed=0), tokenizer, 16))
    assert train["input_ids"] == expected
    assert isinstance(val, datasets.Dataset) and len(val) == 3
    assert all(len(block) == 16 for block in val["input_ids"])

    arrow = Path(train.cache_files[0]["filename"])
    written = arrow.stat().st_mtime_ns
    again, _ = build_block_datasets(data, tokenizer, seq_len=16, seed=0, cache_dir=cache)
    assert again.cache_files == train.cache_files and arrow.stat().st_mtime_ns == written
    other, _ = build_block_datasets(data, tokenizer, seq_len=32, seed=0, cache_dir=cache)
    assert other.cache_files != train.cache_files and len(other["input_ids"][0]) == 32


def test_editing_a_source_file_rebuilds_the_cache(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    data = section(train=str(corpus["a"]), validation=str(corpus["val"]))
    first, _ = build_block_datasets(data, tokenizer, seq_len=16, seed=0, cache_dir=tmp_path / "c")
    write_corpus(corpus["a"], 150, 5, "a")
    second, _ = build_block_datasets(data, tokenizer, seq_len=16, seed=0, cache_dir=tmp_path / "c")
    assert second.cache_files != first.cache_files and len(second) < len(first)


def test_streaming_blocks_match_the_cached_ones(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    fields = {"train": str(corpus["a"]), "validation": str(corpus["val"])}
    streamed, val = build_block_datasets(section(**fields, streaming=True), tokenizer, 16, 0, tmp_path)
    cached, _ = build_block_datasets(section(**fields), tokenizer, 16, 0, tmp_path)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["input_ids"] for row in streamed] == cached["input_ids"]
    assert isinstance(val, datasets.Dataset) and len(val) > 0


@pytest.mark.parametrize("streaming", [False, True])
def test_corpus_too_small_for_one_block(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path, streaming: bool
) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("w1 w2\n", encoding="utf-8")
    data = section(train=str(tiny), validation=str(corpus["val"]), streaming=streaming)
    with pytest.raises(UserError, match="the training corpus yields no block of 64 tokens"):
        build_block_datasets(data, tokenizer, seq_len=64, seed=0, cache_dir=tmp_path / "c")


def test_validation_too_small_for_one_block(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("w1 w2\n", encoding="utf-8")
    data = section(train=str(corpus["a"]), validation=str(tiny))
    with pytest.raises(UserError, match="the validation corpus yields no block of 64 tokens"):
        build_block_datasets(data, tokenizer, seq_len=64, seed=0, cache_dir=tmp_path / "c")


def broken_after_first_block(tmp_path: Path) -> Path:
    """300 good documents, then a malformed line: more than the first tokenisation batch (256 documents)
    reads, so the error comes after the first block."""
    broken = write_corpus(tmp_path / "broken.jsonl", 300, 3, "x")
    broken.write_text(broken.read_text() + '{"text": \n', encoding="utf-8")
    return broken


def test_bad_record_while_caching_is_a_user_error_not_a_generation_error(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    data = section(train=str(broken_after_first_block(tmp_path)), validation=str(corpus["val"]))
    with pytest.raises(UserError, match=r"broken\.jsonl, line 301: malformed JSON"):
        build_block_datasets(data, tokenizer, seq_len=8, seed=0, cache_dir=tmp_path / "c")


def test_bad_record_while_streaming_is_a_user_error(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    data = section(train=str(broken_after_first_block(tmp_path)), validation=str(corpus["val"]), streaming=True)
    train, _ = build_block_datasets(data, tokenizer, seq_len=8, seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match=r"broken\.jsonl, line 301: malformed JSON"):
        list(train)


def test_missing_source_fails_before_any_work(
    corpus: dict[str, Path], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    data = section(train=str(tmp_path / "nope.jsonl"), validation=str(corpus["val"]))
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file or folder"):
        build_block_datasets(data, tokenizer, seq_len=8, seed=0, cache_dir=tmp_path / "c")


def test_a_play_keeps_its_repeated_short_lines_and_its_newlines(tmp_path: Path) -> None:
    """De-duplication removes copies of documents, never the repeated lines of one text."""
    rng = random.Random(0)
    speeches = [
        f"{rng.choice(['ROMEO:', 'JULIET:', 'NURSE:'])}\n{' '.join(rng.choices(VOCAB, k=8))}\nAy.\n" for _ in range(200)
    ]
    play = tmp_path / "play.txt"
    play.write_text("\n".join(speeches), encoding="utf-8")
    data = section(train=str(play), validation=0.1)
    train = list(training_documents(data, seed=0))
    held = list(validation_documents(data, seed=0))
    assert len(train) == len(held) == 1
    whole = train[0] + "\n" + held[0]
    assert whole == play.read_text(encoding="utf-8").strip()
    assert whole.count("\nAy.\n") == 199  # every repeated line is still there, newlines and all
    # Read line by line, the same file loses every repeated line to exact de-duplication.
    by_line = list(training_documents(section(train=str(play), validation=0.1, text_unit="line"), seed=0))
    assert by_line.count("Ay.") <= 1


def test_text_unit_per_source_overrides_the_section_default(tmp_path: Path) -> None:
    play = tmp_path / "play.txt"
    play.write_text("A:\nhello there\n\nB:\nhello back\n", encoding="utf-8")
    data = section(train=[{"path": str(play), "text_unit": "paragraph"}], validation=str(play), text_unit="line")
    assert list(training_documents(data, seed=0)) == ["A:\nhello there", "B:\nhello back"]
    assert list(validation_documents(data, seed=0)) == ["A:", "hello there", "B:", "hello back"]


def test_the_run_log_says_how_each_text_source_is_cut(tmp_path: Path) -> None:
    from seshu.data.pipeline import describe_text_units

    play = tmp_path / "play.txt"
    play.write_text("A:\nhello\n\nB:\nhi\n", encoding="utf-8")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "records.txt").write_text("".join(f"record {i}\n" for i in range(50)), encoding="utf-8")
    (folder / "book.txt").write_text("Chapter 1\n\nIt was a dark night.\n", encoding="utf-8")
    (folder / "rows.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    data = section(train=[str(play), str(folder), {"path": str(play), "text_unit": "line"}], validation=0.1)
    assert describe_text_units(data) == [
        f"data: {play}: read as one text (text_unit: auto)",
        f"data: {folder}: 2 .txt files read 1 as one text, 1 line by line (text_unit: auto)",
        f"data: {play}: read line by line",
    ]
