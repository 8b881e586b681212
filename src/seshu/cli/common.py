"""Helpers every command group shares."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import typer

# The options every recipe-driven command (pretrain, sft) takes.
CONFIG = typer.Option(..., "--config", "-c", help="Recipe YAML (see recipes/).")
OVERRIDES = typer.Option([], "--set", help="Override any recipe key: --set train.lr=3e-4 (repeatable).")
OUT = typer.Option(None, "--out", help="Output directory (overrides the recipe's output_dir).")
RESUME = typer.Option(False, "--resume", help="Continue from the last checkpoint in the output directory.")


def recipe_overrides(overrides: list[str], out: Path | None) -> list[str]:
    """The --set assignments, with --out as one more."""
    # JSON-quoted: --set values are YAML, and a folder named 123 or true must stay a string.
    return [*overrides, f"output_dir={json.dumps(str(out))}"] if out else overrides


def quiet_libraries() -> None:
    """Keep the terminal for Seshu's own progress: library chatter goes only to warnings and errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
