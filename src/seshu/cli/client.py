"""`seshu client ...`: a donor's side of a federation (argument parsing over `seshu.federation.client`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Take part in a federation: pull a release, fine-tune, submit, follow.", no_args_is_help=True)

SERVER = typer.Option(..., "--server", envvar="SESHU_SERVER", help="The coordinator's URL (or $SESHU_SERVER).")
TOKEN = typer.Option(..., "--token", envvar="SESHU_TOKEN", help="Your token (or $SESHU_TOKEN).")
JSON = typer.Option(False, "--json", help="Print the result as JSON, for scripts.")
DEFAULT_RELEASE_DIR = Path("seshu-release")


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _coordinator(server: str, token: str) -> Any:
    from seshu.federation.client import Coordinator

    return Coordinator(server, token)


@app.command("pull")
def pull(
    server: str = SERVER,
    token: str = TOKEN,
    version: str = typer.Option("latest", "--version", help="A release number, or latest."),
    out: Path = typer.Option(DEFAULT_RELEASE_DIR, "--out", help="Folder for the release (replaced when complete)."),
    as_json: bool = JSON,
) -> None:
    """Download a release, every file verified by sha256; an interrupted pull resumes where it stopped."""
    info = _coordinator(server, token).pull(version, out, report=_say)
    if as_json:
        typer.echo(json.dumps({"version": info["version"], "out": str(out), "files": len(info["files"])}))
    else:
        typer.echo(f"release v{info['version']} in {out} ({len(info['files'])} files)")


@app.command("train")
def train(
    data: str = typer.Option(..., "--data", help="Your instruction data (json, jsonl, parquet, csv or a folder)."),
    release: Path = typer.Option(DEFAULT_RELEASE_DIR, "--release", help="The pulled release to fine-tune."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A recipe (default: the federation's)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.max_steps=200."),
    out: Path = typer.Option(Path("seshu-adapter"), "--out", help="Folder for the adapter."),
    server: str | None = typer.Option(None, "--server", envvar="SESHU_SERVER", help="Fetch the recipe from here."),
    token: str | None = typer.Option(
        None, "--token", envvar="SESHU_TOKEN", help="Your token, to fetch the recipe with --server."
    ),
    as_json: bool = JSON,
) -> None:
    """Fine-tune a LoRA adapter on your data, on the pulled release, with the recipe the federation publishes."""
    from seshu.cli.common import quiet_libraries
    from seshu.federation.donor import train_adapter

    quiet_libraries()
    recipe = None
    if config is None and server:
        recipe = _coordinator(server, token or "").json("GET", "/recipe")["recipe"]
    # With --json, stdout holds the JSON alone: the training run's progress lines go to stderr.
    result = train_adapter(
        release, data, out, recipe=recipe, recipe_path=config, overrides=overrides,
        log=lambda line: typer.echo(line, err=as_json),
    )  # fmt: skip
    if as_json:
        facts = {"out": str(result.output_dir), "examples": result.examples, "answer_tokens": result.answer_tokens}
        typer.echo(json.dumps({**facts, "steps": result.steps, "metrics": result.metrics}))
        return
    typer.echo(
        f"adapter in {result.output_dir}: {result.examples:,} examples, {result.answer_tokens:,} answer tokens; "
        "send it with `seshu client submit --adapter " + str(result.output_dir) + " --task T --language L`"
    )


@app.command("submit")
def submit(
    task: str = typer.Option(..., "--task", help="What the adapter teaches: translation, qa or instruct."),
    language: str = typer.Option(..., "--language", help="Its language, e.g. hi."),
    adapter: Path | None = typer.Option(None, "--adapter", help="The adapter folder to upload."),
    hub: str | None = typer.Option(None, "--hub", help="Or: REPO\\[@REVISION] of an adapter on the Hugging Face Hub."),
    release: int | None = typer.Option(None, "--release", help="The release it was trained on (default: recorded)."),
    examples: int | None = typer.Option(None, "--examples", help="Training examples (default: from its card)."),
    server: str = SERVER,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Send an adapter to the coordinator; it is checked at once, then evaluated blind."""
    from seshu.errors import UserError
    from seshu.federation.donor import adapter_facts

    if (adapter is None) == (hub is None):
        raise UserError("give either --adapter DIR or --hub REPO[@REVISION]")
    api = _coordinator(server, token)
    facts = adapter_facts(adapter) if adapter is not None else {}
    version = release if release is not None else facts.get("release")
    if version is None:
        version = int(api.json("GET", "/releases/latest")["version"])
    result = api.submit(
        task,
        language,
        int(version),
        adapter=adapter,
        hub=hub,
        examples=examples if examples is not None else int(facts.get("examples", 0)),
        answer_tokens=int(facts.get("answer_tokens", 0)),
        train_config=facts.get("train_config", {}),
        report=_say,
    )
    if as_json:
        typer.echo(json.dumps(result))
    elif result["status"] == "rejected":
        typer.echo(f"submission {result['blind_id']} rejected: {result['reason']}")
    else:
        typer.echo(f"submission {result['blind_id']}: {result['status']}; follow it with `seshu client status`")
    if result["status"] == "rejected":
        raise typer.Exit(2)


@app.command("status")
def status(server: str = SERVER, token: str = TOKEN, as_json: bool = JSON) -> None:
    """Your submissions, their states and, once decided, their scores."""
    rows = _coordinator(server, token).json("GET", "/submissions")
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no submissions yet")
    for row in rows:
        gains = ", ".join(f"{k} {v:+.2%}" for k, v in sorted(row["gains"].items()) if v is not None)
        line = f"{row['blind_id']}  v{row['release']}  {row['task']}/{row['language']}  {row['status']}"
        if row["merged_in"] is not None:
            line += f" into v{row['merged_in']}"
        if gains:
            line += f"  ({gains})"
        if row["status"] == "rejected":
            line += f"  {row['reason']}"
        typer.echo(line)
