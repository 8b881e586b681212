"""Connecting to the coordinator's database and migrating it with Alembic: SQLite in the federation folder by
default, PostgreSQL (or anything SQLAlchemy speaks) by URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from seshu.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD = "head"
# How long a SQLite writer waits for another's lock before giving up (seconds): claims and uploads from many
# threads queue on the one database lock, each holding it for milliseconds.
SQLITE_BUSY_SECONDS = 60


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{Path(folder).resolve() / 'federation.db'}"


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite gets WAL (readers do not block the writer) and a long busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"{url}: not a database URL (e.g. sqlite:///path.db or postgresql://user@host/db)") from None
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = HEAD) -> None:
    """Migrate the database up to `revision` (the newest by default)."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to `revision` (`base` removes every table)."""
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


class Database:
    """An engine and a session factory; `transaction()` is the one way state changes (commit or nothing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def check_schema(self) -> None:
        """Refuse to run against a database that is not migrated to this Seshu's schema."""
        found, wanted = current_revision(self.engine), head_revision()
        if found != wanted:
            raise UserError(
                f"{self.engine.url.render_as_string(hide_password=True)}: database schema is at "
                f"{found or 'nothing'}, this Seshu needs {wanted}; run `seshu server migrate`"
            )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
