"""`seshu pretrain`."""

from __future__ import annotations

from pathlib import Path

import typer

from seshu.cli.common import quiet_libraries


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def pretrain(
    config: Path = typer.Option(..., "--config", "-c", help="Recipe YAML (see recipes/)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=3e-4 (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (overrides the recipe's output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the output directory."),
) -> None:
    """Pretrain a model from scratch, or continue pretraining one (model.init_from), as a recipe says."""
    from seshu.config import PretrainRecipe, load_recipe
    from seshu.train.pretrain import run

    quiet_libraries()
    extra = [*overrides, f"output_dir={out}"] if out else overrides
    recipe = load_recipe(PretrainRecipe, config, extra)
    result = run(recipe, resume=resume)
    ppl = result.metrics.get("eval_perplexity")
    summary = f"validation perplexity {ppl:.2f}; " if ppl is not None else ""
    typer.echo(f"done: {result.steps} steps, {summary}model written to {result.output_dir}")
