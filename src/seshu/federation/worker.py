"""The evaluation worker: claim a job, score the release with the submitted adapter on the frozen sets, report.

A worker sees a job's payload only: the blind id, the declared task and language, and the hashes of the release,
the adapter and the evaluation sets; nothing in it names the donor. It runs beside the coordinator (`seshu server
start`, or `seshu server worker --dir D`, both on the federation's database and store) or anywhere else over the
HTTP API (`seshu server worker --server URL --token T`). While it works a second thread renews its lease; a worker
that dies stops renewing it, and the job goes to another worker when the lease runs out.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from seshu.errors import UserError
from seshu.federation import Report, queue
from seshu.federation.evaluation import score_folder


class JobSource(Protocol):
    """Where jobs come from and results go: the federation itself, or its HTTP API."""

    def claim(self, instance: str, lease_seconds: float) -> dict[str, Any] | None: ...
    def heartbeat(self, job_id: int, instance: str, lease_seconds: float) -> bool: ...
    def complete(self, job_id: int, instance: str, scores: dict[str, Any], seconds: float) -> str: ...
    def fail(self, job_id: int, instance: str, error: str, input_error: bool) -> None: ...
    def folder(self, manifest_sha256: str, kind: str) -> Path: ...
    def eval_sets(self, sets: dict[str, Any]) -> dict[str, Path]: ...


class LocalJobs:
    """Jobs straight from a federation's database and store (a worker on the coordinator's machine)."""

    def __init__(self, fed: Any, name: str = "local") -> None:
        self.fed = fed
        self.name = name

    def owner(self, instance: str) -> str:
        return f"{self.name}/{instance}"

    def claim(self, instance: str, lease_seconds: float) -> dict[str, Any] | None:
        from seshu.federation.decisions import claim_job

        got = claim_job(self.fed, self.owner(instance), lease_seconds)
        return None if got is None else {"job_id": got.job_id, "attempts": got.attempts, "payload": got.payload}

    def heartbeat(self, job_id: int, instance: str, lease_seconds: float) -> bool:
        with self.fed.db.transaction() as session:
            return queue.extend(session, job_id, self.owner(instance), lease_seconds)

    def complete(self, job_id: int, instance: str, scores: dict[str, Any], seconds: float) -> str:
        from seshu.federation.decisions import complete_evaluation

        return complete_evaluation(self.fed, job_id, self.owner(instance), scores, seconds).status

    def fail(self, job_id: int, instance: str, error: str, input_error: bool) -> None:
        from seshu.federation.decisions import fail_evaluation

        fail_evaluation(self.fed, job_id, self.owner(instance), error, input_error)

    def folder(self, manifest_sha256: str, kind: str) -> Path:
        return Path(self.fed.unpack(manifest_sha256, kind))

    def eval_sets(self, sets: dict[str, Any]) -> dict[str, Path]:
        from seshu.federation.releases import release_set_files

        return release_set_files(self.fed, sets)


def default_instance() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}".replace("/", "-")


def run_worker(
    source: JobSource,
    instance: str | None = None,
    *,
    lease_seconds: float = queue.DEFAULT_LEASE_SECONDS,
    poll_seconds: float = 2.0,
    once: bool = False,
    stop: threading.Event | None = None,
    wake: threading.Event | None = None,
    device: str | None = None,
    report: Report | None = None,
) -> int:
    """Work on jobs until `stop` is set (or, with `once`, until the queue is empty); returns the jobs finished.
    An idle worker looks again every `poll_seconds`, or as soon as `wake` is set (by the coordinator it runs in,
    when a submission arrives)."""
    instance = instance or default_instance()
    stop = stop or threading.Event()
    say = report or (lambda _msg: None)
    done = 0
    while not stop.is_set():
        try:
            job = source.claim(instance, lease_seconds)
        except UserError as exc:  # the coordinator is restarting or unreachable: look again later
            say(f"claiming a job failed: {exc}")
            if once:
                break
            stop.wait(poll_seconds)
            continue
        if job is None:
            if once:
                break
            (wake or stop).wait(poll_seconds)
            if wake is not None:
                wake.clear()
            continue
        done += run_job(source, job, instance, lease_seconds, device, say)
    return done


def run_job(
    source: JobSource, job: dict[str, Any], instance: str, lease_seconds: float, device: str | None, say: Report
) -> int:
    """Evaluate one claimed job and report it; 1 when the job got its result (or was failed for its input)."""
    payload, job_id = job["payload"], int(job["job_id"])
    blind = payload.get("blind_id", "?")
    what = f"{payload.get('task')}, {payload.get('language')}"
    say(f"job {job_id}: evaluating {blind} ({what}), attempt {job.get('attempts')}")
    renewing = threading.Event()
    keeper = threading.Thread(target=_keep_lease, args=(source, job_id, instance, lease_seconds, renewing), daemon=True)
    keeper.start()
    began = time.perf_counter()
    error, input_error, scores = "", False, {}
    try:
        # Fetching is the worker's side: a failure there (the network, the store) is retried by another attempt.
        release = source.folder(payload["release_manifest"], "releases")
        adapter = source.folder(payload["adapter_manifest"], "adapters")
        sets = source.eval_sets(payload["eval_sets"])
        try:
            scores = score_folder(release, adapter, sets, device=device)
        except UserError as exc:  # the adapter does not load or fit: the submission's fault, not the worker's
            error, input_error = str(exc), True
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        renewing.set()
        keeper.join()
    try:
        if error:
            source.fail(job_id, instance, error, input_error=input_error)
            outcome = "could not be evaluated" if input_error else "failed; given back for another attempt"
            say(f"job {job_id}: {blind} {outcome}: {error}")
            return 1 if input_error else 0
        status = source.complete(job_id, instance, scores, time.perf_counter() - began)
    except UserError as exc:  # the lease ran out meanwhile: another worker owns the job and its outcome
        say(f"job {job_id}: outcome dropped: {exc}")
        return 0
    say(f"job {job_id}: {blind} {status}")
    return 1


def _keep_lease(source: JobSource, job_id: int, instance: str, lease_seconds: float, stop: threading.Event) -> None:
    # Renew at a third of the lease, so that two missed renewals still leave the lease standing.
    while not stop.wait(lease_seconds / 3):
        try:
            if not source.heartbeat(job_id, instance, lease_seconds):
                return
        except Exception:  # a failed renewal is retried at the next tick; the lease covers the gap
            continue
