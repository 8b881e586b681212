"""`seshu --help` tells the truth: every command, option and argument of every group has a help text, shown word
for word, and every default a help text states is the default the command really uses.

The command tree is walked as click builds it from the typer app, so a command added later is checked too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import typer


def _walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, command
    # typer builds click Groups (a vendored click in typer >= 0.20): both keep their subcommands in `.commands`.
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, f"{path} {name}")


def _commands() -> list[tuple[str, Any]]:
    from seshu.cli import _register, app

    _register()
    return list(_walk(typer.main.get_command(app), "seshu"))


COMMANDS = _commands()


def _params(command: Any) -> list[Any]:
    return [p for p in command.params if not getattr(p, "hidden", False)]


def _name(param: Any) -> str:
    return max(param.opts, key=len) if param.param_type_name == "option" else param.name.upper()


# A default is stated as "default 128", "(default: 0.25)", "defaults to 8" or "Default half"; the phrase runs to the
# end of its clause or parenthesis. Only the literal values in it are checked ("default the best there is" names none).
_STATED = re.compile(r"\bdefault(?:s to|:)?\s+(?P<phrase>[^;]*?)(?=;|\)|\.\s|\.?$)", re.IGNORECASE)
_LITERAL = re.compile(r"(?<![\w.-])(?:\d+(?:\.\d+)?(?:e-?\d+)?|true|false)(?![\w.-])", re.IGNORECASE)


def stated_defaults(help_text: str) -> list[str]:
    """The literal values (numbers, true/false) a help text gives as a default."""
    return [value for match in _STATED.finditer(help_text) for value in _LITERAL.findall(match["phrase"])]


def test_stated_defaults_are_found() -> None:
    assert stated_defaults("Stop after this many new tokens (default 128).") == ["128"]
    assert stated_defaults("AdamW learning rate (default 1e-3).") == ["1e-3"]
    assert stated_defaults("Held-out fraction (default: 0.25), or a file of 2 columns.") == ["0.25"]
    assert stated_defaults("Add the LM loss (default 0: off).") == ["0"]
    assert stated_defaults("Windows; defaults to 8. Larger is faster") == ["8"]
    assert stated_defaults("Tokens; default the model's context (1024 if it has none).") == ["1024"]
    assert stated_defaults("Use it (default true); 1 is off.") == ["true"]
    descriptive = ["cpu, cuda; default the best there is.", "Default half.", "default RUN_DIR/training.png."]
    descriptive += ["(default cuda, else mps, else cpu)", "Options for cuda:1 and a 2-layer model."]
    for text in descriptive:
        assert stated_defaults(text) == [], text


def _router_default(field: str) -> Callable[[], Any]:
    def default() -> Any:
        from seshu.moe.train import RouterTrainConfig

        return RouterTrainConfig.model_fields[field].default

    return default


def _perplexity_window() -> int:
    from seshu.evaluate.perplexity import DEFAULT_MAX_LENGTH

    return DEFAULT_MAX_LENGTH


def _answer_length() -> int:
    from seshu.evaluate.generation_eval import DEFAULT_MAX_NEW_TOKENS

    return DEFAULT_MAX_NEW_TOKENS


# Options that leave their default to the library (None on the command line, so a YAML config or the model can
# fill it in) but name it in their help: where the library keeps it.
LIBRARY_DEFAULTS: dict[tuple[str, str], Callable[[], Any]] = {
    ("seshu eval perplexity", "--max-length"): _perplexity_window,
    ("seshu eval generate", "--max-new-tokens"): _answer_length,
    **{
        ("seshu moe train-router", f"--{field.replace('_', '-')}"): _router_default(field)
        for field in ("validation", "steps", "lr", "batch_size", "lm_loss_weight", "seed")
    },
}

STATED = [
    (path, _name(param), value, param.default)
    for path, command in COMMANDS
    for param in _params(command)
    for value in stated_defaults(getattr(param, "help", None) or "")
]


@pytest.mark.parametrize(("path", "option", "stated", "default"), STATED, ids=[f"{p} {o}={v}" for p, o, v, _ in STATED])
def test_a_stated_default_is_the_real_one(path: str, option: str, stated: str, default: Any) -> None:
    if default is None:
        assert (path, option) in LIBRARY_DEFAULTS, (
            f"`{path} {option}` states the default {stated}, but the option's default is None: make it the "
            "option's default, or name where the library keeps it in LIBRARY_DEFAULTS"
        )
        default = LIBRARY_DEFAULTS[path, option]()
    if stated.lower() in ("true", "false"):
        assert default is (stated.lower() == "true"), (path, option, stated, default)
    else:
        assert float(stated) == pytest.approx(float(default)), f"`{path} {option}` says {stated}, uses {default}"


def test_library_defaults_are_all_still_stated() -> None:
    # An entry whose option no longer states a default is stale: it would hide a real mismatch later.
    assert set(LIBRARY_DEFAULTS) <= {(path, option) for path, option, _, _ in STATED}


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_command_has_a_help_text(path: str, command: Any) -> None:
    assert (command.help or "").strip(), f"`{path}` has no help text (give it a docstring or help=...)"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[path for path, _ in COMMANDS])
def test_every_option_and_argument_has_a_help_text(path: str, command: Any) -> None:
    missing = [_name(param) for param in _params(command) if not (getattr(param, "help", None) or "").strip()]
    assert not missing, f"`{path}`: no help text for {', '.join(missing)}"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[path for path, _ in COMMANDS])
def test_help_shows_every_word_of_the_help_texts(path: str, command: Any) -> None:
    # Typer renders help texts as rich markup: "[...]" is a tag and vanishes unless written "\[...]".
    from typer.testing import CliRunner

    from seshu.cli import app

    result = CliRunner().invoke(app, [*path.split()[1:], "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    texts = [command.help or "", *(getattr(param, "help", None) or "" for param in _params(command))]
    lost = [word for text in texts for word in text.replace("\\[", "[").split() if word not in result.output]
    assert not lost, f"`{path} --help` does not show {lost}"
