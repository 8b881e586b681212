"""The coordinator's database: migrations both ways, and exclusive job claims under leases."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, update

from seshu.errors import UserError
from seshu.federation import queue
from seshu.federation.database import Database, current_revision, downgrade, head_revision, upgrade
from seshu.federation.layout import POLICY, SETTINGS, Federation
from seshu.federation.models import Base, Client, Job, Release, Submission


def _database(url: str) -> Database:
    db = Database(url)
    upgrade(db.engine)
    return db


def _submissions(db: Database, count: int) -> list[int]:
    with db.transaction() as session:
        client = Client(name="donor", role="client", token_hash="0" * 64)
        session.add(client)
        session.flush()
        subs = [
            Submission(
                blind_id=f"b{i:05d}",
                client_id=client.id,
                release_version=0,
                task="instruct",
                language="en",
                status="validated",
                source="upload",
            )
            for i in range(count)
        ]
        session.add_all(subs)
        session.flush()
        ids = [s.id for s in subs]
        for sid in ids:
            queue.enqueue(session, sid, {"blind_id": f"b{sid}"})
    return ids


def _federation(folder: Path, url: str) -> Federation:
    """A federation's settings, policy, schema and release v0 (with an instruct score), without model files."""
    (folder / SETTINGS).write_text(yaml.safe_dump({"db": url, "store": str(folder / "store")}))
    (folder / POLICY).write_text("acceptance: {min_task_gain: 0.0}\n")
    fed = Federation.open(folder)
    upgrade(fed.db.engine)
    reference = {"instruct": {"value": 10.0, "higher_is_better": False, "metric": "answer_ppl"}}
    with fed.db.transaction() as session:
        session.add(Release(version=0, manifest_sha256="0" * 64, metrics=reference, eval_sets={}))
    return fed


def test_migrations_upgrade_downgrade_upgrade(database_url: str) -> None:
    db = Database(database_url)
    upgrade(db.engine)
    assert current_revision(db.engine) == head_revision()
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    downgrade(db.engine, "base")
    assert current_revision(db.engine) is None
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    with pytest.raises(UserError, match="seshu server migrate"):
        db.check_schema()
    upgrade(db.engine)
    db.check_schema()
    assert {"clients", "submissions", "jobs", "evaluations", "releases"} <= set(inspect(db.engine).get_table_names())
    db.dispose()


def test_four_workers_claim_200_jobs_exactly_once(database_url: str) -> None:
    db = _database(database_url)
    _submissions(db, 200)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while True:
            with db.transaction() as session:
                got = queue.claim(session, owner)
                if got is None:
                    return
                assert queue.finish(session, got.job_id, owner)
            with lock:
                claimed.append(got.job_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 200
    assert len(set(claimed)) == 200
    with db.read() as session:
        assert session.scalar(select(func.count()).where(Job.status == queue.DONE)) == 200
        assert Counter(session.scalars(select(Job.attempts))) == {1: 200}
    db.dispose()


def test_expired_lease_is_claimed_again_and_old_owner_cannot_finish(database_url: str) -> None:
    db = _database(database_url)
    _submissions(db, 1)
    with db.transaction() as session:
        first = queue.claim(session, "dead-worker", lease_seconds=60)
    assert first is not None and first.attempts == 1
    with db.transaction() as session:
        assert queue.claim(session, "other") is None  # the lease holds
        session.execute(update(Job).values(lease_expires=dt.datetime(2000, 1, 1)))  # the dead worker's lease ends
    with db.transaction() as session:
        second = queue.claim(session, "other")
    assert second is not None and second.job_id == first.job_id and second.attempts == 2
    with db.transaction() as session:
        assert not queue.finish(session, first.job_id, "dead-worker")
        assert not queue.extend(session, first.job_id, "dead-worker")
        assert queue.extend(session, first.job_id, "other")
        assert queue.finish(session, first.job_id, "other")
    db.dispose()


def test_failed_attempts_are_retried_then_given_up(database_url: str) -> None:
    db = _database(database_url)
    _submissions(db, 1)
    for attempt in range(1, queue.MAX_ATTEMPTS + 1):
        with db.transaction() as session:
            got = queue.claim(session, "w")
            assert got is not None and got.attempts == attempt
            assert queue.release_for_retry(session, got.job_id, "w", f"boom {attempt}")
    with db.transaction() as session:
        assert queue.claim(session, "w") is None
        job = session.scalars(select(Job)).one()
        assert job.status == queue.FAILED and job.last_error == f"boom {queue.MAX_ATTEMPTS}"
    db.dispose()


def test_four_workers_record_exactly_200_evaluations(database_url: str, tmp_path: Path) -> None:
    """The whole completion path (claim, evaluation row, decision) from four threads: one evaluation per job."""
    from seshu.federation.decisions import complete_evaluation
    from seshu.federation.models import Evaluation

    fed = _federation(tmp_path, database_url)
    _submissions(fed.db, 200)

    def work(owner: str) -> None:
        while True:
            with fed.db.transaction() as session:
                got = queue.claim(session, owner)
            if got is None:
                return
            better = {"instruct": {"value": 9.0, "higher_is_better": False, "metric": "answer_ppl"}}
            complete_evaluation(fed, got.job_id, owner, better, 0.0)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with fed.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 200
        assert len(set(session.scalars(select(Evaluation.job_id)))) == 200
        assert Counter(session.scalars(select(Submission.status))) == {"accepted": 200}
    fed.close()


def test_a_job_whose_workers_all_died_is_given_up_and_its_submission_rejected(
    database_url: str, tmp_path: Path
) -> None:
    from seshu.federation.decisions import claim_job

    fed = _federation(tmp_path, database_url)
    _submissions(fed.db, 1)
    for attempt in range(1, queue.MAX_ATTEMPTS + 1):
        got = claim_job(fed, f"dies-{attempt}", 60)
        assert got is not None and got.attempts == attempt
        with fed.db.transaction() as session:  # the worker dies: its lease runs out
            session.execute(update(Job).values(lease_expires=dt.datetime(2000, 1, 1)))
    assert claim_job(fed, "late", 60) is None
    with fed.db.read() as session:
        job = session.scalars(select(Job)).one()
        assert job.status == queue.FAILED and "stopped answering" in job.last_error
        sub = session.scalars(select(Submission)).one()
        assert sub.status == "rejected" and "no worker finished it" in sub.reason
    fed.close()
