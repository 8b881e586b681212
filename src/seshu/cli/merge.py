"""`seshu merge`: argument parsing over `seshu.merge.engine`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand


class _MergeCommand(TyperCommand):
    """`seshu merge --help` names the registered methods: read from the registry when help is asked for, so a new
    method needs no edit here, and `seshu --help` does not import torch."""

    def get_help(self, ctx: Any) -> str:
        from seshu.merge.methods import METHODS

        self.help = f"{merge.__doc__}\n\nMethods: {', '.join(METHODS)}."
        return str(super().get_help(ctx))


def register(app: typer.Typer) -> None:
    app.command("merge", cls=_MergeCommand)(merge)


def merge(
    config: Path = typer.Option(..., "--config", "-c", help="Merge YAML (mergekit-style; see docs/guide.md)."),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the merged model or adapter (an earlier merge there is replaced)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set parameters.lambda=0.8."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Merge models, or LoRA adapters of one base, streaming tensor by tensor (methods: see below)."""
    from seshu.merge.engine import merge_file

    report = merge_file(config, out, overrides, progress=progress)
    if as_json:
        payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in report.__dict__.items()}
        typer.echo(json.dumps(payload))
        return
    extra = ""
    if report.refactor_error is not None:
        extra = f"; rank-{report.rank} re-factoring error {report.refactor_error:.3g} (relative)"
    typer.echo(
        f"wrote {report.out}: {report.kind}, {report.method}, {report.tensors} tensors, {report.parameters:,} "
        f"parameters, {report.out_dtype}, {report.seconds:.1f} s{extra}"
    )
