"""`seshu quickstart`."""

from __future__ import annotations

from pathlib import Path

import typer

from seshu.cli.common import quiet_libraries


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)


def quickstart(
    workdir: Path = typer.Option(Path("seshu-quickstart"), "--workdir", help="Where everything is written."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Fewer or more pretraining steps."),
) -> None:
    """Train a tokenizer and a tiny model on the bundled English + Hindi corpus, evaluate it and sample from it:
    offline, on a CPU, in a few minutes."""
    from seshu.quickstart import run

    quiet_libraries()
    result = run(workdir, max_steps=max_steps)
    typer.echo(
        f"\nperplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f}\n"
        f"tokenizer:  {result.tokenizer_dir}\n"
        f"model:      {result.model_dir}  (card: README.md, log: train_log.jsonl, plot: training.png)\n"
        f"next:       seshu chat --model {result.model_dir}"
    )
