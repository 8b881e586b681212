"""Talking to a coordinator over HTTP: donors (`seshu client ...`) and remote workers.

Downloads resume from what is on disk (HTTP Range) and are verified by sha256 before they are renamed into
place; uploads resume from the offset the server reports. Nothing of the server's runs here: a donor downloads
weights and JSON and sends weights and JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from seshu.errors import UserError
from seshu.federation import Report
from seshu.hub.manifest import check_relative_path
from seshu.io import sha256_file, staged_dir, write_text_atomic

CHUNK = 1 << 20
UPLOAD_PART = 8 << 20  # bytes per PUT: a cut connection costs at most this much again
RETRIES = 5
RELEASE_MARKER = "federation-release.json"  # written beside a pulled release and a trained adapter


class ServerError(UserError):
    """The coordinator refused a request; the message is its reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Coordinator:
    """One coordinator, as one token holder sees it."""

    def __init__(
        self, server: str, token: str, timeout: float = 600.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        if not server:
            raise UserError("name the coordinator with --server URL (or SESHU_SERVER)")
        if not token:
            raise UserError("give your token with --token T (or SESHU_TOKEN)")
        self.server = server.rstrip("/")
        self.http = httpx.Client(
            base_url=f"{self.server}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UserError(f"{self.server}: cannot reach the coordinator ({type(exc).__name__}: {exc})") from None
        if response.status_code >= 400:
            raise ServerError(response.status_code, _detail(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # ------------------------------------------------------------------------------------------- downloads

    def download(self, path: str, dest: Path, sha256: str, size: int) -> None:
        """GET `path` into `dest`, resuming a `.partial` file left by an interrupted run, verified by sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return
        partial = dest.with_name(dest.name + ".partial")
        for attempt in range(RETRIES):
            have = partial.stat().st_size if partial.exists() else 0
            if have > size:
                partial.unlink()
                have = 0
            if have < size:
                try:
                    self._fetch(path, partial, have)
                except (httpx.TransportError, ServerError) as exc:
                    if isinstance(exc, ServerError) and exc.status < 500:
                        raise
                    if attempt == RETRIES - 1:
                        raise UserError(f"downloading {path} failed after {RETRIES} attempts: {exc}") from None
                    time.sleep(min(2**attempt, 10))
                    continue
            if partial.stat().st_size == size:
                break
        found = sha256_file(partial)
        if found != sha256:
            partial.unlink()
            raise UserError(f"{path}: downloaded file has sha256 {found}, not {sha256}; run the command again")
        partial.replace(dest)

    def _fetch(self, path: str, partial: Path, offset: int) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.http.stream("GET", path, headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                raise ServerError(response.status_code, _detail(response))
            mode = "ab" if offset and response.status_code == 206 else "wb"
            with open(partial, mode) as handle:
                for block in response.iter_bytes(CHUNK):
                    handle.write(block)

    def pull(self, version: str, out: Path, report: Report | None = None) -> dict[str, Any]:
        """Download release `version` (a number or 'latest') into `out`, replaced only once every file is verified.
        An interrupted pull resumes: the files already verified, and the part of the one in progress, are kept."""
        say = report or (lambda _msg: None)
        info = self.json("GET", f"/releases/{version}")
        out = Path(out)
        keep = out.with_name(f".{out.name}.v{info['version']}.download")
        for entry in info["files"]:
            say(f"v{info['version']}: {entry['path']} ({entry['size']:,} bytes)")
            # A path from the server is checked like any manifest's: it may not leave the folder.
            target = keep.joinpath(*check_relative_path(entry["path"]).split("/"))
            self.download(f"/releases/{info['version']}/files/{entry['path']}", target, entry["sha256"], entry["size"])
        marker = {"version": info["version"], "server": self.server, "manifest_sha256": info["manifest_sha256"]}
        write_text_atomic(keep / RELEASE_MARKER, json.dumps(marker, indent=2) + "\n")
        with staged_dir(out) as tmp:
            for item in keep.iterdir():
                item.replace(tmp / item.name)
        keep.rmdir()
        return info

    # --------------------------------------------------------------------------------------------- uploads

    def upload(self, path: Path, report: Report | None = None) -> str:
        """Send one file; returns its upload id. A cut connection resumes from the server's offset."""
        size, sha256 = path.stat().st_size, sha256_file(path)
        upload = self.json("POST", "/uploads", json={"size": size, "sha256": sha256})
        self.resume_upload(upload["id"], path, report)
        return str(upload["id"])

    def resume_upload(self, upload_id: str, path: Path, report: Report | None = None) -> None:
        say = report or (lambda _msg: None)
        size = path.stat().st_size
        for attempt in range(RETRIES * 4):
            state = self.json("GET", f"/uploads/{upload_id}")
            offset = int(state["offset"])
            if state["complete"]:
                return
            if offset >= size:  # every byte is there but the server stopped before checking them: an empty part
                self.request("PUT", f"/uploads/{upload_id}", params={"offset": offset}, content=b"")
                continue
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    part = min(UPLOAD_PART, size - offset)
                    self.request(
                        "PUT", f"/uploads/{upload_id}", params={"offset": offset},
                        content=_read(handle, part), headers={"Content-Length": str(part)},
                    )  # fmt: skip
                say(f"{path.name}: {min(offset + part, size):,} of {size:,} bytes")
            except UserError as exc:
                if isinstance(exc, ServerError) and exc.status != 409:
                    raise
                if attempt == RETRIES * 4 - 1:
                    raise
                time.sleep(min(2 ** min(attempt, 3), 10))

    def submit(
        self,
        task: str,
        language: str,
        release: int,
        *,
        adapter: Path | None = None,
        hub: str | None = None,
        examples: int = 0,
        answer_tokens: int = 0,
        train_config: dict[str, Any] | None = None,
        report: Report | None = None,
    ) -> dict[str, Any]:
        files: dict[str, str] = {}
        if adapter is not None:
            for path in sorted(p for p in Path(adapter).iterdir() if p.is_file() and p.name in SUBMITTED_FILES):
                files[path.name] = self.upload(path, report)
        body = {
            "task": task, "language": language, "release": release, "files": files, "hub": hub,
            "examples": examples, "answer_tokens": answer_tokens, "train_config": train_config or {},
        }  # fmt: skip
        try:
            response = self.http.post("/submissions", json=body)
        except httpx.TransportError as exc:
            raise UserError(f"{self.server}: cannot reach the coordinator ({exc})") from None
        if response.status_code == 422 and "blind_id" in response.text:
            return dict(response.json())  # recorded as rejected, with its reason
        if response.status_code >= 400:
            raise ServerError(response.status_code, _detail(response))
        return dict(response.json())

    # --------------------------------------------------------------------------------------------- workers

    def blob(self, sha256: str, dest: Path, size: int | None = None) -> None:
        """A blob by its hash (workers): resumable and verified like every download."""
        if size is None:
            size = int(self.json("GET", f"/blobs/{sha256}/info")["size"])
        self.download(f"/blobs/{sha256}", dest, sha256, size)


# Files of an adapter folder that are sent: the adapter, its card and the tokenizer/chat files SFT saves beside it.
SUBMITTED_FILES = frozenset(
    {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", RELEASE_MARKER,
    }
)  # fmt: skip


def _read(handle: Any, count: int) -> Iterator[bytes]:
    while count > 0:
        block = handle.read(min(CHUNK, count))
        if not block:
            return
        count -= len(block)
        yield block


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return f"{response.status_code}: {detail or response.text[:200] or response.reason_phrase}"


class RemoteJobs:
    """A worker's jobs over the HTTP API (see `seshu.federation.worker.JobSource`)."""

    def __init__(self, coordinator: Coordinator, cache: Path) -> None:
        self.api = coordinator
        self.cache = cache

    def claim(self, instance: str, lease_seconds: float) -> dict[str, Any] | None:
        response = self.api.request("POST", "/jobs/claim", json={"instance": instance, "lease_seconds": lease_seconds})
        return None if response.status_code == 204 else dict(response.json())

    def heartbeat(self, job_id: int, instance: str, lease_seconds: float) -> bool:
        try:
            self.api.request(
                "POST", f"/jobs/{job_id}/heartbeat", json={"instance": instance, "lease_seconds": lease_seconds}
            )
        except ServerError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def complete(self, job_id: int, instance: str, scores: dict[str, Any], seconds: float) -> str:
        body = {"instance": instance, "scores": scores, "seconds": seconds}
        return str(self.api.json("POST", f"/jobs/{job_id}/complete", json=body)["status"])

    def fail(self, job_id: int, instance: str, error: str, input_error: bool) -> None:
        self.api.request(
            "POST", f"/jobs/{job_id}/fail", json={"instance": instance, "error": error, "input_error": input_error}
        )

    def folder(self, manifest_sha256: str, kind: str) -> Path:
        from seshu.hub.manifest import decode_manifest

        target = self.cache / kind / manifest_sha256
        if target.is_dir():
            return target
        manifest = self.cache / "blobs" / manifest_sha256
        self.api.blob(manifest_sha256, manifest)
        entries = decode_manifest(manifest.read_bytes(), f"manifest {manifest_sha256}")
        with staged_dir(target) as tmp:
            for entry in entries:
                self.api.blob(entry.sha256, tmp.joinpath(*entry.path.split("/")), entry.size)
        return target

    def eval_sets(self, sets: dict[str, Any]) -> dict[str, Path]:
        from seshu.federation.evaluation import eval_set_files

        return eval_set_files(self.cache, sets, self.api.blob)
