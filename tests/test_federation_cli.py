"""`seshu server ...` and `seshu client ...` as people run them: the real entry point (`seshu.cli.main`, so user
errors are one `error:` line and exit code 2), the coordinator started as a process of its own on a free port,
and a donor pulling, training, submitting and following a submission through the commands alone."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from federation_service import free_port, save_tiny_chatless_base, write_policy, write_sets
from helpers import Outcome, seshu
from sqlalchemy import inspect, select

from seshu.federation.database import head_revision
from seshu.federation.layout import Federation
from seshu.federation.models import Client, Release, Submission

# A few steps of the federation's recipe: enough for an adapter that loads, is checked and is scored.
TINY_TRAINING = ["train.max_steps=4", "train.eval_every=4", "train.save_every=4", "train.seq_len=128"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_chatless_base(root / "base")
    return {"root": root, "base": base, "policy": write_policy(root / "policy.yaml"), **write_sets(root / "sets")}


@dataclass
class Made:
    folder: Path
    init: Outcome
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def made(world: dict[str, Path]) -> Made:
    """A federation made and peopled through the commands: two donors, a worker and an admin."""
    folder = world["root"] / "fed"
    sets = ["--eval-set", f"general-en={world['general-en']}", "--eval-set", f"instruct={world['instruct']}"]
    init = seshu("server", "init", "--base", world["base"], "--dir", folder, *sets, "--policy", world["policy"])
    assert init.code == 0, init.err
    tokens = {}
    for name, role in (("asha", "client"), ("bala", "client"), ("w1", "worker"), ("root", "admin")):
        added = seshu("server", "add-client", name, "--dir", folder, "--role", role, "--json")
        assert added.code == 0, added.err
        tokens[name] = json.loads(added.out)["token"]
    return Made(folder, init, tokens)


@pytest.fixture(scope="module")
def url(made: Made) -> Iterator[str]:
    """`seshu server start` as a process of its own (no in-process worker: `server worker` runs the queue)."""
    port = free_port()
    log = made.folder.parent / "server.log"
    command = [sys.executable, "-m", "seshu", "server", "start", "--dir", str(made.folder), "--port", str(port)]
    with open(log, "w") as handle:
        process = subprocess.Popen([*command, "--no-worker"], stdout=handle, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{address}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`seshu server start` did not come up:\n{log.read_text()}")
            time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _as_client(url: str, token: str) -> dict[str, str]:
    return {"SESHU_SERVER": url, "SESHU_TOKEN": token}


# ------------------------------------------------------------------------------------------------ server init


def test_init_prints_the_v0_scores(made: Made) -> None:
    fed = Federation.open(made.folder)
    with fed.db.read() as session:
        v0 = session.get(Release, 0)
        assert v0 is not None
        metrics = dict(v0.metrics)
    fed.close()
    assert sorted(metrics) == ["general-en", "instruct"]
    scores = ", ".join(f"{k} {v['metric']} {v['value']:.4g}" for k, v in metrics.items())
    assert made.init.out == (
        f"federation in {made.folder}: release v0 ({scores}); add clients with `seshu server add-client`\n"
    )
    assert "general-en perplexity" in scores and "instruct answer_ppl" in scores
    assert "scoring v0 on 2 evaluation set(s)" in made.init.err  # progress goes to stderr, the result to stdout


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no equals sign", "write it as NAME=PATH"),
        ("missing file", "is not a file"),
        ("folder not empty", "exists and is not empty"),
        ("no general set", "give a general evaluation set"),
    ],
)
def test_init_user_errors_leave_nothing_behind(world: dict[str, Path], tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "fed"
    specs = {
        "no equals sign": [f"general-en{world['general-en']}"],
        "missing file": [f"general-en={tmp_path / 'nope.txt'}"],
        "folder not empty": [f"general-en={world['general-en']}"],
        "no general set": [f"instruct={world['instruct']}"],
    }[case]
    if case == "folder not empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    args = [arg for spec in specs for arg in ("--eval-set", spec)]
    result = seshu("server", "init", "--base", world["base"], "--dir", folder, *args)
    assert message in result.error
    if case == "folder not empty":
        assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "mine"
    else:
        assert not folder.exists()


# ------------------------------------------------------------------------------------ clients and migrations


def test_add_client_shows_the_token_once_and_keeps_only_its_hash(made: Made) -> None:
    added = seshu("server", "add-client", "chandra", "--dir", made.folder, "--json")
    assert added.code == 0, added.err
    shown = json.loads(added.out)
    token = shown["token"]
    assert shown["name"] == "chandra" and shown["role"] == "client" and token.startswith("seshu_")
    fed = Federation.open(made.folder)
    with fed.db.read() as session:
        row = session.scalar(select(Client).where(Client.name == "chandra"))
        assert row is not None and row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    fed.close()
    # The token itself is in no file of the federation: not the database (nor its WAL), not the settings.
    needle = token.encode()
    assert all(needle not in path.read_bytes() for path in made.folder.rglob("*") if path.is_file())

    plain = seshu("server", "add-client", "dev", "--dir", made.folder, "--role", "worker")
    assert plain.code == 0 and plain.out.startswith("worker 'dev': token seshu_") and "shown once" in plain.out
    assert "exists already" in seshu("server", "add-client", "chandra", "--dir", made.folder).error
    assert "unknown role 'boss'" in seshu("server", "add-client", "x", "--dir", made.folder, "--role", "boss").error


def test_migrate_to_base_and_back_to_head(tmp_path: Path) -> None:
    folder = tmp_path / "fed"
    folder.mkdir()
    db = tmp_path / "state.db"
    (folder / "federation.yaml").write_text(f"db: sqlite:///{db}\nstore: {tmp_path / 'store'}\n")
    head = head_revision()

    def tables() -> set[str]:
        fed = Federation.open(folder)
        try:
            return set(inspect(fed.db.engine).get_table_names()) - {"alembic_version"}
        finally:
            fed.close()

    up = seshu("server", "migrate", "--dir", folder)
    assert up.code == 0 and up.out == f"database schema: nothing -> {head}\n"
    assert {"clients", "releases", "submissions", "jobs"} <= tables()
    assert seshu("server", "add-client", "asha", "--dir", folder).code == 0

    down = seshu("server", "migrate", "--dir", folder, "--revision", "base")
    assert down.code == 0 and down.out == f"database schema: {head} -> nothing\n"
    assert tables() == set()
    # Every command that works on the database refuses an unmigrated one with the one-line fix.
    for command in (
        ["add-client", "bala"],
        ["release"],
        ["report", "--out", str(tmp_path / "p.png")],
        ["worker", "--once"],
    ):
        assert "run `seshu server migrate`" in seshu("server", *command, "--dir", folder).error, command

    again = seshu("server", "migrate", "--dir", folder, "--revision", "head")
    assert again.code == 0 and again.out == f"database schema: nothing -> {head}\n"
    assert seshu("server", "add-client", "asha", "--dir", folder).code == 0  # the old rows went with the tables


# ------------------------------------------------------------------------------- the coordinator, as a process


def test_server_start_serves_the_api_and_the_dashboard(made: Made, url: str) -> None:
    assert httpx.get(f"{url}/api/v1/health").json() == {"status": "ok", "release": 0}
    assert "Seshu federation" in httpx.get(f"{url}/").text
    assert httpx.get(f"{url}/api/v1/releases").status_code == 401  # everything else needs a token
    assert f"coordinator on {url}" in (made.folder.parent / "server.log").read_text()


def test_a_donor_round_trip_through_the_commands(world: dict[str, Path], made: Made, url: str, tmp_path: Path) -> None:
    asha = _as_client(url, made.tokens["asha"])
    release = tmp_path / "release"

    # Pull with flags: every file of v0 verified into place, with the marker that says which release it is.
    pulled = seshu("client", "pull", "--server", url, "--token", made.tokens["asha"], "--out", release, "--json")
    assert pulled.code == 0, pulled.err
    info = json.loads(pulled.out)
    assert info["version"] == 0 and info["out"] == str(release)
    assert info["files"] == sum(1 for p in release.iterdir() if p.name != "federation-release.json") > 0
    assert json.loads((release / "federation-release.json").read_text())["server"] == url

    # Train with the recipe the coordinator serves (the environment names the server and the token).
    overrides = [arg for o in TINY_TRAINING for arg in ("--set", o)]
    args = ["--data", world["donor"], "--release", release, "--out", tmp_path / "adapter", *overrides]
    trained = seshu("client", "train", *args, "--json", env=asha)
    assert trained.code == 0, trained.err
    facts = json.loads(trained.out)  # stdout is the JSON alone; the run's progress goes to stderr
    assert facts["out"] == str(tmp_path / "adapter") and facts["steps"] == 4
    assert facts["examples"] > 0 and facts["answer_tokens"] > 0 and "step 4/4" in trained.err

    assert seshu("client", "status", env=asha).out == "no submissions yet\n"
    submitted = seshu("client", "submit", "--adapter", tmp_path / "adapter", "--task", "instruct",
                      "--language", "en", "--json", env=asha)  # fmt: skip
    assert submitted.code == 0, submitted.err
    sent = json.loads(submitted.out)
    assert sent["status"] == "validated" and sent["release"] == 0 and "client" not in sent

    rows = json.loads(seshu("client", "status", "--json", env=asha).out)
    assert [(r["blind_id"], r["status"], r["scores"]) for r in rows] == [(sent["blind_id"], "validated", {})]

    # Validated is not accepted: there is nothing to release yet.
    refused = seshu("server", "release", "--dir", made.folder, "--device", "cpu", "--json")
    assert "no accepted submissions wait to be merged into v0; nothing to release" in refused.error

    worked = seshu("server", "worker", "--dir", made.folder, "--once", "--device", "cpu")
    assert worked.code == 0 and worked.out == "1 job(s) done\n", worked.err
    assert f"evaluating {sent['blind_id']}" in worked.err

    (row,) = json.loads(seshu("client", "status", "--json", env=asha).out)
    assert row["status"] in ("accepted", "rejected") and row["reason"]
    assert set(row["scores"]) == set(row["gains"]) == {"general-en", "instruct"}
    line = seshu("client", "status", env=asha).out
    assert line.startswith(f"{sent['blind_id']}  v0  instruct/en  {row['status']}")
    assert f"instruct {row['gains']['instruct']:+.2%}" in line  # the measured gain, as a person reads it
    assert seshu("server", "worker", "--dir", made.folder, "--once").out == "0 job(s) done\n"


def test_a_rejected_adapter_exits_2_with_its_reason(made: Made, url: str, tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (evil / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    args = ["--adapter", evil, "--task", "instruct", "--language", "en", "--release", "0", "--examples", "5"]
    result = seshu("client", "submit", *args, "--server", url, "--token", made.tokens["bala"])
    assert result.code == 2 and "Traceback" not in result.err
    assert result.out.startswith("submission ") and " rejected: " in result.out and "pickle" in result.out.lower()
    fed = Federation.open(made.folder)
    with fed.db.read() as session:
        blind = result.out.split()[1]
        row = session.scalar(select(Submission).where(Submission.blind_id == blind))
        assert row is not None and row.status == "rejected" and row.adapter_manifest is None
    fed.close()


def test_refused_requests_exit_2_with_the_servers_reason(made: Made, url: str, tmp_path: Path) -> None:
    wrong = seshu("client", "status", "--server", url, "--token", "seshu_not-a-token")
    assert wrong.error == "error: 401: unknown token"
    worker = seshu("client", "status", env=_as_client(url, made.tokens["w1"]))
    assert worker.error == "error: 403: a worker token may not do this"
    asha = _as_client(url, made.tokens["asha"])
    missing = seshu("client", "pull", "--version", "7", "--out", tmp_path / "v7", env=asha)
    assert missing.error == "error: 404: release v7 not found" and not (tmp_path / "v7").exists()
    neither = seshu("client", "submit", "--task", "instruct", "--language", "en", env=_as_client(url, "seshu_x"))
    assert "give either --adapter DIR or --hub" in neither.error
    free = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach the coordinator" in seshu("client", "status", env=_as_client(free, "seshu_x")).error
    assert os.environ.get("SESHU_TOKEN") != made.tokens["asha"]  # the environment given to a command stays with it
