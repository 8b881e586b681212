"""`seshu merge`: argument parsing over `seshu.merge.engine`."""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _reuse_freed_buffers() -> None:
    """A merge allocates and frees buffers of a few MB (one chunk of each input) hundreds of times. glibc serves
    each from a fresh mmap and unmaps it on free, so every chunk pays its page faults again: ~15% of a linear
    merge's time. With these thresholds they stay in the heap and are reused. Set for this process only, which
    is why it is here and not in the library."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)


def merge(
    config: Path = typer.Option(..., "--config", "-c", help="Merge YAML (mergekit-style; see docs/guide.md)."),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the merged model or adapter (an earlier merge there is replaced)."
    ),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set parameters.lambda=0.8."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON, for scripts."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Merge models, or LoRA adapters of one base (linear, task_arithmetic, ties, dare_linear, dare_ties,
    breadcrumbs, slerp), streaming tensor by tensor."""
    from seshu.merge.engine import load_merge_config
    from seshu.merge.engine import merge as run_merge

    _reuse_freed_buffers()
    merge_config = load_merge_config(config, overrides)
    text = config.read_text(encoding="utf-8") if not overrides else None
    report = run_merge(merge_config, out, progress=progress, config_text=text)
    if as_json:
        payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in report.__dict__.items()}
        typer.echo(json.dumps(payload))
        return
    extra = ""
    if report.refactor_error is not None:
        extra = f"; rank-{merge_config.output.rank} re-factoring error {report.refactor_error:.3g} (relative)"
    typer.echo(
        f"wrote {report.out}: {report.kind}, {report.method}, {report.tensors} tensors, {report.parameters:,} "
        f"parameters, {report.out_dtype}, {report.seconds:.1f} s{extra}"
    )
