"""A picture of a training run: training loss and validation perplexity against steps.

Reads the run log that `seshu.train.callbacks.RunLogCallback` appends to (RUN_DIR/train_log.jsonl, one JSON
object per line). Training entries carry "loss", evaluation entries "eval_loss" and "eval_perplexity"; the
rest (learning rate, tokens/s, the trainer's end-of-run summary) is ignored here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from seshu.errors import UserError

# The same name as seshu.train.callbacks.LOG_NAME, not imported from there: that module pulls in the whole
# transformers Trainer, which plotting a finished run does not need.
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "training.png"


@dataclass
class RunCurves:
    loss: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    perplexity: list[tuple[int, float]] = field(default_factory=list)  # (step, validation perplexity)


def read_run_log(path: Path) -> RunCurves:
    """The training-loss and validation-perplexity points of a run log, in file order."""
    curves = RunCurves()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)  # accepts the Infinity that json.dumps writes for math.inf
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int | float):
                continue
            step = int(entry["step"])
            if _is_number(entry.get("loss")):
                curves.loss.append((step, float(entry["loss"])))
            if _is_number(entry.get("eval_perplexity")):
                curves.perplexity.append((step, float(entry["eval_perplexity"])))
            elif _is_number(entry.get("eval_loss")):  # a log written by something other than RunLogCallback
                loss = float(entry["eval_loss"])
                curves.perplexity.append((step, math.exp(loss) if loss < 700 else math.inf))
    return curves


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR's training loss and validation perplexity against steps to `out` (default
    RUN_DIR/training.png) and return where it went. The format follows the suffix (PNG by default)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    log = run_dir / LOG_NAME
    if not log.is_file():
        raise UserError(f"{log}: no training log; is {run_dir} the output folder of `seshu pretrain`?")
    curves = read_run_log(log)
    if not curves.loss and not curves.perplexity:
        raise UserError(f"{log}: no training or evaluation entries yet; plot again after the first log step")
    out = Path(out) if out is not None else run_dir / PLOT_NAME
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, ppl_ax = figure.subplots(1, 2)
    panel(loss_ax, curves.loss, "training loss", "loss", "tab:blue", log_y=False)
    panel(ppl_ax, curves.perplexity, "validation perplexity", "perplexity", "tab:orange", log_y=True)
    figure.suptitle(run_dir.resolve().name)
    return save_figure(figure, out)


def save_figure(figure: Figure, out: Path) -> Path:
    """Write `figure` to `out` atomically, in the format its suffix names (PNG when it has none)."""
    fmt = out.suffix.lstrip(".").lower() or "png"
    # Figure + FigureCanvasAgg rather than pyplot: no global state and no GUI backend, whatever the
    # importer's matplotlib is set up for, and nothing to close afterwards.
    canvas = FigureCanvasAgg(figure)
    if fmt not in canvas.get_supported_filetypes():
        raise UserError(f"{out}: cannot write '.{fmt}' images; use .png, .svg or .pdf")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            canvas.print_figure(handle, format=fmt, dpi=120)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def panel(
    ax: Axes,
    points: list[tuple[int, float]],
    title: str,
    ylabel: str,
    color: str,
    *,
    log_y: bool,
    xlabel: str = "step",
) -> None:
    """One curve of `points` (x, value) on `ax`; non-finite values are left out."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # A diverged run logs inf/nan; they cannot be drawn (least of all on a log axis), so they are skipped.
    finite = [(s, v) for s, v in points if math.isfinite(v) and (v > 0 or not log_y)]
    if not finite:
        ax.text(0.5, 0.5, f"no {title} yet", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    steps, values = zip(*finite, strict=True)
    ax.plot(steps, values, color=color, marker="o" if len(finite) < 30 else None, markersize=3)
    if log_y:
        ax.set_yscale("log")
        # Plain numbers (60, not 6x10^1): a perplexity is read as a number of choices.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    ax.grid(True, alpha=0.3)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
