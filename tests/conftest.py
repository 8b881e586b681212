"""Shared fixtures: a tiny tokenizer trained on the bundled corpus, and single-threaded torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from seshu import assets

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    # The test models are tiny: thread hand-offs cost more than they save, many times over on 2 busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_files() -> list[str]:
    return [assets.resolve("seshu:corpus/en.txt"), assets.resolve("seshu:corpus/hi.txt")]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_files: list[str]) -> Path:
    from seshu.data.sources import read_documents
    from seshu.tokenizer import save_tokenizer, train_tokenizer

    docs = [doc for path in corpus_files for doc in read_documents(path)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_tokenizer(docs, 400, "bpe"), out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Remembered hashes go to a folder of the test session's, not the user's ~/.cache.
    import os

    previous = os.environ.get("SESHU_CACHE_DIR")
    os.environ["SESHU_CACHE_DIR"] = str(tmp_path_factory.mktemp("seshu-cache"))
    yield
    if previous is None:
        os.environ.pop("SESHU_CACHE_DIR", None)
    else:
        os.environ["SESHU_CACHE_DIR"] = previous
