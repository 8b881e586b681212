"""`seshu pretrain`."""

from __future__ import annotations

from pathlib import Path

import typer

from seshu.cli.common import CONFIG, OUT, OVERRIDES, RESUME, quiet_libraries, recipe_overrides


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def pretrain(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path | None = OUT,
    resume: bool = RESUME,
) -> None:
    """Pretrain a model from scratch, or continue pretraining one (model.init_from), as a recipe says."""
    from seshu.config import PretrainRecipe, load_recipe
    from seshu.train.common import main_process_log
    from seshu.train.pretrain import run

    quiet_libraries()
    recipe = load_recipe(PretrainRecipe, config, recipe_overrides(overrides, out))
    say = main_process_log(typer.echo)  # one report, however many processes train
    result = run(recipe, resume=resume, log=say)
    ppl = result.metrics.get("eval_perplexity")
    summary = f"validation perplexity {ppl:.2f}; " if ppl is not None else ""
    say(f"done: {result.steps} steps, {summary}model written to {result.output_dir}")
