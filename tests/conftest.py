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


# The federation's database tests run on SQLite always and on PostgreSQL when SESHU_TEST_POSTGRES_URL names a
# server whose role may create databases (.ci/run starts one): each test gets a database of its own.
POSTGRES_ENV = "SESHU_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    import os
    import uuid

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'federation.db'}"
        return
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: CI must run the suite against PostgreSQL too")
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://seshu:seshu@127.0.0.1/postgres)")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"seshu_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
