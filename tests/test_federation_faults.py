"""The coordinator under `kill -9`: a worker killed mid-job, the server killed mid-upload, a release killed midway.
Each test kills a real process (the `seshu` command) and checks the state afterwards: nothing lost, nothing merged
twice, no half-written release visible."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from federation_helpers import save_lora_adapter
from federation_service import free_port, save_tiny_chatless_base, upload_folder, write_sets
from s3_server import s3_bucket_fixture, s3_endpoint_fixture  # noqa: F401
from sqlalchemy import func, select

from seshu.federation import auth
from seshu.federation.coordinator import init_federation
from seshu.federation.layout import Federation
from seshu.federation.models import Evaluation, Job, Release, Submission
from seshu.federation.releases import publish_release
from seshu.federation.submissions import SubmissionRequest, current_release, submit
from seshu.federation.worker import LocalJobs, run_worker

# Anything that loads and is not over the limits is accepted: these tests are about faults, not judgement.
PERMISSIVE = {"acceptance": {"min_task_gain": -1.0, "max_regression": 1.0}, "release": {"max_regression": 1.0}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    (root / "policy.yaml").write_text(json.dumps(PERMISSIVE), encoding="utf-8")
    return {"root": root, "base": save_tiny_chatless_base(root / "base"), **write_sets(root / "sets")}


def _federation(world: dict[str, Path], folder: Path, db_url: str | None = None) -> Federation:
    sets = [f"general-en={world['general-en']}", f"instruct={world['instruct']}"]
    init_federation(folder, str(world["base"]), sets, db_url=db_url, policy_path=world["root"] / "policy.yaml")
    return Federation.open(folder)


def _submit_random(fed: Federation, tmp: Path, count: int) -> list[str]:
    """`count` accepted-to-be submissions from different clients: random LoRA adapters of v0."""
    with fed.db.read() as session:
        release = current_release(session)
    v0 = fed.unpack(release.manifest_sha256, "releases")
    blind_ids = []
    for i in range(count):
        with fed.db.transaction() as session:
            client, _ = auth.add_client(session, f"donor-{i}", "client")
        adapter = save_lora_adapter(v0, tmp / f"adapter-{i}", seed=i, targets=("q_proj", "v_proj"), b_std=0.005)
        request = SubmissionRequest("instruct", "en", 0, files=upload_folder(fed, client, adapter), examples=10 + i)
        sub = submit(fed, client, request)
        assert sub.status == "validated", sub.reason
        blind_ids.append(sub.blind_id)
    return blind_ids


def _seshu(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "seshu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _lines(process: subprocess.Popen[str]) -> Iterator[str]:
    assert process.stdout is not None
    yield from process.stdout


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_worker_killed_mid_job_loses_its_lease_and_another_finishes_it(
    world: dict[str, Path], tmp_path: Path, database_url: str
) -> None:
    fed = _federation(world, tmp_path / "fed", database_url)
    (blind,) = _submit_random(fed, tmp_path, 1)
    worker = _seshu("server", "worker", "--dir", str(fed.folder), "--lease-seconds", "2", "--instance", "doomed")
    try:
        deadline = time.monotonic() + 120
        while True:  # killed as soon as it holds the job, before it can report
            with fed.db.read() as session:
                job = session.scalars(select(Job)).one()
            if job.status == "running":
                break
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.02)
    finally:
        _kill(worker)
    assert job.attempts == 1 and job.owner is not None and job.owner.endswith("/doomed")
    with fed.db.read() as session:
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 0
    # Until the lease runs out nobody else may take it; then a second worker does, and finishes it once.
    assert run_worker(LocalJobs(fed), "rescuer", once=True) == 0
    time.sleep(2.2)
    assert run_worker(LocalJobs(fed), "rescuer", once=True, lease_seconds=60) == 1
    with fed.db.read() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts) == ("done", 2) and job.owner is not None and job.owner.endswith("/rescuer")
        assert session.scalar(select(func.count()).select_from(Evaluation)) == 1
        assert session.scalars(select(Submission)).one().status == "accepted"
    assert blind
    fed.close()


def test_an_upload_cut_by_a_server_crash_resumes_after_restart(world: dict[str, Path], tmp_path: Path) -> None:
    fed = _federation(world, tmp_path / "fed")
    with fed.db.transaction() as session:
        _, token = auth.add_client(session, "asha", "client")
    data = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1"
    headers = {"Authorization": f"Bearer {token}"}

    def start() -> subprocess.Popen[str]:
        server = _seshu("server", "start", "--dir", str(fed.folder), "--port", str(port), "--no-worker")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    server = start()
    upload = httpx.post(f"{url}/uploads", json={"size": len(data), "sha256": digest}, headers=headers).json()
    sent = threading.Event()

    def slow_body() -> Iterator[bytes]:
        for start_at in range(0, len(data) // 2, 1 << 20):
            yield data[start_at : start_at + (1 << 20)]
        sent.set()
        time.sleep(30)  # the rest never comes: the server dies first
        yield data[len(data) // 2 :]

    def put() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.put(f"{url}/uploads/{upload['id']}", params={"offset": 0}, content=slow_body(), headers=headers)

    sender = threading.Thread(target=put, daemon=True)
    sender.start()
    assert sent.wait(60)
    time.sleep(0.5)
    _kill(server)
    server = start()
    try:
        offset = httpx.get(f"{url}/uploads/{upload['id']}", headers=headers).json()["offset"]
        assert 0 < offset <= len(data) // 2
        done = httpx.put(
            f"{url}/uploads/{upload['id']}", params={"offset": offset}, content=data[offset:], headers=headers
        ).json()
        assert done["complete"] and done["offset"] == len(data)
        assert hashlib.sha256(fed.upload_path(upload["id"]).read_bytes()).hexdigest() == digest
    finally:
        _kill(server)
    fed.close()


@pytest.mark.parametrize("stage", ["merging", "scoring the candidate"])
def test_a_release_killed_midway_leaves_the_old_release_and_merges_once(
    world: dict[str, Path], tmp_path: Path, stage: str, database_url: str
) -> None:
    fed = _federation(world, tmp_path / "fed", database_url)
    blind_ids = _submit_random(fed, tmp_path, 2)
    assert run_worker(LocalJobs(fed), once=True) == 2
    release = _seshu("server", "release", "--dir", str(fed.folder))
    try:
        for line in _lines(release):
            if stage in line:
                break
        else:
            pytest.fail(f"the release ended before '{stage}'")
    finally:
        _kill(release)
    with fed.db.read() as session:
        assert [r.version for r in session.scalars(select(Release))] == [0]
        assert {s.status for s in session.scalars(select(Submission))} == {"accepted"}
    outcome = publish_release(fed)
    assert outcome.published and outcome.version == 1
    with fed.db.read() as session:
        merged = {s.blind_id: s.merged_in for s in session.scalars(select(Submission))}
        assert merged == dict.fromkeys(blind_ids, 1)
        v1 = session.get(Release, 1)
        assert v1 is not None
        # The published folder is whole: every file of its manifest is in the store and verifies.
        fed.store.get_dir(v1.manifest_sha256, tmp_path / "v1")
    assert (tmp_path / "v1" / "model.safetensors").is_file()
    fed.close()


def test_a_federation_on_an_s3_store_keeps_every_artifact_there(
    world: dict[str, Path], tmp_path: Path, s3_bucket: str
) -> None:
    sets = [f"general-en={world['general-en']}", f"instruct={world['instruct']}"]
    store = f"s3://{s3_bucket}/federation"
    init_federation(
        tmp_path / "fed", str(world["base"]), sets, store_url=store, policy_path=world["root"] / "policy.yaml"
    )
    fed = Federation.open(tmp_path / "fed")
    assert not (tmp_path / "fed" / "store").exists()
    _submit_random(fed, tmp_path, 1)
    assert run_worker(LocalJobs(fed), once=True) == 1
    outcome = publish_release(fed)
    assert outcome.published and outcome.version == 1
    with fed.db.read() as session:
        v1 = session.get(Release, 1)
        assert v1 is not None
    # Read back through a fresh store object (no local cache): the release is whole in the bucket.
    from seshu.hub.store import open_store

    open_store(store).get_dir(v1.manifest_sha256, tmp_path / "v1")
    assert (tmp_path / "v1" / "model.safetensors").is_file() and (tmp_path / "v1" / "CHANGELOG.md").is_file()
    fed.close()


def test_a_release_with_continued_pretraining_trains_the_merged_model(world: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    fed = _federation(world, tmp_path / "fed")
    _submit_random(fed, tmp_path, 1)
    assert run_worker(LocalJobs(fed), once=True) == 1
    recipe = tmp_path / "cpt.yaml"
    recipe.write_text(
        json.dumps(
            {
                "data": {"train": str(world["general-en"]), "validation": 0.2},
                "train": {
                    "seq_len": 32,
                    "batch_size": 2,
                    "max_steps": 4,
                    "eval_every": 4,
                    "save_every": 4,
                    "log_every": 2,
                    "warmup_steps": 1,
                    "lr": 1e-3,
                },
            }
        ),
        encoding="utf-8",
    )
    said: list[str] = []
    outcome = publish_release(fed, cpt_recipe=recipe, report=said.append)
    assert outcome.published and "continued pretraining on server data" in said
    with fed.db.read() as session:
        folders = {v: fed.unpack(session.get(Release, v).manifest_sha256, "releases") for v in (0, 1)}  # type: ignore[union-attr]
    before, after = (load_file(str(folders[v] / "model.safetensors")) for v in (0, 1))
    # The adapters touch attention projections only: a changed embedding is the continued pretraining's doing.
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert sorted(p.name for p in folders[1].iterdir() if p.suffix == ".json") == sorted(
        p.name for p in folders[0].iterdir() if p.suffix == ".json"
    )
    fed.close()
