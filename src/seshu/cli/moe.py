"""`seshu moe build` and `seshu moe train-router`: argument parsing over `seshu.moe.build` and
`seshu.moe.train`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from seshu.cli.common import OVERRIDES

app = typer.Typer(help="Mixture of experts from dense experts (Mixtral).", no_args_is_help=True, add_completion=False)


def _say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def build(
    config: Path = typer.Option(..., "--config", "-c", help="MoE YAML: base_model, experts, gate_mode, ..."),
    out: Path = typer.Option(..., "--out", help="Folder for the MoE (replaced if it holds an earlier MoE)."),
    overrides: list[str] = OVERRIDES,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
) -> None:
    """Build a Mixtral from a base model and dense experts: each expert's MLP becomes one expert."""
    from seshu.cli.common import quiet_libraries
    from seshu.moe.build import MoEAssemblyError, build_moe
    from seshu.moe.config import load_moe_config

    quiet_libraries()
    moe_config = load_moe_config(config, overrides)
    try:
        report = build_moe(moe_config, out, source=str(config), log=None if as_json else _say)
    except MoEAssemblyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if as_json:
        payload = {k: str(v) if isinstance(v, Path) else v for k, v in report.__dict__.items()}
        typer.echo(json.dumps(payload))
    else:
        typer.echo(
            f"wrote {report.out}: {report.num_experts} experts, {report.experts_per_token} per token, "
            f"{report.parameters:,} parameters ({report.active_parameters:,} active), {report.dtype}, "
            f"gate {report.gate_mode}; each expert matches its dense MLP to {report.expert_check_error:.2g}"
        )


@app.command("train-router")
def train_router(
    out: Path = typer.Option(..., "--out", help="Folder for the model with trained routers."),
    model: str | None = typer.Option(None, "--model", help="The Mixtral (a folder `seshu moe build` wrote)."),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML with keys model, data, validation, steps, lr, batch_size, lm_loss_weight, max_length, "
        "log_every, seed, device; the options override it.",
    ),
    data: str | None = typer.Option(
        None, "--data", help='Labelled prompts: .jsonl of {"text", "expert"}, or a MoE YAML (positive_prompts).'
    ),
    validation: str | None = typer.Option(
        None, "--validation", help="Held-out fraction of each expert's prompts (default 0.25), or a file."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default 300)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-3)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Prompts per step (default 8)."),
    lm_loss_weight: float | None = typer.Option(None, "--lm-loss-weight", help="Add the LM loss (default 0: off)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the split and the batch order (default 0)."),
    device: str | None = typer.Option(None, "--device", help="Where to train (default cuda, else mps, else cpu)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
) -> None:
    """Fine-tune only the routers of a MoE on prompts labelled by expert; all other weights stay as they are."""
    from seshu.cli.common import quiet_libraries
    from seshu.moe.train import load_router_config
    from seshu.moe.train import train_router as run

    quiet_libraries()
    settings = load_router_config(
        config, model=model, data=data, validation=_number_or_path(validation), steps=steps, lr=lr,
        batch_size=batch_size, lm_loss_weight=lm_loss_weight, seed=seed, device=device,
    )  # fmt: skip
    report = run(settings, out, log=None if as_json else _say)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(
            f"wrote {report.out}: routing accuracy {report.accuracy_before:.3f} -> {report.accuracy_after:.3f} "
            f"({report.heldout_prompts or report.train_prompts} "
            f"{'held-out' if report.heldout_prompts else 'training'} prompts), final loss {report.final_loss:.4f}"
        )


def _number_or_path(value: str | None) -> float | str | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value
