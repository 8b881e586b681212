"""Receiving adapters: resumable uploads into staging, then one submission checked, stored and queued.

An upload is one file, announced with its size and sha256, sent in any number of PUTs at the offset the server
reports (so a cut connection resumes where the server's copy ends), hashed as it streams and capped at the
announced size. A submission names its files by upload (or an adapter on the Hugging Face Hub, fetched at a
pinned commit) and is checked before anything is stored: a rejected one is recorded with its reason and leaves
nothing in the store. An accepted one's folder goes into the store first and becomes visible only with the
database commit that records it and queues its evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from seshu.errors import UserError
from seshu.federation import queue
from seshu.federation.layout import Federation
from seshu.federation.models import Client, Release, Submission, Upload

MAX_FILES = 32


class Conflict(UserError):
    """The request is well-formed but clashes with the state (an upload at the wrong offset): HTTP 409."""


class NotFound(UserError):
    """HTTP 404."""


def current_release(session: Session) -> Release:
    version = session.scalar(select(func.max(Release.version)))
    if version is None:
        raise UserError("the federation has no release; it was not initialised")
    release = session.get(Release, version)
    assert release is not None
    return release


# --------------------------------------------------------------------------------------------------
# Uploads


def create_upload(fed: Federation, client: Client, size: int, sha256: str) -> Upload:
    limit = fed.policy.limits.max_adapter_bytes
    if size < 1 or size > limit:
        raise UserError(f"upload of {size} bytes: files must be 1 to {limit} bytes (the policy's max_adapter_bytes)")
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise UserError("sha256 must be 64 hexadecimal digits")
    with fed.db.transaction() as session:
        upload = Upload(id=secrets.token_hex(16), client_id=client.id, size=size, sha256=sha256, received=0)
        session.add(upload)
    fed.upload_path(upload.id).touch()
    return upload


def get_upload(session: Session, client: Client, upload_id: str) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None or upload.client_id != client.id:  # another client's upload does not exist for this one
        raise NotFound(f"upload {upload_id} not found")
    return upload


def upload_offset(fed: Federation, upload: Upload) -> int:
    """Bytes the server holds: the staging file is the truth (it is appended to before the database learns of it,
    so after a crash it may be ahead of `received`, never behind)."""
    path = fed.upload_path(upload.id)
    return path.stat().st_size if path.exists() else 0


# Running hashes of uploads in progress, so that a file is hashed once as it streams; after a restart the hash
# of what is on disk is taken again once. `_ACTIVE` holds the uploads a request is writing: one writer each.
_HASHERS: dict[str, tuple[int, Any]] = {}
_ACTIVE: set[str] = set()
_HASHERS_LOCK = threading.Lock()
# Body chunks arrive in tens of KB; they are written (and hashed) off the event loop a megabyte at a time.
WRITE_BYTES = 1 << 20


def _hasher(path: Path, upload_id: str, offset: int) -> Any:
    with _HASHERS_LOCK:
        held = _HASHERS.pop(upload_id, None)
    if held is not None and held[0] == offset:
        return held[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = offset
        while remaining and (block := handle.read(min(remaining, 1 << 20))):
            digest.update(block)
            remaining -= len(block)
    return digest


def _begin(fed: Federation, client: Client, upload_id: str, offset: int) -> tuple[Upload, Any, Any]:
    """Checks before a part is written, and the open file and running hash it is written through."""
    with fed.db.read() as session:
        upload = get_upload(session, client, upload_id)
    if upload.complete:
        raise Conflict(f"upload {upload_id} is complete already")
    with _HASHERS_LOCK:
        if upload_id in _ACTIVE:
            raise Conflict(f"upload {upload_id} is being written by another request; ask for its offset and resume")
        _ACTIVE.add(upload_id)
    try:
        held = upload_offset(fed, upload)
        if offset != held:
            raise Conflict(f"upload {upload_id} continues at offset {held}, not {offset}")
        path = fed.upload_path(upload_id)
        digest = _hasher(path, upload_id, held)
        handle = open(path, "r+b")  # noqa: SIM115 (closed by append_upload)
        handle.seek(held)
    except BaseException:
        with _HASHERS_LOCK:
            _ACTIVE.discard(upload_id)
        raise
    return upload, handle, digest


def _write(handle: Any, digest: Any, blocks: list[bytes]) -> None:
    for block in blocks:
        handle.write(block)
        digest.update(block)


# File writes and hashing run on a few threads of their own: on Starlette's shared pool, a hundred uploads'
# megabytes queued behind each other and in front of every small request's token check (measured with 100
# concurrent 20 MB uploads: health-check p50 250 ms on the shared pool, 20-40 ms with this one; bench/README.md).
WRITE_THREADS = 4
_WRITE_LIMITERS: dict[int, Any] = {}


def _write_limiter() -> Any:
    """The capacity limiter of the running event loop (anyio's limiters belong to one loop)."""
    import asyncio

    import anyio

    loop = id(asyncio.get_running_loop())
    if loop not in _WRITE_LIMITERS:
        _WRITE_LIMITERS.clear()  # a new loop (a restarted server in the same process): the old one is gone
        _WRITE_LIMITERS[loop] = anyio.CapacityLimiter(WRITE_THREADS)
    return _WRITE_LIMITERS[loop]


def _finish(fed: Federation, upload: Upload, received: int, digest: Any) -> Upload:
    complete = received == upload.size
    if complete and digest.hexdigest() != upload.sha256:
        _discard_upload(fed, upload.id)
        raise UserError(
            f"upload {upload.id}: the file's sha256 is {digest.hexdigest()}, not {upload.sha256}; send it again"
        )
    with fed.db.transaction() as session:
        row = session.get(Upload, upload.id)
        if row is None:
            raise NotFound(f"upload {upload.id} not found")
        row.received, row.complete = received, complete
    return row


async def append_upload(
    fed: Federation, client: Client, upload_id: str, offset: int, chunks: AsyncIterator[bytes]
) -> Upload:
    """Append the request body to the upload at `offset` (which must be where the server's copy ends). When the
    last byte arrives the sha256 is checked: a mismatch deletes the upload. File and database work runs in
    worker threads, so that a hundred uploads at once do not stall the event loop that receives them."""
    from anyio import to_thread
    from starlette.concurrency import run_in_threadpool

    upload, handle, digest = await run_in_threadpool(_begin, fed, client, upload_id, offset)
    limiter = _write_limiter()
    received, pending, size = offset, [], 0
    try:
        try:
            async for chunk in chunks:
                if received + size + len(chunk) > upload.size:
                    raise UserError(f"upload {upload_id} sent more than the {upload.size} bytes it announced")
                pending.append(chunk)
                size += len(chunk)
                if size >= WRITE_BYTES:
                    await to_thread.run_sync(_write, handle, digest, pending, limiter=limiter)
                    received, pending, size = received + size, [], 0
        finally:
            # What arrived before a cut connection is kept: the client resumes after it.
            if size:
                await to_thread.run_sync(_write, handle, digest, pending, limiter=limiter)
                received += size
            handle.close()
            with _HASHERS_LOCK:
                if received < upload.size:
                    _HASHERS[upload_id] = (received, digest)
        # Still this request's: nobody may append (or see a full file as resumable) until it is marked complete.
        return await run_in_threadpool(_finish, fed, upload, received, digest)
    except UserError:
        await run_in_threadpool(_discard_upload, fed, upload_id)
        raise
    finally:
        with _HASHERS_LOCK:
            _ACTIVE.discard(upload_id)


def _discard_upload(fed: Federation, upload_id: str) -> None:
    with _HASHERS_LOCK:
        _HASHERS.pop(upload_id, None)
    with fed.db.transaction() as session:
        row = session.get(Upload, upload_id)
        if row is not None:
            session.delete(row)
    fed.upload_path(upload_id).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Submissions


@dataclass(frozen=True)
class SubmissionRequest:
    task: str
    language: str
    release_version: int
    files: dict[str, str]  # file name -> upload id (empty for a Hub submission)
    hub: str | None = None  # REPO[@REVISION]
    examples: int = 0
    answer_tokens: int = 0
    train_config: dict[str, Any] | None = None


def submit(
    fed: Federation,
    client: Client,
    request: SubmissionRequest,
    fetch_hub: Callable[[str, Path], str] | None = None,
) -> Submission:
    """Check the submission and record it: validated and queued for evaluation, or rejected with its reason.

    Bad requests (unknown uploads, a task without an evaluation set) raise UserError and record nothing; an
    adapter that fails its checks is recorded as rejected, so that its donor sees why."""
    from seshu.evaluate.tasks import TASKS

    if request.task not in TASKS:
        raise UserError(f"unknown task '{request.task}'; choose one of: {', '.join(TASKS)}")
    if not request.language or len(request.language) > 32:
        raise UserError("language must be a short code such as hi or en")
    if (request.hub is None) == (not request.files):
        raise UserError("a submission is either uploaded files or a Hub reference, exactly one of them")
    if len(request.files) > MAX_FILES:
        raise UserError(f"a submission holds at most {MAX_FILES} files")
    from seshu.federation.validation import check_name

    for name in request.files:
        check_name(name)
    with fed.db.read() as session:
        release = current_release(session)
        uploads = {name: get_upload(session, client, uid) for name, uid in request.files.items()}
        eval_sets = dict(release.eval_sets)
    for name, upload in uploads.items():
        if not upload.complete:
            raise Conflict(
                f"upload {upload.id} ({name}) is not complete: it holds {upload.received} of {upload.size} bytes"
            )

    blind_id = secrets.token_hex(8)
    folder = fed.scratch(f"submission-{blind_id}-")
    fetch = fetch_hub or partial(fetch_hub_adapter, max_bytes=fed.policy.limits.max_adapter_bytes)
    try:
        hub_ref = None
        try:
            if request.hub is not None:
                hub_ref = fetch(request.hub, folder)
            else:
                for name, upload in uploads.items():
                    os.link(fed.upload_path(upload.id), folder / name)  # same disk: a link, not a copy
            checks = _check(fed, folder, request, release)
        except UserError as exc:
            # The checks name the folder they read, which is the coordinator's staging path: the donor sees
            # "the adapter" instead.
            reason = str(exc).replace(str(folder), "the adapter")
            recorded = _record(fed, client, request, blind_id, release, eval_sets, None, hub_ref, {}, reason)
        else:
            stored = _evaluated_part(folder, release.version)
            manifest = fed.store.put_dir(stored)
            recorded = _record(fed, client, request, blind_id, release, eval_sets, manifest, hub_ref, checks, "")
    finally:
        fed.forget_scratch(folder)
    # Only once the uploads' rows are gone with the commit: after any other failure they can be submitted again.
    for upload in uploads.values():
        fed.upload_path(upload.id).unlink(missing_ok=True)
    return recorded


def _evaluated_part(folder: Path, version: int) -> Path:
    """The part of a checked submission that is stored, evaluated and merged: the adapter's weights and its config,
    with the base path the donor trained from replaced by the release. A donor's card (its recipe names local
    paths) and tokenizer files are left out: a worker must learn nothing of who sent it, and a donor's tokenizer
    must not change how the release's own text is scored."""
    from seshu.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    kept = folder / "stored"
    kept.mkdir()
    os.link(folder / ADAPTER_WEIGHTS, kept / ADAPTER_WEIGHTS)
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = f"seshu-federation-release-v{version}"
    (kept / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return kept


def _check(fed: Federation, folder: Path, request: SubmissionRequest, release: Release) -> dict[str, Any]:
    from seshu.federation.validation import validate_adapter

    if request.release_version != release.version:
        raise UserError(
            f"the adapter was trained on release v{request.release_version}, but the current release is "
            f"v{release.version}; pull it and train again"
        )
    from seshu.federation.evaluation import task_set

    judged_on = task_set(request.task, request.language, release.eval_sets)
    if judged_on not in release.eval_sets:
        raise UserError(
            f"this federation has no evaluation set for task '{request.task}' (it judges: "
            f"{', '.join(sorted(release.eval_sets))}); submit an adapter for one of those tasks"
        )
    base = fed.unpack(release.manifest_sha256, "releases")
    checked = validate_adapter(folder, base, fed.policy)
    return {
        "rank": checked.rank,
        "target_modules": list(checked.target_modules),
        "total_norm": checked.total_norm,
        "max_module_norm": max(checked.module_norms.values(), default=0.0),
        "parameters": checked.parameters,
    }


def _record(
    fed: Federation,
    client: Client,
    request: SubmissionRequest,
    blind_id: str,
    release: Release,
    eval_sets: dict[str, Any],
    manifest: str | None,
    hub_ref: str | None,
    checks: dict[str, Any],
    reason: str,
) -> Submission:
    with fed.db.transaction() as session:
        submission = Submission(
            blind_id=blind_id,
            client_id=client.id,
            release_version=request.release_version,
            task=request.task,
            language=request.language,
            status="rejected" if reason else "validated",
            reason=reason,
            source="hub" if request.hub else "upload",
            hub_ref=hub_ref or request.hub,
            adapter_manifest=manifest,
            examples_claimed=max(0, request.examples),
            answer_tokens=max(0, request.answer_tokens),
            train_config=request.train_config or {},
            checks=checks,
        )
        session.add(submission)
        session.flush()
        for upload_id in request.files.values():
            row = session.get(Upload, upload_id)
            if row is not None:
                session.delete(row)
        if not reason:
            assert manifest is not None
            queue.enqueue(
                session,
                submission.id,
                {
                    "blind_id": blind_id,
                    "task": request.task,
                    "language": request.language,
                    "release_version": release.version,
                    "release_manifest": release.manifest_sha256,
                    "adapter_manifest": manifest,
                    "eval_sets": eval_sets,
                },
            )
    return submission


def fetch_hub_adapter(ref: str, folder: Path, max_bytes: int | None = None) -> str:
    """Download the adapter `REPO[@REVISION]` from the Hugging Face Hub into `folder`, pinned to the commit the
    revision names now (so what is evaluated is what is merged); returns `REPO@COMMIT`. Files are sized from the
    Hub's metadata first: nothing over `max_bytes` (all wanted files together) is downloaded."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from seshu.errors import first_line

    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1:
        raise UserError(f"{ref}: name a Hub repository as owner/name[@revision]")
    patterns = ["adapter_config.json", "adapter_model.safetensors"]
    try:
        info = HfApi().model_info(repo, revision=revision or None, files_metadata=True)
        commit = info.sha
        assert commit is not None
        wanted = [f for f in info.siblings or [] if any(fnmatch(f.rfilename, p) for p in patterns)]
        total = sum(f.size or 0 for f in wanted)
        if max_bytes is not None and total > max_bytes:
            raise UserError(f"{ref}: its adapter files hold {total} bytes, over the limit of {max_bytes}")
        snapshot_download(repo, revision=commit, local_dir=folder, allow_patterns=patterns)
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UserError(f"{ref}: cannot fetch it from the Hub: {first_line(exc)}") from None
    cache = folder / ".cache"
    if cache.exists():  # huggingface_hub's download bookkeeping, not part of the adapter
        import shutil

        shutil.rmtree(cache)
    return f"{repo}@{commit}"
