"""`--data A B C` as well as `--data A --data B --data C`.

click gives an option one value per occurrence, so a list option must be repeated; users (and the README)
write the values after one flag, as argparse's `nargs="+"` allows. Before click parses, the values that follow
a list option are given the flag again. Only commands without positional arguments are rewritten: there a
word that is not an option can only be a value of the option before it.
"""

from __future__ import annotations

from typing import Any

# typer ships its own copy of click, so commands and parameters are told apart by their attributes
# (`commands` on a group, `param_type_name` on a parameter) rather than by click's classes.


def expand_list_options(group: Any, args: list[str]) -> list[str]:
    """`args` with `--opt A B` written as `--opt A --opt B` for every `multiple` option of the subcommand
    that `args` names (unchanged when the command takes positional arguments or is not found)."""
    command, position = _leaf(group, args)
    if command is None or any(param.param_type_name == "argument" for param in command.params):
        return args
    repeated = {name for param in command.params if getattr(param, "multiple", False) for name in param.opts}
    expanded = list(args[:position])
    current: str | None = None
    for arg in args[position:]:
        if arg == "--":
            current = None
        elif arg.startswith("-"):
            name = arg.split("=", 1)[0]  # --data=A B: B is the option's too
            current = name if name in repeated else None
        elif current is not None and expanded[-1] != current:
            expanded.append(current)
        expanded.append(arg)
    return expanded


def _leaf(group: Any, args: list[str]) -> tuple[Any, int]:
    """The command `args` names under `group`, and the index of its first own argument."""
    command = group
    for index, arg in enumerate(args):
        if not hasattr(command, "commands"):
            return command, index
        command = command.commands.get(arg)
        if command is None:
            return None, index
    return (None, len(args)) if hasattr(command, "commands") else (command, len(args))
