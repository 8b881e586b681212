"""`seshu adapters fold`: argument parsing over `seshu.merge.fold`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Work with PEFT adapters (LoRA).", no_args_is_help=True, add_completion=False)


@app.callback()
def _group() -> None:
    # A callback keeps `fold` a subcommand (`seshu adapters fold`) while it is the group's only command.
    pass


@app.command()
def fold(
    base: str = typer.Option(..., "--base", help="Base model folder or Hub id it was trained on; a VLM folder too."),
    adapter: str = typer.Option(..., "--adapter", help="PEFT adapter folder (adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder for the folded model (replaced if it holds an earlier fold)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Weights dtype: bfloat16, float16 or float32."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
) -> None:
    """Fold an adapter into its base model (a text model or a VLM): a standalone model, checked against base +
    adapter."""
    from seshu.cli.common import quiet_libraries
    from seshu.merge.fold import FoldMismatchError, fold_adapter

    quiet_libraries()
    try:
        report = fold_adapter(base, adapter, out, dtype)
    except FoldMismatchError as exc:
        # A failed check is a runtime failure (exit 1), but a sentence is clearer than a traceback.
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    check = report.check
    if as_json:
        payload = {"out": str(report.out), "dtype": report.dtype, "parameters": report.parameters, **check.to_dict()}
        typer.echo(json.dumps(payload))
    else:
        typer.echo(
            f"wrote {report.out} ({report.parameters:,} parameters, {report.dtype}); logits vs base + adapter: "
            f"max |diff| {check.max_abs_diff:.3g}, relative {check.position_error_p90:.3g} "
            f"(tolerance {check.tolerance:g})"
        )
    if check.adapter_within_rounding:
        typer.echo(
            f"warning: {report.dtype} rounding moves the logits almost as much as the adapter does "
            f"({check.position_error_p90:.3g} vs {check.adapter_effect:.3g}); fold with --dtype float32 to keep it",
            err=True,
        )
