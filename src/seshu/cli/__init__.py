"""The `seshu` command line: one typer sub-app per command group, each a thin layer over the library."""

from __future__ import annotations

import functools
import logging
import os
import sys

import typer

from seshu.errors import UserError

app = typer.Typer(
    name="seshu",
    help="Build small language models by the public, for the public.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@functools.cache  # main() may run many times in one process (the tests): the groups are added once
def _register() -> None:
    # Imported here so that `seshu --help` stays fast and each group owns its own module.
    from seshu.cli import (
        adapters,
        client,
        evaluate,
        generate,
        merge,
        moe,
        pretrain,
        quickstart,
        server,
        sft,
        tokenizer,
        vlm,
    )

    app.add_typer(tokenizer.app, name="tokenizer")
    app.add_typer(evaluate.app, name="eval")
    app.add_typer(adapters.app, name="adapters")
    app.add_typer(moe.app, name="moe")
    app.add_typer(vlm.app, name="vlm")
    app.add_typer(server.app, name="server")
    app.add_typer(client.app, name="client")
    pretrain.register(app)
    sft.register(app)
    merge.register(app)
    generate.register(app)
    quickstart.register(app)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    # bitsandbytes warns at import, on every CPU without the optional `kernels` package, about a 4-bit kernel
    # Seshu does not need; without a handler of its own that reaches stderr through logging's last resort.
    logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())
    _register()
    from seshu.cli.argv import expand_list_options

    args = expand_list_options(typer.main.get_command(app), sys.argv[1:])
    try:
        app(args)
    except UserError as exc:
        # Under torchrun or accelerate every process meets the same bad input: the main one (rank 0) says so.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
