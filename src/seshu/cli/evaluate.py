"""`seshu eval perplexity|generate|plot`: argument parsing over `seshu.evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from seshu.config import TextUnit

app = typer.Typer(help="Evaluate models and plot training runs.", no_args_is_help=True, add_completion=False)


@app.command()
def perplexity(
    model: str = typer.Option(..., "--model", help="Model folder or Hub id."),
    data: list[str] = typer.Option(..., "--data", help="Corpus file, folder or dataset id (repeatable)."),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder applied on top of the model."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of JSON/CSV/Parquet records."),
    text_unit: TextUnit = typer.Option(
        "auto", "--text-unit", help="How a .txt file is cut into documents: auto, line, paragraph or file."
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Tokens per window; default the model's context (1024 if it has none)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Tokens a window moves on; smaller means more context per token. Default half."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    max_docs: int | None = typer.Option(None, "--max-docs", help="Evaluate the first N documents only."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, mps; default the best there is."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16; default as saved. Losses are summed in float32."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only, for scripts."),
) -> None:
    """Perplexity and bits per byte (comparable across tokenizers), overall and per script."""
    from seshu.cli.common import quiet_libraries
    from seshu.evaluate.perplexity import perplexity_from_paths

    quiet_libraries()  # stdout holds only the table or the JSON

    report = perplexity_from_paths(
        model,
        data,
        adapter=adapter,
        text_field=text_field,
        text_unit=text_unit,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        max_docs=max_docs,
        device=device,
        dtype=dtype,
        progress=not as_json,
    )
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    table = Table(title=model if adapter is None else f"{model} + {adapter}")
    for column in ("script", "documents", "tokens", "perplexity", "bits/byte"):
        table.add_column(column, justify="left" if column == "script" else "right")
    table.add_row(*_cells("all", report), end_section=True)
    for script, row in report["by_script"].items():
        table.add_row(*_cells(script, row))
    Console().print(table)


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="Model folder or Hub id."),
    task: str = typer.Option(..., "--task", help="translation, qa or instruct; caption for a VLM (image records)."),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Records: .jsonl/.json/.parquet file, folder or dataset id; for caption, LLaVA records (JSON/JSONL) or "
        "a COCO captions JSON.",
    ),
    src_file: str | None = typer.Option(None, "--src-file", help="Translation: source sentences, one per line."),
    tgt_file: str | None = typer.Option(None, "--tgt-file", help="Translation: their references, line-aligned."),
    adapter: str | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter folder applied on top of the model."),
    prompt_template: str | None = typer.Option(
        None,
        "--prompt-template",
        help="Prompt with {source}, {target_lang}, {source_lang} (translation) or {question}, {context} (qa).",
    ),
    target_lang: str | None = typer.Option(None, "--target-lang", help="Fills {target_lang}, e.g. Hindi."),
    source_lang: str | None = typer.Option(None, "--source-lang", help="Fills {source_lang}."),
    chat: bool | None = typer.Option(
        None,
        "--chat/--no-chat",
        help="Wrap prompts in the chat template; default: when the tokenizer has one, unless the model's card "
        "says it was only pretrained.",
    ),
    first_line: bool | None = typer.Option(
        None, "--first-line/--full-answer", help="Keep only the answer's first line; default on for translation, qa."
    ),
    image_folder: str | None = typer.Option(
        None, "--image-folder", help="Caption: the folder the records' image paths are in; default the records' folder."
    ),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        help="Caption: the user turn of COCO records, holding <image> once; default "
        "'<image>\\nGive a short caption of this image.'",
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Longest answer, in tokens; default 128, or half the model's context if less."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts generated together."),
    max_records: int | None = typer.Option(
        None, "--max-records", help="Evaluate the first N records (caption: images) only."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, mps; default the best there is."),
    out: Path | None = typer.Option(
        None, "--out", help="Write each record's prompt, prediction and reference (JSONL)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only, for scripts."),
) -> None:
    """Generate an answer for every record (greedy) and score them: chrF/BLEU, exact match/F1, or perplexity.

    A VLM captions image records (--task caption): once per image, chrF/BLEU against its captions, caption loss."""
    from seshu.cli.common import quiet_libraries
    from seshu.evaluate.generation_eval import generation_eval_from_paths

    quiet_libraries()
    result = generation_eval_from_paths(
        model,
        task,
        data=data,
        src_file=src_file,
        tgt_file=tgt_file,
        adapter=adapter,
        prompt_template=prompt_template,
        target_lang=target_lang,
        source_lang=source_lang,
        chat=chat,
        first_line=first_line,
        image_folder=image_folder,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_records=max_records,
        device=device,
        out=out,
        progress=not as_json,
    )
    if result.truncated:
        typer.echo(f"warning: {result.truncated} prompts were cut from the left to fit the model's context", err=True)
    report = result.report()
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    table = Table(title=f"{task}, {report['records']:,} records")
    table.add_column("score")
    table.add_column("value", justify="right")
    for name, value in report["scores"].items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.2f}")
    Console().print(table)
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Output folder of a training run (holds train_log.jsonl)."),
    out: Path | None = typer.Option(None, "--out", help="Image to write; default RUN_DIR/training.png."),
) -> None:
    """Plot training loss and validation perplexity against steps."""
    from seshu.evaluate.plot import plot_run

    typer.echo(f"wrote {plot_run(run_dir, out)}")


def _cells(name: str, row: dict[str, Any]) -> list[str]:
    ppl = row["perplexity"]
    return [
        name,
        f"{row['documents']:,}",
        f"{row['tokens']:,}",
        f"{ppl:,.3f}" if math.isfinite(ppl) and ppl < 1e6 else f"{ppl:.3g}",
        f"{row['bits_per_byte']:.4f}",
    ]
