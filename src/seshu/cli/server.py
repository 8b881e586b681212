"""`seshu server ...`: the coordinator of a federation (argument parsing over `seshu.federation`)."""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import typer

app = typer.Typer(help="Run a federation's coordinator: releases, clients, evaluation workers.", no_args_is_help=True)

DIR = typer.Option(..., "--dir", "-d", help="The federation folder (made by `seshu server init`).")
JSON = typer.Option(False, "--json", help="Print the result as JSON, for scripts.")


def _say(message: str) -> None:
    typer.echo(message, err=True)


@app.command("init")
def init(
    base: str = typer.Option(..., "--base", help="Release v0: a model folder or a Hub id."),
    folder: Path = DIR,
    eval_sets: list[str] = typer.Option([], "--eval-set", help="NAME=PATH, repeatable (general-hi=..., instruct=...)."),
    db: str | None = typer.Option(None, "--db", help="Database URL (default: SQLite in the folder)."),
    store: str | None = typer.Option(None, "--store", help="Artifact store: a folder, s3://bucket/prefix or hf://..."),
    policy: Path | None = typer.Option(None, "--policy", help="Acceptance policy YAML (default: Seshu's)."),
    sft_recipe: Path | None = typer.Option(None, "--sft-recipe", help="The recipe donors train with."),
    as_json: bool = JSON,
) -> None:
    """Create a federation whose release v0 is the base model, scored on the frozen evaluation sets."""
    from seshu.cli.common import quiet_libraries
    from seshu.federation.coordinator import init_federation

    quiet_libraries()
    report = init_federation(folder, base, eval_sets, db, store, policy, sft_recipe, report=_say)
    if as_json:
        typer.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in report.__dict__.items()}))
        return
    scores = ", ".join(f"{k} {v['metric']} {v['value']:.4g}" for k, v in report.metrics.items())
    typer.echo(f"federation in {report.folder}: release v0 ({scores}); add clients with `seshu server add-client`")


@app.command("migrate")
def migrate(
    folder: Path = DIR,
    revision: str = typer.Option("head", "--revision", help="head (newest), base (no tables) or a revision id."),
) -> None:
    """Migrate the federation's database to a schema revision (Alembic)."""
    from seshu.federation.database import current_revision, downgrade, upgrade
    from seshu.federation.layout import Federation

    fed = Federation.open(folder)
    before = current_revision(fed.db.engine)
    if revision == "base" or (revision != "head" and before is not None and revision < before):
        downgrade(fed.db.engine, revision)
    else:
        upgrade(fed.db.engine, revision)
    typer.echo(f"database schema: {before or 'nothing'} -> {current_revision(fed.db.engine) or 'nothing'}")


@app.command("add-client")
def add_client(
    name: str = typer.Argument(..., help="The client's name, as releases credit it."),
    folder: Path = DIR,
    role: str = typer.Option("client", "--role", help="client (a donor), worker or admin."),
    as_json: bool = JSON,
) -> None:
    """Register a client and print its bearer token, once: only its hash is kept."""
    from seshu.federation import auth
    from seshu.federation.layout import Federation

    fed = Federation.open(folder)
    fed.db.check_schema()
    with fed.db.transaction() as session:
        row, token = auth.add_client(session, name, role)
    if as_json:
        typer.echo(json.dumps({"name": row.name, "role": row.role, "token": token}))
    else:
        typer.echo(f"{row.role} '{row.name}': token {token}\n(shown once; keep it secret)")


@app.command("start")
def start(
    folder: Path = DIR,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 serves other machines too."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Serve only; run workers with `seshu server worker`."),
) -> None:
    """Serve the coordinator's API (/api/v1, OpenAPI at /openapi.json) and dashboard (/), with an evaluation
    worker in-process unless --no-worker."""
    import uvicorn

    from seshu.cli.common import quiet_libraries
    from seshu.federation.app import create_app
    from seshu.federation.layout import Federation
    from seshu.federation.worker import LocalJobs, run_worker

    quiet_libraries()
    fed = Federation.open(folder)
    stop, wake = threading.Event(), threading.Event()
    app = create_app(fed, on_submitted=None if no_worker else wake.set)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    # peft takes seconds to import; done now, the first submission's check does not stall every other request.
    threading.Thread(target=importlib.import_module, args=("peft.mapping",), daemon=True).start()
    worker = None
    if not no_worker:
        kwargs = {"stop": stop, "wake": wake, "report": _say}
        worker = threading.Thread(target=run_worker, args=(LocalJobs(fed),), kwargs=kwargs)
        worker.start()
    _say(f"coordinator on http://{host}:{port} (dashboard at /, API at /api/v1)")
    try:
        server.run()
    finally:
        stop.set()
        wake.set()
        if worker is not None:
            worker.join()


@app.command("worker")
def worker(
    folder: Path | None = typer.Option(None, "--dir", "-d", help="Work on this federation's database and store."),
    server: str | None = typer.Option(None, "--server", envvar="SESHU_SERVER", help="Or: the coordinator's URL."),
    token: str | None = typer.Option(None, "--token", envvar="SESHU_TOKEN", help="A worker token (with --server)."),
    once: bool = typer.Option(False, "--once", help="Stop when the queue is empty."),
    instance: str | None = typer.Option(None, "--instance", help="This worker's name among its token's workers."),
    cache: Path | None = typer.Option(None, "--cache", help="Where a remote worker keeps releases and adapters."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, mps (default: the best there is)."),
    lease_seconds: float = typer.Option(
        600.0, "--lease-seconds", min=1.0, help="How long a claim holds without renewal (renewed every third)."
    ),
) -> None:
    """Evaluate submissions: claim jobs, score, report; a job whose worker dies goes to another."""
    from seshu.cli.common import quiet_libraries
    from seshu.errors import UserError
    from seshu.federation.worker import JobSource, LocalJobs, run_worker

    quiet_libraries()
    source: JobSource
    if folder is not None:
        from seshu.federation.layout import Federation

        fed = Federation.open(folder)
        fed.db.check_schema()
        source = LocalJobs(fed)
    elif server:
        from seshu.federation.client import Coordinator, RemoteJobs
        from seshu.io import cache_dir

        source = RemoteJobs(Coordinator(server, token or ""), cache or cache_dir() / "worker")
    else:
        raise UserError("give --dir (a federation folder) or --server URL --token T")
    done = run_worker(source, instance, lease_seconds=lease_seconds, once=once, device=device, report=_say)
    typer.echo(f"{done} job(s) done")


@app.command("release")
def release(
    folder: Path = DIR,
    method: str | None = typer.Option(None, "--method", help="fedavg, task_arithmetic, ties or dare_ties."),
    cpt: Path | None = typer.Option(None, "--cpt", help="Pretrain recipe for continued pretraining on server data."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", help="Also publish to this Hub model repository."),
    device: str | None = typer.Option(
        None, "--device", help="Where the candidate is scored: cpu, cuda, mps (default: the best there is)."
    ),
    as_json: bool = JSON,
) -> None:
    """Merge the accepted submissions into the current release and publish the next one if it holds up."""
    from seshu.cli.common import quiet_libraries
    from seshu.federation.layout import Federation
    from seshu.federation.releases import publish_release

    quiet_libraries()
    fed = Federation.open(folder)
    fed.db.check_schema()
    outcome = publish_release(fed, method, cpt, report=_say, device=device)
    if outcome.published and push_to_hub:
        from seshu.federation.hub_push import push_release

        assert outcome.version is not None
        push_release(fed, outcome.version, push_to_hub)
    if as_json:
        typer.echo(json.dumps(outcome.to_dict()))
    elif outcome.published:
        typer.echo(f"published v{outcome.version} ({len(outcome.contributions)} contribution(s), {outcome.method})")
    else:
        typer.echo(f"nothing published: {'; '.join(outcome.reasons)}")
    if not outcome.published:
        sys.exit(1)


@app.command("report")
def report(
    folder: Path = DIR,
    out: Path = typer.Option(..., "--out", help="PNG file for the plot."),
) -> None:
    """Plot how the model matures: every frozen set's score against release version."""
    from seshu.federation.layout import Federation
    from seshu.federation.plot import plot_releases

    fed = Federation.open(folder)
    fed.db.check_schema()
    typer.echo(f"wrote {plot_releases(fed, out)}")
