"""From a recipe's `data:` section to the datasets of token blocks that pretraining reads.

sources -> clean (per source) -> mix by weight -> train/validation split -> tokenise and pack. Cleaning
runs inside each source, before mixing, so that oversampling a small corpus (`mix_stop: all_exhausted`)
repeats it as asked instead of having its second pass thrown away as duplicates.

The training blocks are either streamed (`data.streaming: true`: an `IterableDataset` that reads the corpus
afresh each epoch, memory bounded) or written once to Arrow files under the cache folder and memory-mapped
(memory bounded too, and indexable, so an interrupted run resumes on the exact block). The cache is keyed
on a fingerprint of the sources (paths, sizes and modification times), the settings and the tokenizer, so
rerunning a recipe reuses it and changing any of them rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from seshu.config import DataSection, SourceEntry
from seshu.data.clean import CleanStats, clean_documents
from seshu.data.mixing import Holdout, mix_sources
from seshu.data.packing import pack_documents
from seshu.data.sources import corpus_files, detect_text_unit, source_documents
from seshu.errors import UserError

# Bump when the block-building code changes in a way that makes cached blocks stale.
_FORMAT_VERSION = 2
BLOCK_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})


def training_documents(data: DataSection, seed: int, stats: CleanStats | None = None) -> Iterator[str]:
    """The cleaned, mixed training documents, without the held-out fraction when validation is one."""
    holdout = Holdout(data.validation, seed, "train") if isinstance(data.validation, float) else None
    return _mixed(data, data.train_sources(), seed, stats, holdout)


def validation_documents(data: DataSection, seed: int) -> Iterator[str]:
    """The cleaned documents of the validation sources, or the held-out fraction of the training sources
    (the very text `training_documents` leaves out: the end of each text read whole, and hashed documents
    otherwise, see `read_documents`)."""
    if isinstance(data.validation, float):
        return _mixed(data, data.train_sources(), seed, None, Holdout(data.validation, seed, "validation"))
    return _mixed(data, data.validation_sources(), seed, None, None)


_HOW = {"file": "as one text", "line": "line by line", "paragraph": "by paragraph"}


def describe_text_units(data: DataSection) -> list[str]:
    """How each source's `.txt` files are cut into documents, a line per source, saying what `auto` chose, so that
    a wrong guess shows in the run log."""
    lines = []
    for entry in [*data.train_sources(), *data.validation_sources()]:
        unit = entry.text_unit or "auto"
        texts = [f for f in corpus_files(entry.path) or [] if f.suffix.lower() == ".txt"]
        chosen = Counter(detect_text_unit(f) if unit == "auto" else unit for f in texts)
        if not chosen:
            continue
        if len(texts) == 1:
            how = f"read {_HOW[next(iter(chosen))]}"
        else:
            how = f"{len(texts):,} .txt files read " + ", ".join(f"{n:,} {_HOW[u]}" for u, n in chosen.most_common())
        lines.append(f"data: {entry.path}: {how}" + (" (text_unit: auto)" if unit == "auto" else ""))
    return lines


def build_block_datasets(
    data: DataSection, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int, cache_dir: Path
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset]:
    """The training blocks (streamed or cached on disk, see the module docstring) and up to
    `data.max_eval_blocks` validation blocks, each a dataset with one column, `input_ids`."""
    gen_kwargs: dict[str, Any] = {"data": data, "tokenizer": tokenizer, "seq_len": seq_len, "seed": seed}
    # Reading up to the first block finds a bad path or an empty corpus now, in a plain sentence, rather
    # than mid-training or wrapped in a `datasets` generation error.
    if next(_block_rows(**gen_kwargs), None) is None:
        raise _no_block("training", seq_len)
    train: datasets.Dataset | datasets.IterableDataset
    if data.streaming:
        train = datasets.IterableDataset.from_generator(_block_rows, features=BLOCK_FEATURES, gen_kwargs=gen_kwargs)
    else:
        train = cached_rows(
            _block_rows, BLOCK_FEATURES, gen_kwargs, _fingerprint(data, tokenizer, seq_len, seed), cache_dir
        )
    blocks = list(islice(pack_documents(validation_documents(data, seed), tokenizer, seq_len), data.max_eval_blocks))
    if not blocks:
        raise _no_block("validation", seq_len)
    return train, datasets.Dataset.from_dict({"input_ids": blocks}, features=BLOCK_FEATURES)


def _mixed(
    data: DataSection, entries: list[SourceEntry], seed: int, stats: CleanStats | None, holdout: Holdout | None
) -> Iterator[str]:
    factories = [partial(_cleaned_source, entry, data, stats, holdout) for entry in entries]
    return mix_sources(factories, [entry.weight for entry in entries], seed, data.mix_stop)


def _cleaned_source(
    entry: SourceEntry, data: DataSection, stats: CleanStats | None, holdout: Holdout | None
) -> Iterator[str]:
    return clean_documents(source_documents(entry, data.streaming, holdout), data.clean, stats)


def _block_rows(
    data: DataSection, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int
) -> Iterator[dict[str, list[int]]]:
    """The generator behind both training datasets: a module-level function of its arguments only, so the
    same inputs give the same blocks in any process."""
    for block in pack_documents(training_documents(data, seed), tokenizer, seq_len):
        yield {"input_ids": block}


def cached_rows(
    generator: Callable[..., Iterator[dict[str, Any]]],
    features: datasets.Features,
    gen_kwargs: dict[str, Any],
    fingerprint: str,
    cache_dir: Path,
) -> datasets.Dataset:
    """`generator(**gen_kwargs)`'s rows, written once to Arrow under `cache_dir` (keyed on `fingerprint`) and
    memory-mapped. A `UserError` the generator raises comes out as itself, not wrapped in a `datasets` generation
    error, so a bad record still reads as one sentence; a generator that yields nothing gives an empty dataset."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, cache_dir=str(cache_dir), gen_kwargs=gen_kwargs, fingerprint=fingerprint
        )
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise
    except ValueError as exc:  # how `datasets` says a generator yielded no row
        if "corresponds to no data" not in str(exc):
            raise
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


def state_digest(state: dict[str, Any]) -> str:
    """A fingerprint of everything a cached dataset depends on (a JSON-able mapping). An explicit fingerprint
    also spares `datasets` from hashing the tokenizer object, which is slow and not stable across processes."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def sources_state(section: Any) -> dict[str, list[tuple[str, int, int]] | str]:
    """`source_state` of every training and validation source of a data section (one with `train_sources()` and
    `validation_sources()`)."""
    entries = section.train_sources() + section.validation_sources()
    return {entry.path: source_state(entry.path) for entry in entries}


def _fingerprint(data: DataSection, tokenizer: PreTrainedTokenizerBase, seq_len: int, seed: int) -> str:
    """A digest of everything the training blocks depend on (validation sources are not among them)."""
    state = {
        "version": _FORMAT_VERSION,
        "data": data.model_dump(mode="json", exclude={"max_eval_blocks"}),
        "sources": {entry.path: source_state(entry.path) for entry in data.train_sources()},
        "tokenizer": tokenizer_state(tokenizer),
        "seq_len": seq_len,
        "seed": seed,
    }
    return state_digest(state)


def source_state(path: str) -> list[tuple[str, int, int]] | str:
    """Name, size and modification time of every local file (cheap, and changes whenever a file is
    edited). A dataset id stands for itself: a new revision on the Hub goes unnoticed until the cache
    folder is cleared."""
    files = corpus_files(path)
    if files is None:
        return path
    return [(str(file), stat.st_size, stat.st_mtime_ns) for file in files for stat in [file.stat()]]


def tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's full definition, plus which tokens packing uses (set on the wrapper, not in it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer)
    digest = hashlib.sha256(definition.encode()).hexdigest()
    return f"{tokenizer.bos_token_id}:{tokenizer.eos_token_id}:{digest}"


def _no_block(split: str, seq_len: int) -> UserError:
    return UserError(
        f"data: the {split} corpus yields no block of {seq_len} tokens; "
        "add text, loosen data.clean filters or lower train.seq_len"
    )
