"""`seshu tokenizer train|stats`: argument parsing over `seshu.tokenizer`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import typer
from rich.console import Console
from rich.table import Table

from seshu.config import TextUnit

app = typer.Typer(help="Train tokenizers and measure them per script.", no_args_is_help=True, add_completion=False)


@app.command()
def train(
    data: list[str] = typer.Option(..., "--data", help="Corpus file, folder or dataset id (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the tokenizer to (created on success)."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Tokens in all, special tokens included."),
    kind: Literal["bpe", "unigram"] = typer.Option("bpe", "--kind", help="Byte-level BPE or Unigram."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSON/CSV/Parquet records."),
    text_unit: TextUnit = typer.Option(
        "auto", "--text-unit", help="How a .txt file is cut into documents: auto, line, paragraph or file."
    ),
    balance_alpha: float | None = typer.Option(
        None, "--balance-alpha", help="Balance scripts: 1 keeps the mix, 0 equal shares, 0.3 is typical."
    ),
    max_docs: int | None = typer.Option(None, "--max-docs", help="Train on a random sample of N documents."),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling and balancing."),
) -> None:
    """Train a byte-level BPE or Unigram tokenizer and save it as a Hugging Face folder."""
    from seshu.tokenizer import train_from_paths

    summary = train_from_paths(
        data,
        out,
        vocab_size,
        kind,
        text_field=text_field,
        text_unit=text_unit,
        balance_alpha=balance_alpha,
        max_docs=max_docs,
        seed=seed,
        # tokenizers' progress bars also write blank lines to stdout: keep them off when it is piped.
        show_progress=sys.stdout.isatty() and sys.stderr.isatty(),
    )
    repeated = (
        f" ({summary.training_documents} after balancing)" if summary.training_documents != summary.documents else ""
    )
    typer.echo(
        f"trained a {kind} tokenizer of {summary.vocab_size} tokens on {summary.documents} documents"
        f"{repeated} -> {summary.out}"
    )


@app.command()
def stats(
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer or model folder, or Hub id."),
    data: list[str] = typer.Option(..., "--data", help="Corpus file, folder or dataset id (repeatable)."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSON/CSV/Parquet records."),
    text_unit: TextUnit = typer.Option(
        "auto", "--text-unit", help="How a .txt file is cut into documents: auto, line, paragraph or file."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only, for scripts."),
) -> None:
    """Fertility (tokens per word) and bytes per token, per script."""
    from seshu.tokenizer import stats_from_paths, stats_report

    report = stats_report(stats_from_paths(tokenizer, data, text_field, text_unit))
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    table = Table(title=f"{tokenizer}")
    for column in ("script", "documents", "words", "tokens", "fertility", "bytes/token"):
        table.add_column(column, justify="left" if column == "script" else "right")
    for script, row in report["by_script"].items():
        table.add_row(
            script,
            f"{row['documents']:,}",
            f"{row['words']:,}",
            f"{row['tokens']:,}",
            f"{row['fertility']:.3f}",
            f"{row['bytes_per_token']:.3f}",
        )
    Console().print(table)
