"""`seshu sft`."""

from __future__ import annotations

from pathlib import Path

import typer

from seshu.cli.common import CONFIG, OUT, OVERRIDES, RESUME, quiet_libraries, recipe_overrides


def register(app: typer.Typer) -> None:
    app.command("sft")(sft)


def sft(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path | None = OUT,
    resume: bool = RESUME,
) -> None:
    """Fine-tune a model on instruction data with LoRA, QLoRA or full training, as a recipe says. A VLM (from
    `seshu vlm build`) trains on conversations with images and audio (LLaVA's or LLaMA-Factory's records)."""
    from seshu.config import SFTRecipe, load_recipe
    from seshu.multimodal.generate import is_vlm
    from seshu.train.common import main_process_log

    quiet_libraries()
    recipe = load_recipe(SFTRecipe, config, recipe_overrides(overrides, out))
    if recipe.model.init_from and is_vlm(recipe.model.init_from):
        from seshu.multimodal.sft import run
    else:
        from seshu.train.sft import run
    say = main_process_log(typer.echo)  # one report, however many processes train
    result = run(recipe, resume=resume, log=say)
    loss = result.metrics.get("eval_loss")
    summary = f"answer-only validation loss {loss:.4f}; " if loss is not None else ""
    say(f"done: {result.steps} steps, {summary}written to {result.output_dir}")
