"""The `seshu` entry point: help, and user errors as one line with exit code 2 and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest


def seshu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from seshu.cli import main; sys.argv = ['seshu', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_command_group() -> None:
    result = seshu("--help")
    assert result.returncode == 0
    for command in ("quickstart", "tokenizer", "pretrain", "eval", "generate", "chat"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("recipe", "args", "message"),
    [
        (None, [], "recipe file not found"),
        ("data: {train: a.txt}\n", ["--set", "train.nonsense=1"], "unknown key 'train.nonsense'"),
        ("data: {train: [a.txt\n", [], "malformed YAML"),
        ("data: {train: missing.txt}\n", [], "missing.txt"),
        ("model: {arch: gpt9}\ndata: {train: a.txt}\n", [], "unknown model arch 'gpt9'"),
    ],
)
def test_pretrain_user_errors(tmp_path: Path, recipe: str | None, args: list[str], message: str) -> None:
    path = tmp_path / "recipe.yaml"
    if recipe is not None:
        path.write_text(recipe)
    result = seshu("pretrain", "--config", str(path), "--out", str(tmp_path / "out"), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_other_commands_report_missing_inputs(tmp_path: Path) -> None:
    for args in (
        ["eval", "perplexity", "--model", str(tmp_path / "nope"), "--data", str(tmp_path)],
        ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        [
            "tokenizer",
            "train",
            "--data",
            str(tmp_path / "none.txt"),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "t"),
        ],
    ):
        result = seshu(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_out_is_a_path_even_when_it_reads_as_yaml() -> None:
    from seshu.cli.common import recipe_overrides
    from seshu.config import apply_overrides

    for out in ("123", "true", "2024-01-01"):
        raw = apply_overrides({}, recipe_overrides([], Path(out)))
        assert raw["output_dir"] == out
