"""`--data A B` after one flag: the values that follow a list option are given the flag again."""

from __future__ import annotations

import typer

from seshu.cli import _register, app
from seshu.cli.argv import expand_list_options


def command() -> object:
    _register()
    return typer.main.get_command(app)


def test_values_after_a_list_option_are_expanded() -> None:
    args = ["tokenizer", "train", "--data", "a.txt", "b.txt", "--out", "tok", "--vocab-size", "300"]
    assert expand_list_options(command(), args) == [
        "tokenizer", "train", "--data", "a.txt", "--data", "b.txt", "--out", "tok", "--vocab-size", "300",
    ]  # fmt: skip
    assert expand_list_options(command(), ["pretrain", "-c", "r.yaml", "--set", "a=1", "b=2"]) == [
        "pretrain", "-c", "r.yaml", "--set", "a=1", "--set", "b=2",
    ]  # fmt: skip
    assert expand_list_options(command(), ["eval", "perplexity", "--data=a", "b", "--json"]) == [
        "eval", "perplexity", "--data=a", "--data", "b", "--json",
    ]  # fmt: skip


def test_repeated_flags_positional_commands_and_unknown_commands_are_left_alone() -> None:
    repeated = ["tokenizer", "train", "--data", "a", "--data", "b"]
    assert expand_list_options(command(), repeated) == repeated
    positional = ["eval", "plot", "run", "--out", "x.png"]  # a command with an argument is never rewritten
    assert expand_list_options(command(), positional) == positional
    assert expand_list_options(command(), ["nonsense", "--data", "a", "b"]) == ["nonsense", "--data", "a", "b"]
    assert expand_list_options(command(), ["tokenizer"]) == ["tokenizer"]


def test_several_paths_after_one_data_flag_train_one_tokenizer(tmp_path, corpus_files: list[str]) -> None:
    import subprocess
    import sys

    out = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, "-m", "seshu", "tokenizer", "train", "--data", *corpus_files, "--vocab-size", "300",
         "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trained a bpe tokenizer" in result.stdout and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert all(path in card for path in corpus_files)
