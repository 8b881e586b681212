"""Turning an evaluation into a decision: the worker's scores are recorded once, with the job's completion and the
policy's verdict, in one transaction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from seshu.errors import UserError
from seshu.federation import queue
from seshu.federation.evaluation import task_set
from seshu.federation.layout import Federation
from seshu.federation.models import Evaluation, Job, Release, Submission, utcnow
from seshu.federation.policy import Evidence, Score, decide
from seshu.federation.submissions import Conflict, NotFound, current_release


def scores_of(raw: Mapping[str, Any]) -> dict[str, Score]:
    """Stored scores ({"value", "higher_is_better", "metric"} per set) as the policy's `Score`s; a `None` value (a
    diverged figure) becomes NaN, which every rule takes for the worst score."""
    out = {}
    for name, item in raw.items():
        if not isinstance(item, Mapping) or "value" not in item or "higher_is_better" not in item:
            raise UserError(f"score of '{name}' must be an object with value and higher_is_better")
        value = item["value"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"score of '{name}' must be a number or null, not {value!r}")
        out[name] = Score(math.nan if value is None else float(value), bool(item["higher_is_better"]))
    return out


def complete_evaluation(
    fed: Federation, job_id: int, owner: str, scores: Mapping[str, Any], seconds: float
) -> Submission:
    """Record `owner`'s result for `job_id` and decide its submission. Raises Conflict when `owner` no longer
    holds the job (its lease ran out and another worker has it): the late result is dropped."""
    checked = scores_of(scores)
    with fed.db.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if not queue.finish(session, job_id, owner):
            raise Conflict(f"job {job_id} is not held by {owner} (its lease ran out); the result was dropped")
        submission = session.get(Submission, job.submission_id)
        assert submission is not None
        session.add(
            Evaluation(
                job_id=job_id,
                blind_id=submission.blind_id,
                release_version=submission.release_version,
                scores=dict(scores),
                worker=owner,
                seconds=seconds,
            )
        )
        release = session.get(Release, submission.release_version)
        assert release is not None
        latest = current_release(session)
        submission.scores = dict(scores)
        submission.decided_at = utcnow()
        if latest.version != release.version:
            submission.status = "rejected"
            submission.reason = (
                f"release v{release.version} was superseded by v{latest.version} before this was decided; "
                f"train on v{latest.version} and submit again"
            )
            return submission
        evidence = Evidence(
            task=task_set(submission.task, submission.language, release.metrics),
            scores=checked,
            reference=scores_of(release.metrics),
            total_norm=float(submission.checks.get("total_norm", 0.0)),
        )
        decision = decide(fed.policy, evidence)
        submission.gains = {k: (v if math.isfinite(v) else None) for k, v in decision.gains.items()}
        submission.status = "accepted" if decision.accepted else "rejected"
        submission.reason = "; ".join(decision.reasons)
    return submission


def fail_evaluation(fed: Federation, job_id: int, owner: str, error: str, input_error: bool) -> None:
    """A worker could not evaluate: an error of the input (the adapter does not load) rejects the submission at
    once; any other error gives the job back for another attempt (failing it after the last)."""
    with fed.db.transaction() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        submission = session.get(Submission, job.submission_id)
        assert submission is not None
        if input_error:
            if not queue.finish(session, job_id, owner, status=queue.FAILED, error=error):
                raise Conflict(f"job {job_id} is not held by {owner}")
        elif not queue.release_for_retry(session, job_id, owner, error):
            raise Conflict(f"job {job_id} is not held by {owner}")
        if input_error or job.status == queue.FAILED:
            submission.status, submission.reason, submission.decided_at = (
                "rejected",
                f"evaluation failed: {error}",
                utcnow(),
            )


def claim_job(fed: Federation, owner: str, lease_seconds: float) -> queue.Claim | None:
    """Claim the next evaluation for `owner`. Jobs whose workers died on every attempt are given up first, and
    their submissions rejected, so that nothing waits forever."""
    with fed.db.transaction() as session:
        for submission_id in queue.give_up_stranded(session):
            submission = session.get(Submission, submission_id)
            if submission is not None and submission.status == "validated":
                submission.status, submission.decided_at = "rejected", utcnow()
                submission.reason = f"evaluation failed: no worker finished it in {queue.MAX_ATTEMPTS} attempts"
    with fed.db.transaction() as session:
        return queue.claim(session, owner, lease_seconds)
