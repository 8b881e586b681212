"""`seshu quickstart` and `seshu quickstart --federated`."""

from __future__ import annotations

from pathlib import Path

import typer

from seshu.cli.common import quiet_libraries


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)


def quickstart(
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        help="Where everything is written (default: seshu-quickstart; seshu-federation-demo with --federated).",
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Fewer or more pretraining steps."),
    federated: bool = typer.Option(
        False, "--federated", help="Run a federation round instead: a coordinator and three donors, one hostile."
    ),
) -> None:
    """Train a tokenizer and a tiny model on the bundled English + Hindi corpus, evaluate it and sample from it:
    offline, on a CPU, in a few minutes. With --federated, make that model release v0 of a federation served on
    127.0.0.1 and run one round: three donors fine-tune and submit adapters (one tampers with its own), a worker
    evaluates them blind, and the accepted ones are merged into release v1."""
    quiet_libraries()
    if federated:
        _federated(workdir or Path("seshu-federation-demo"), max_steps)
        return
    from seshu.quickstart import run

    result = run(workdir or Path("seshu-quickstart"), max_steps=max_steps, log=typer.echo)
    typer.echo(
        f"\nperplexity {result.perplexity_before:.1f} -> {result.perplexity_after:.1f}\n"
        f"tokenizer:  {result.tokenizer_dir}\n"
        f"model:      {result.model_dir}  (card: README.md, log: train_log.jsonl, plot: training.png)\n"
        f"next:       seshu chat --model {result.model_dir}"
    )


def _federated(workdir: Path, max_steps: int | None) -> None:
    from seshu.federation.demo import PRETRAIN_STEPS, run_federated_demo

    result = run_federated_demo(workdir, typer.echo, pretrain_steps=max_steps or PRETRAIN_STEPS)
    minutes, seconds = divmod(round(result.seconds["total"]), 60)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items() if k != "total")
    lines = ["", f"done in {minutes}m{seconds:02d}s ({stages})"]
    for sub in result.submissions:
        what = "honest" if sub.tampering is None else sub.tampering
        lines.append(f"  {sub.blind_id}  {sub.donor:<8} {what:<13} {sub.status}")
    if result.published:
        v0, v1 = result.metrics[0], result.metrics[result.version or 1]
        lines.append(f"release v{result.version} against v0 (lower is better):")
        lines += [f"  {name:<28} {v0[name]:8.2f} -> {v1[name]:8.2f}" for name in v0]
        lines += [
            f"  {donor + ' (held out)':<28} {before:8.2f} -> {after:8.2f}"
            for donor, (before, after) in result.task_scores.items()
        ]
        lines.append(f"next:       seshu chat --model {result.workdir / 'donors' / 'v1'}")
    else:
        lines.append("no release: " + ("; ".join(result.release_reasons) or "no submission was accepted"))
    lines.append(f"federation: {result.federation_dir}  (seshu server start --dir {result.federation_dir})")
    typer.echo("\n".join(lines))
