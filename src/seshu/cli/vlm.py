"""`seshu vlm build`, `seshu vlm pretrain-projector` and `seshu vlm train`: argument parsing over
`seshu.multimodal.vlm`, `seshu.multimodal.pretrain_projector` and `seshu.multimodal.pipeline`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from seshu.cli.common import CONFIG, OUT, OVERRIDES, RESUME

app = typer.Typer(
    help="Vision-language models: a CLIP vision tower, a projector and a Seshu LM, saved as transformers' LLaVA.",
    no_args_is_help=True,
    add_completion=False,
)


def _say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def build(
    vision: str = typer.Option(
        ...,
        "--vision",
        help="CLIP checkpoint or vision tower: a folder, a Hub id, or clip:PRESET (tiny, small) for a new one with "
        "random weights (smoke runs: it sees nothing).",
    ),
    lm: str = typer.Option(
        ...,
        "--lm",
        help="Language model: a Seshu model folder, a Hub id, or ARCH:PRESET (e.g. phi:small) for a new one.",
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the VLM (replaced if it holds an earlier VLM)."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer folder for an --lm ARCH:PRESET."),
    projector: str = typer.Option("linear", "--projector", help="linear (one layer, the seed's) or mlp2x_gelu."),
    feature_layer: int = typer.Option(
        -2, "--feature-layer", help="Vision tower layer the LM sees (-2: second to last, as LLaVA)."
    ),
    feature_select: str = typer.Option(
        "default", "--feature-select", help="default: patch features only (drops CLS, LLaVA-1.5); full: CLS too."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Saved weights: float32, bfloat16 or float16."),
    context_length: int = typer.Option(2048, "--context-length", help="Context of a new --lm ARCH:PRESET."),
    seed: int = typer.Option(0, "--seed", help="Seed of the projector (and of a new LM or vision tower)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
) -> None:
    """Assemble a LLaVA-style VLM (untrained projector) that plain transformers loads."""
    from seshu.cli.common import quiet_libraries
    from seshu.multimodal.vlm import VLMAssemblyError, build_vlm

    quiet_libraries()
    try:
        report = build_vlm(
            vision, lm, out, projector=projector, feature_layer=feature_layer, feature_select=feature_select,
            tokenizer=tokenizer, dtype=dtype, context_length=context_length, seed=seed,
            log=None if as_json else _say,
        ).report  # fmt: skip
    except VLMAssemblyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"out": str(out), **report.to_dict()}))
    else:
        typer.echo(
            f"wrote {out}: {report.lm_arch} LM + CLIP vision tower, {report.projector} projector, "
            f"{report.parameters:,} parameters ({report.dtype}); <image> = {report.image_tokens} tokens "
            f"(layer {report.feature_layer})"
        )


@app.command("pretrain-projector")
def pretrain_projector(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path | None = OUT,
    resume: bool = RESUME,
) -> None:
    """Train a VLM's projector alone on image-caption records (vision tower and LM frozen), as a recipe says."""
    from seshu.cli.common import quiet_libraries, recipe_overrides
    from seshu.config import load_recipe
    from seshu.multimodal.config import VLMPretrainRecipe
    from seshu.multimodal.pretrain_projector import run
    from seshu.train.common import main_process_log

    quiet_libraries()
    recipe = load_recipe(VLMPretrainRecipe, config, recipe_overrides(overrides, out))
    say = main_process_log(typer.echo)  # one report, however many processes train
    result = run(recipe, resume=resume, log=say)
    loss = result.metrics.get("eval_loss")
    summary = f"validation caption loss {loss:.4f}; " if loss is not None else ""
    say(f"done: {result.steps} steps, {summary}VLM written to {result.output_dir}")


@app.command("train")
def train(
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    out: Path | None = OUT,
    resume: bool = RESUME,
) -> None:
    """The whole path in one recipe: build the VLM, pretrain its projector, tune it on visual instructions and fold
    the adapter, each stage into a folder of its own under output_dir (--resume skips the finished ones)."""
    from seshu.cli.common import quiet_libraries, recipe_overrides
    from seshu.config import load_recipe
    from seshu.multimodal.pipeline import VLMRecipe, run
    from seshu.train.common import main_process_log

    quiet_libraries()
    recipe = load_recipe(VLMRecipe, config, recipe_overrides(overrides, out))
    say = main_process_log(typer.echo)  # one report, however many processes train
    result = run(recipe, resume=resume, log=say)
    losses = "; ".join(
        f"{stage} validation loss {metrics['eval_loss']:.4f}"
        for stage, metrics in result.metrics.items()
        if "eval_loss" in metrics
    )
    say(f"done: {losses + '; ' if losses else ''}the VLM is {result.final}")
