"""The coordinator's HTTP JSON API under /api/v1 (FastAPI; its OpenAPI document is at /openapi.json).

Roles: `client` (donors: uploads, submissions, their own statuses, releases), `worker` (claims evaluation jobs and
reads blobs by hash; sees blind ids only: no client, token or mapping route answers it) and `admin` (everything,
and who sent what once it is decided). Every error is a JSON `{"detail": reason}` with a 4xx code.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from seshu.errors import UserError
from seshu.federation import auth, queue
from seshu.federation.dashboard import page, summary
from seshu.federation.decisions import claim_job, complete_evaluation, fail_evaluation
from seshu.federation.layout import SFT_RECIPE, Federation
from seshu.federation.models import Client, Release, Submission
from seshu.federation.submissions import (
    Conflict,
    NotFound,
    SubmissionRequest,
    append_upload,
    create_upload,
    current_release,
    get_upload,
    submit,
    upload_offset,
)

API = "/api/v1"
DECIDED = ("accepted", "rejected", "merged")


class UploadRequest(BaseModel):
    size: int = Field(ge=1)
    sha256: str


class SubmitBody(BaseModel):
    task: str
    language: str
    release: int
    files: dict[str, str] = Field(default_factory=dict)
    hub: str | None = None
    examples: int = Field(0, ge=0)
    answer_tokens: int = Field(0, ge=0)
    train_config: dict[str, Any] = Field(default_factory=dict)


class ClaimBody(BaseModel):
    instance: str = Field("0", max_length=40)
    lease_seconds: float = Field(queue.DEFAULT_LEASE_SECONDS, gt=0, le=86400)


class CompleteBody(BaseModel):
    instance: str = Field("0", max_length=40)
    scores: dict[str, Any]
    seconds: float = 0.0


class FailBody(BaseModel):
    instance: str = Field("0", max_length=40)
    error: str
    input_error: bool = False


class NewClient(BaseModel):
    name: str
    role: str = "client"


def create_app(
    fed: Federation,
    fetch_hub: Callable[..., str] | None = None,
    on_submitted: Callable[[], None] | None = None,
) -> FastAPI:
    """The coordinator's app over an opened federation. `on_submitted` is called after each submission that queued
    an evaluation (to wake an in-process worker); `fetch_hub` replaces the Hub download in tests."""
    fed.db.check_schema()
    app = FastAPI(title="Seshu coordinator", version="1", docs_url=f"{API}/docs", openapi_url="/openapi.json")

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, exc: UserError) -> JSONResponse:
        code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400
        return JSONResponse({"detail": str(exc)}, status_code=code)

    def caller(authorization: str | None = Header(default=None)) -> Client:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "send the token as 'Authorization: Bearer <token>'")
        with fed.db.read() as session:
            client = auth.client_for_token(session, authorization.removeprefix("Bearer ").strip())
        if client is None:
            raise HTTPException(401, "unknown token")
        return client

    def role(*allowed: str) -> Callable[..., Client]:
        def check(client: Client = Depends(caller)) -> Client:
            if client.role not in allowed:
                raise HTTPException(403, f"a {client.role} token may not do this")
            return client

        return check

    anyone, donors, workers, admins = role(*auth.ROLES), role("client", "admin"), role("worker", "admin"), role("admin")

    @app.get(f"{API}/health")
    def health() -> dict[str, Any]:
        with fed.db.read() as session:
            return {"status": "ok", "release": current_release(session).version}

    @app.get(f"{API}/recipe")
    def recipe(_: Client = Depends(anyone)) -> dict[str, Any]:
        import yaml

        return {"recipe": yaml.safe_load((fed.folder / SFT_RECIPE).read_text(encoding="utf-8"))}

    # ---------------------------------------------------------------------------------------------- releases

    @app.get(f"{API}/releases")
    def releases(_: Client = Depends(anyone)) -> list[dict[str, Any]]:
        with fed.db.read() as session:
            return [_release_json(r) for r in session.scalars(select(Release).order_by(Release.version))]

    @app.get(f"{API}/releases/{{version}}")
    def release(version: str, _: Client = Depends(anyone)) -> dict[str, Any]:
        row = _release_row(fed, version)
        files = [
            {"path": e.path, "sha256": e.sha256, "size": e.size} for e in fed.store.read_manifest(row.manifest_sha256)
        ]
        return {**_release_json(row), "manifest_sha256": row.manifest_sha256, "files": files}

    @app.get(f"{API}/releases/{{version}}/files/{{path:path}}")
    def release_file(
        version: str, path: str, range: str | None = Header(default=None), _: Client = Depends(anyone)
    ) -> Response:
        row = _release_row(fed, version)
        entry = next((e for e in fed.store.read_manifest(row.manifest_sha256) if e.path == path), None)
        if entry is None:
            raise HTTPException(404, f"release v{row.version} has no file {path}")
        return _blob_response(fed, entry.sha256, entry.size, range)

    # ----------------------------------------------------------------------------------------------- uploads

    @app.post(f"{API}/uploads", status_code=201)
    def new_upload(body: UploadRequest, client: Client = Depends(donors)) -> dict[str, Any]:
        upload = create_upload(fed, client, body.size, body.sha256)
        return {"id": upload.id, "offset": 0, "size": upload.size, "complete": False}

    @app.get(f"{API}/uploads/{{upload_id}}")
    def upload_state(upload_id: str, client: Client = Depends(donors)) -> dict[str, Any]:
        with fed.db.read() as session:
            upload = get_upload(session, client, upload_id)
        return {"id": upload.id, "offset": upload_offset(fed, upload), "size": upload.size, "complete": upload.complete}

    @app.put(f"{API}/uploads/{{upload_id}}")
    async def upload_part(
        upload_id: str, request: Request, offset: int = Query(ge=0), client: Client = Depends(donors)
    ) -> dict[str, Any]:
        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                if chunk:
                    yield chunk

        upload = await append_upload(fed, client, upload_id, offset, body())
        return {"id": upload.id, "offset": upload.received, "size": upload.size, "complete": upload.complete}

    # ------------------------------------------------------------------------------------------- submissions

    @app.post(f"{API}/submissions", status_code=201)
    def new_submission(body: SubmitBody, client: Client = Depends(donors)) -> JSONResponse:
        request = SubmissionRequest(
            task=body.task, language=body.language, release_version=body.release, files=body.files, hub=body.hub,
            examples=body.examples, answer_tokens=body.answer_tokens, train_config=body.train_config,
        )  # fmt: skip
        sub = submit(fed, client, request, fetch_hub=fetch_hub)
        if on_submitted is not None and sub.status == "validated":
            on_submitted()
        return JSONResponse(_submission_json(sub, None), status_code=422 if sub.status == "rejected" else 201)

    @app.get(f"{API}/submissions")
    def submissions(client: Client = Depends(donors)) -> list[dict[str, Any]]:
        with fed.db.read() as session:
            query = select(Submission, Client.name).join(Client, Client.id == Submission.client_id)
            if client.role != "admin":
                query = query.where(Submission.client_id == client.id)
            rows = session.execute(query.order_by(Submission.id)).all()
        return [
            _submission_json(sub, name if client.role == "admin" and sub.status in DECIDED else None)
            for sub, name in rows
        ]

    @app.get(f"{API}/submissions/{{blind_id}}")
    def submission(blind_id: str, client: Client = Depends(donors)) -> dict[str, Any]:
        with fed.db.read() as session:
            sub = session.scalar(select(Submission).where(Submission.blind_id == blind_id))
            if sub is None or (client.role != "admin" and sub.client_id != client.id):
                raise HTTPException(404, f"submission {blind_id} not found")
            owner = session.get(Client, sub.client_id)
        assert owner is not None
        return _submission_json(sub, owner.name if client.role == "admin" and sub.status in DECIDED else None)

    # ----------------------------------------------------------------------------------------------- workers

    def owner_of(client: Client, instance: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", instance):
            raise HTTPException(400, "instance: 1 to 40 letters, digits, '.', '_' or '-'")
        return f"{client.name}/{instance}"

    @app.post(f"{API}/jobs/claim", response_model=None)
    def claim(body: ClaimBody, client: Client = Depends(workers)) -> dict[str, Any] | Response:
        got = claim_job(fed, owner_of(client, body.instance), body.lease_seconds)
        if got is None:
            return Response(status_code=204)
        return {"job_id": got.job_id, "kind": got.kind, "attempts": got.attempts, "payload": got.payload}

    @app.post(f"{API}/jobs/{{job_id}}/heartbeat")
    def heartbeat(job_id: int, body: ClaimBody, client: Client = Depends(workers)) -> dict[str, Any]:
        with fed.db.transaction() as session:
            if not queue.extend(session, job_id, owner_of(client, body.instance), body.lease_seconds):
                raise Conflict(f"job {job_id} is not held by this worker (its lease ran out)")
        return {"job_id": job_id, "extended": True}

    @app.post(f"{API}/jobs/{{job_id}}/complete")
    def complete(job_id: int, body: CompleteBody, client: Client = Depends(workers)) -> dict[str, Any]:
        sub = complete_evaluation(fed, job_id, owner_of(client, body.instance), body.scores, body.seconds)
        return {"job_id": job_id, "blind_id": sub.blind_id, "status": sub.status}

    @app.post(f"{API}/jobs/{{job_id}}/fail")
    def fail(job_id: int, body: FailBody, client: Client = Depends(workers)) -> dict[str, Any]:
        fail_evaluation(fed, job_id, owner_of(client, body.instance), body.error, body.input_error)
        return {"job_id": job_id}

    def blob_size(sha256: str) -> int:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HTTPException(400, "a blob is named by its sha256: 64 lower-case hexadecimal digits")
        if not fed.store.exists(sha256):
            raise HTTPException(404, f"blob {sha256} not found")
        return fed.store.size(sha256)

    @app.get(f"{API}/blobs/{{sha256}}/info")
    def blob_info(sha256: str, _: Client = Depends(workers)) -> dict[str, Any]:
        return {"sha256": sha256, "size": blob_size(sha256)}

    @app.get(f"{API}/blobs/{{sha256}}")
    def blob(sha256: str, range: str | None = Header(default=None), _: Client = Depends(workers)) -> Response:
        return _blob_response(fed, sha256, blob_size(sha256), range)

    # ------------------------------------------------------------------------------------------------- admin

    @app.get(f"{API}/admin/clients")
    def clients(_: Client = Depends(admins)) -> list[dict[str, Any]]:
        with fed.db.read() as session:
            return [
                {"name": c.name, "role": c.role, "created_at": c.created_at.isoformat()}
                for c in session.scalars(select(Client).order_by(Client.id))
            ]

    @app.post(f"{API}/admin/clients", status_code=201)
    def add_client(body: NewClient, _: Client = Depends(admins)) -> dict[str, Any]:
        with fed.db.transaction() as session:
            row, token = auth.add_client(session, body.name, body.role)
        return {"name": row.name, "role": row.role, "token": token}

    @app.get(f"{API}/dashboard")
    def dashboard_data() -> dict[str, Any]:
        with fed.db.read() as session:
            return summary(session)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return page()

    return app


def _release_row(fed: Federation, version: str) -> Release:
    with fed.db.read() as session:
        if version == "latest":
            return current_release(session)
        if not version.isdigit():
            raise HTTPException(400, "a release is named by its version number or 'latest'")
        row = session.get(Release, int(version))
    if row is None:
        raise HTTPException(404, f"release v{version} not found")
    return row


def _release_json(row: Release) -> dict[str, Any]:
    return {
        "version": row.version,
        "parent": row.parent,
        "method": row.method,
        "metrics": row.metrics,
        "eval_sets": sorted(row.eval_sets),
        "changelog": row.changelog,
        "created_at": row.created_at.isoformat(),
    }


def _submission_json(sub: Submission, client_name: str | None) -> dict[str, Any]:
    out = {
        "blind_id": sub.blind_id,
        "status": sub.status,
        "reason": sub.reason,
        "task": sub.task,
        "language": sub.language,
        "release": sub.release_version,
        "source": sub.source,
        "checks": sub.checks,
        "scores": sub.scores if sub.status in DECIDED else {},
        "gains": sub.gains if sub.status in DECIDED else {},
        "merged_in": sub.merged_in,
        "created_at": sub.created_at.isoformat(),
        "decided_at": sub.decided_at.isoformat() if sub.decided_at else None,
    }
    if client_name is not None:
        out["client"] = client_name
    return out


def _blob_response(fed: Federation, sha256: str, size: int, range_header: str | None) -> Response:
    """The blob, whole or from a `Range: bytes=START-[END]` (how an interrupted download resumes)."""
    start, end = 0, size - 1
    if range_header:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
        if match is None:
            raise HTTPException(416, "only one 'bytes=START-[END]' range is served")
        start = int(match.group(1))
        end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if start > end or start >= size:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start + 1), "ETag": f'"{sha256}"'}
    status = 200
    if range_header:
        status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"

    def chunks() -> Iterator[bytes]:
        yield from fed.store.iter_blob(sha256, start, end + 1)

    return StreamingResponse(chunks(), status_code=status, headers=headers, media_type="application/octet-stream")
