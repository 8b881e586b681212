"""The coordinator's state as SQLAlchemy tables. The schema itself is made by the Alembic migrations in
`seshu/federation/migrations` (tested to upgrade, downgrade and upgrade again); these classes map onto it.

Times are naive UTC datetimes taken in Python (`utcnow`), never the database's clock, so that leases compare the
same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime()}


class Client(Base):
    """A holder of a bearer token: a donor (`client`), an evaluation `worker` or an `admin`."""

    __tablename__ = "clients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the token; the token is not kept
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class EvalSet(Base):
    """A frozen evaluation set: its file is a blob in the store, named by its sha256."""

    __tablename__ = "eval_sets"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # task | general | probe
    task: Mapped[str | None] = mapped_column(String(64), nullable=True)
    language: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Release(Base):
    """One immutable version of the shared model: a folder in the store (by its manifest's sha256)."""

    __tablename__ = "releases"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(ForeignKey("releases.version"), nullable=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # {set name: {"value": float, "higher_is_better": bool, "metric": str}} on the sets in `eval_sets`.
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    eval_sets: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {set name: sha256} it was judged on
    changelog: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Upload(Base):
    """A resumable upload of one file into the coordinator's staging area (not the store)."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    received: Mapped[int] = mapped_column(Integer, default=0)
    complete: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Submission(Base):
    """An adapter offered by a client. Everything a worker or another client sees goes by `blind_id`."""

    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blind_id: Mapped[str] = mapped_column(String(32), unique=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id"))
    release_version: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(64))
    language: Mapped[str] = mapped_column(String(32))
    # received -> validated -> evaluated -> accepted | rejected; accepted -> merged
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(8))  # upload | hub
    hub_ref: Mapped[str | None] = mapped_column(String(300), nullable=True)
    adapter_manifest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    examples_claimed: Mapped[int] = mapped_column(Integer, default=0)
    answer_tokens: Mapped[int] = mapped_column(Integer, default=0)
    train_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checks: Mapped[dict[str, Any]] = mapped_column(default=dict)  # rank, norms, parameters from validation
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gains: Mapped[dict[str, Any]] = mapped_column(default=dict)
    merged_in: Mapped[int | None] = mapped_column(Integer, nullable=True)
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Job(Base):
    """A unit of work claimed exclusively under a lease; a job whose lease runs out is claimed again."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("kind", "submission_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # evaluate
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what a worker sees: no client in it
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | done | failed
    owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Evaluation(Base):
    """The one result of an evaluation job (unique per job, so a recovered job is never counted twice)."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True)
    blind_id: Mapped[str] = mapped_column(String(32), index=True)
    release_version: Mapped[int] = mapped_column(Integer)
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    worker: Mapped[str] = mapped_column(String(100))
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
