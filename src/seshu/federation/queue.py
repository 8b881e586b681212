"""The evaluation queue: jobs are rows claimed exclusively under a lease (owner, expiry, attempts).

A claim is one `UPDATE ... WHERE id = (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED) ... RETURNING` statement. On
PostgreSQL the sub-select locks the row it picks and skips rows other claimers hold, and the outer WHERE checks
again that the row is still claimable once the lock is had. SQLAlchemy drops FOR UPDATE on SQLite, where the
statement is atomic anyway: SQLite runs one writing statement at a time under its database lock, so the row the
sub-select picks cannot change before the update (a read-then-write claim from four threads gave 350 claims for
200 jobs; this one gives 200). A job whose lease ran out (its worker died or hung) is claimable again, and its
`attempts` count the claims; only the current owner can finish it, so a late reply from the old owner is refused.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from seshu.federation.models import Job, utcnow

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
DEFAULT_LEASE_SECONDS = 600.0
# A job that failed this many times (its worker reported an error, or its lease ran out) is given up.
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Claim:
    job_id: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    lease_expires: dt.datetime


def _claimable(now: dt.datetime) -> Any:
    return and_(
        Job.attempts < MAX_ATTEMPTS,
        or_(Job.status == QUEUED, and_(Job.status == RUNNING, Job.lease_expires < now)),
    )


def claim(
    session: Session, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS, kind: str = "evaluate"
) -> Claim | None:
    """Claim the oldest claimable job of `kind` for `owner`, or None when there is none. The caller commits."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=lease_seconds)
    pick = (
        select(Job.id)
        .where(Job.kind == kind, _claimable(now))
        .order_by(Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Job)
        .where(Job.id == pick, _claimable(now))
        .values(status=RUNNING, owner=owner, lease_expires=expires, attempts=Job.attempts + 1)
        .returning(Job.id, Job.kind, Job.payload, Job.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    return Claim(job_id=row.id, kind=row.kind, payload=dict(row.payload), attempts=row.attempts, lease_expires=expires)


def extend(session: Session, job_id: int, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
    """Renew `owner`'s lease on a running job; False when the lease was lost (another worker has the job)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.owner == owner, Job.status == RUNNING)
        .values(lease_expires=utcnow() + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish(session: Session, job_id: int, owner: str, status: str = DONE, error: str = "") -> bool:
    """Mark `owner`'s running job done (or failed); False when `owner` no longer holds it. The caller records the
    job's result in the same transaction, so a result and its job's completion commit together or not at all."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "lease_expires": None}
    if error:
        values["last_error"] = error[:2000]
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.owner == owner, Job.status == RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_for_retry(session: Session, job_id: int, owner: str, error: str) -> bool:
    """Give a job back after a failure of the worker's own (not of the input): queued again unless its attempts
    are spent, in which case it fails. False when `owner` no longer holds it."""
    job = session.get(Job, job_id)
    if job is None or job.owner != owner or job.status != RUNNING:
        return False
    job.last_error = error[:2000]
    job.lease_expires = None
    if job.attempts >= MAX_ATTEMPTS:
        job.status, job.finished_at = FAILED, utcnow()
    else:
        job.status, job.owner = QUEUED, None
    return True


def enqueue(session: Session, submission_id: int, payload: dict[str, Any], kind: str = "evaluate") -> Job:
    job = Job(kind=kind, submission_id=submission_id, payload=payload, status=QUEUED, attempts=0)
    session.add(job)
    session.flush()
    return job


def give_up_stranded(session: Session) -> list[int]:
    """Fail the jobs no worker will finish (running, lease expired, no attempts left: their last worker died);
    returns their submission ids, for the caller to decide in the same transaction."""
    now = utcnow()
    stuck = list(
        session.scalars(select(Job).where(Job.status == RUNNING, Job.lease_expires < now, Job.attempts >= MAX_ATTEMPTS))
    )
    for job in stuck:
        job.status, job.finished_at, job.lease_expires = FAILED, now, None
        job.last_error = job.last_error or f"its worker stopped answering on each of {job.attempts} attempts"
    return [job.submission_id for job in stuck]
