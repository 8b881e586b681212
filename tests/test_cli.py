"""Every command group of `seshu`, run the way a user runs it: through the real entry point (`seshu.cli.main`, so a
user error is one `error:` line and exit code 2) on tiny inputs, in this process.

The artifacts chain as they do for a user: `tokenizer train` -> `pretrain` -> `sft` -> `adapters fold` -> `merge`,
with `eval`, `generate` and `chat` on what they made. Groups whose heavy runs live in a test file of their own get
a cheap real invocation here and a pointer to that file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import Outcome, seshu
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from seshu.hub.card import read_card_metadata

GROUPS = ["quickstart", "tokenizer", "pretrain", "sft", "eval", "adapters", "merge", "moe", "generate", "chat"]
GROUPS += ["server", "client"]
TOPICS = ["river", "market", "school", "train", "festival", "garden", "library", "kitchen"]


def ok(outcome: Outcome) -> Outcome:
    assert outcome.code == 0, (outcome.code, outcome.out, outcome.err)
    return outcome


@dataclass
class Made:
    """What the commands made, each from the one before."""

    root: Path
    corpus: Path
    tokenizer: Path
    tokenizer_run: Outcome
    model: Path
    pretrain_run: Outcome
    records: Path
    adapter: Path
    sft_run: Outcome


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, corpus_files: list[str]) -> Iterator[Made]:
    root = tmp_path_factory.mktemp("cli")
    corpus = Path(corpus_files[0])  # the bundled English sample
    tokenizer_run = ok(seshu("tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", root / "tok"))

    recipe = {
        "model": {"arch": "llama", "preset": "tiny", "overrides": {"hidden_size": 64, "num_hidden_layers": 1}},
        "tokenizer": {"path": str(root / "tok")},
        "data": {"train": [str(corpus)], "validation": 0.1, "clean": {"min_chars": 20}},
        "train": {"seq_len": 64, "batch_size": 4, "max_steps": 4, "eval_every": 4, "save_every": 4, "log_every": 2},
    }
    (root / "pretrain.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    # --out is a relative folder whose name YAML would read as a date: it must stay a path.
    cwd = Path.cwd()
    os.chdir(root)
    try:
        pretrain_run = seshu("pretrain", "--config", "pretrain.yaml", "--out", "2024-01-01", "--set", "train.lr=3e-3")
    finally:
        os.chdir(cwd)
    ok(pretrain_run)

    records = root / "alpaca.json"
    rows = [{"instruction": f"Name the place {i}.", "input": f"At the {t}.", "output": t} for i, t in enumerate(TOPICS)]
    records.write_text(json.dumps(rows), encoding="utf-8")
    sft_recipe = {
        "model": {"init_from": str(root / "2024-01-01")},
        "data": {"train": str(records), "validation": 0.25},
        "train": {"seq_len": 64, "batch_size": 4, "max_steps": 2, "eval_every": 2, "save_every": 2, "log_every": 1},
    }
    (root / "sft.yaml").write_text(yaml.safe_dump(sft_recipe), encoding="utf-8")
    sft_run = ok(seshu("sft", "--config", root / "sft.yaml", "--out", root / "adapter"))
    model, adapter = root / "2024-01-01", root / "adapter"
    yield Made(root, corpus, root / "tok", tokenizer_run, model, pretrain_run, records, adapter, sft_run)


def test_help_lists_every_command_group() -> None:
    result = ok(seshu("--help"))
    for group in GROUPS:
        assert f" {group} " in result.out, group


def test_the_entry_point_registers_the_commands_once() -> None:
    # Each call of a process that runs `main()` more than once (these tests, an embedding app) got slower than the
    # one before: click rebuilt the command tree with every earlier registration in it.
    from seshu.cli import app

    seshu("--help")
    registered = len(app.registered_groups), len(app.registered_commands)
    seshu("--help")
    assert (len(app.registered_groups), len(app.registered_commands)) == registered


def test_a_user_error_is_one_line_in_a_process_of_its_own(tmp_path: Path) -> None:
    # What the libraries print as they are imported (bitsandbytes warns on CPUs without `kernels`) shows up only in
    # a fresh process; `pretrain` imports them all before it finds the recipe missing.
    command = [sys.executable, "-m", "seshu", "pretrain", "--config", str(tmp_path / "missing.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing.yaml'}: recipe file not found"], result.stderr


def test_under_a_launcher_only_the_main_process_reports_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    other = seshu("pretrain", "--config", missing, env={"RANK": "1"})
    assert other.code == 2 and other.err == ""
    assert "recipe file not found" in seshu("pretrain", "--config", missing, env={"RANK": "0"}).error


# ------------------------------------------------------------------------------------------------ tokenizer
# The tokenizer's own behaviour (round trips, balancing, statistics) is tested in tests/test_tokenizer.py.


def test_tokenizer_train_and_stats(made: Made) -> None:
    assert "trained a bpe tokenizer of 300 tokens" in made.tokenizer_run.out
    assert len(AutoTokenizer.from_pretrained(made.tokenizer)) == 300
    stats = ok(seshu("tokenizer", "stats", "--tokenizer", made.tokenizer, "--data", made.corpus, "--json"))
    latin = json.loads(stats.out)["by_script"]["Latin"]
    assert latin["documents"] > 0 and latin["fertility"] > 1


def test_tokenizer_user_errors(tmp_path: Path) -> None:
    missing = seshu("tokenizer", "train", "--data", tmp_path / "none.txt", "--out", tmp_path / "tok")
    assert "none.txt" in missing.error
    assert not (tmp_path / "tok").exists()
    stats = seshu("tokenizer", "stats", "--tokenizer", tmp_path / "none", "--data", "x")
    assert "tokenizer folder not found" in stats.error


# ------------------------------------------------------------------------------------------------ pretrain
# Learning, resuming, continued pretraining and LoRA pretraining: tests/test_pretrain.py.


def test_pretrain_writes_a_model_transformers_loads(made: Made) -> None:
    assert made.pretrain_run.out.splitlines()[-1].startswith("done: 4 steps, validation perplexity ")
    model = AutoModelForCausalLM.from_pretrained(made.model)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 1
    card = read_card_metadata(made.model / "README.md")["seshu"]
    assert card["steps"] == 4 and card["recipe"]["train"]["lr"] == 3e-3  # --set reached the run


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
    (tmp_path / "a.txt").write_text("Some text that is long enough to keep.\n")
    cwd = Path.cwd()
    os.chdir(tmp_path)  # the recipes name their data relative to the working folder
    try:
        result = seshu("pretrain", "--config", path, "--out", tmp_path / "out", *args)
    finally:
        os.chdir(cwd)
    assert message in result.error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ sft
# LoRA, QLoRA, full fine-tuning, packing and resuming: tests/test_sft.py.


def test_sft_writes_an_adapter_peft_loads(made: Made) -> None:
    assert made.sft_run.out.splitlines()[-1].startswith("done: 2 steps, answer-only validation loss ")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(made.model), made.adapter)
    config = adapted.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.r > 0


def test_sft_user_errors(made: Made, tmp_path: Path) -> None:
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": str(made.records)}}), encoding="utf-8")
    assert "model.init_from" in seshu("sft", "--config", path, "--out", tmp_path / "out").error
    path.write_text(yaml.safe_dump({"model": {"init_from": str(made.model)}, "data": {"train": "gone.json"}}))
    assert "gone.json" in seshu("sft", "--config", path, "--out", tmp_path / "out").error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ adapters
# Folding every architecture and its checks against base + adapter: tests/test_fold.py.


@pytest.fixture(scope="module")
def folded(made: Made) -> Path:
    out = made.root / "folded"
    args = ["adapters", "fold", "--base", made.model, "--adapter", made.adapter, "--out", out, "--dtype", "float32"]
    result = ok(seshu(*args, "--json"))
    report = json.loads(result.out)
    assert report["out"] == str(out) and report["dtype"] == "float32" and report["max_abs_diff"] < 1e-4
    return out


def test_adapters_fold_writes_a_standalone_model(folded: Path) -> None:
    assert AutoModelForCausalLM.from_pretrained(folded).config.hidden_size == 64


def test_adapters_user_errors(made: Made, tmp_path: Path) -> None:
    args = ["adapters", "fold", "--base", made.model, "--adapter", tmp_path / "none", "--out", tmp_path / "out"]
    assert "adapter directory not found" in seshu(*args).error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ merge
# Every method, its agreement with mergekit, bounded memory and the config checks: tests/test_merge_engine.py.


def test_merge_of_a_model_and_its_fold(made: Made, folded: Path, tmp_path: Path) -> None:
    models = [{"model": str(model), "parameters": {"weight": 0.5}} for model in (made.model, folded)]
    config = {"merge_method": "linear", "models": models, "dtype": "float32"}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = ok(seshu("merge", "--config", path, "--out", tmp_path / "merged", "--no-progress", "--json"))
    assert json.loads(result.out)["method"] == "linear"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.hidden_size == 64


def test_merge_user_errors(made: Made, tmp_path: Path) -> None:
    assert "not found" in seshu("merge", "--config", tmp_path / "none.yaml", "--out", tmp_path / "out").error
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "models": [{"model": str(made.model)}]}))
    assert "base_model" in seshu("merge", "--config", path, "--out", tmp_path / "out").error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ moe
# Building MoEs from dense experts and training their routers: tests/test_moe.py and tests/test_moe_train.py.


def test_moe_help_lists_its_commands() -> None:
    result = ok(seshu("moe", "--help"))
    assert " build " in result.out and " train-router " in result.out


def test_moe_user_errors(tmp_path: Path) -> None:
    assert "not found" in seshu("moe", "build", "--config", tmp_path / "none.yaml", "--out", tmp_path / "out").error
    assert "'model'" in seshu("moe", "train-router", "--out", tmp_path / "out", "--data", "p.jsonl").error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ eval
# Perplexity, bits per byte and generation tasks in depth: tests/test_evaluate.py, tests/test_evaluate_tasks.py.


def test_eval_perplexity_with_and_without_the_adapter(made: Made) -> None:
    args = ["eval", "perplexity", "--model", made.model, "--data", made.corpus, "--max-docs", "4", "--json"]
    base = json.loads(ok(seshu(*args)).out)
    adapted = json.loads(ok(seshu(*args, "--adapter", made.adapter)).out)
    assert base["documents"] == adapted["documents"] == 4
    assert 1 < base["perplexity"] < 1e4 and base["bits_per_byte"] > 0
    assert adapted["perplexity"] != base["perplexity"]


def test_eval_generate_scores_every_record(made: Made) -> None:
    args = ["eval", "generate", "--model", made.model, "--adapter", made.adapter, "--task", "instruct"]
    result = ok(seshu(*args, "--data", made.records, "--max-new-tokens", "4", "--max-records", "3", "--json"))
    report = json.loads(result.out)
    assert report["records"] == 3 and report["scores"], report


def test_eval_plot_draws_the_run(made: Made, tmp_path: Path) -> None:
    result = ok(seshu("eval", "plot", made.model, "--out", tmp_path / "run.png"))
    assert result.out.strip() == f"wrote {tmp_path / 'run.png'}"
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_user_errors(made: Made, tmp_path: Path) -> None:
    args = ["eval", "perplexity", "--model", tmp_path / "none", "--data", made.corpus]
    assert "model directory not found" in seshu(*args).error
    assert "no training log" in seshu("eval", "plot", tmp_path).error
    args = ["eval", "generate", "--model", made.model, "--task", "instruct", "--data", tmp_path / "none.jsonl"]
    assert "none.jsonl" in seshu(*args).error


# ------------------------------------------------------------------------------------------------ generate, chat
# Sampling, streaming, chat templates and adapters in depth: tests/test_generate.py.


def test_generate_is_greedy_and_repeatable(made: Made) -> None:
    options = ["--model", made.model, "--temperature", "0", "--max-new-tokens", "6"]
    first = ok(seshu("generate", *options, "--prompt", "The village"))
    again = ok(seshu("generate", *options, "--prompt", "The village"))
    from_stdin = ok(seshu("generate", *options, "--prompt", "-", stdin="The village"))
    assert first.out.strip() and first.out == again.out == from_stdin.out


def test_chat_answers_until_exit(made: Made) -> None:
    result = ok(seshu("chat", "--model", made.model, "--max-new-tokens", "4", stdin="hello\n/exit\n"))
    assert "chatting with" in result.err and result.out.startswith("> ")


def test_generate_and_chat_user_errors(made: Made, tmp_path: Path) -> None:
    assert "model directory not found" in seshu("generate", "--model", tmp_path / "none", "--prompt", "hi").error
    assert "temperature" in seshu("chat", "--model", made.model, "--temperature", "-1").error


# ------------------------------------------------------------------------------------------------ quickstart
# The whole loop, perplexity falling and a second run replacing the first: tests/test_quickstart.py; the
# federated demo: tests/test_federation_demo.py.


def test_quickstart_help_names_its_options() -> None:
    result = ok(seshu("quickstart", "--help"))
    assert "--workdir" in result.out and "--max-steps" in result.out and "--federated" in result.out


def test_quickstart_on_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert "notes.txt" in seshu("quickstart", "--workdir", tmp_path / "notes.txt", "--max-steps", "1").error
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ server, client
# The federation through its commands (init, add-client, migrate, start, worker, release, report, and a donor's
# pull, train, submit, status against a live coordinator): tests/test_federation_cli.py.


def test_server_and_client_help_list_their_commands() -> None:
    server = ok(seshu("server", "--help")).out
    for command in ("init", "migrate", "add-client", "start", "worker", "release", "report"):
        assert f" {command} " in server, command
    client = ok(seshu("client", "--help")).out
    for command in ("pull", "train", "submit", "status"):
        assert f" {command} " in client, command


def test_server_user_errors(tmp_path: Path) -> None:
    assert "give --dir" in seshu("server", "worker").error
    assert "not a federation folder" in seshu("server", "add-client", "asha", "--dir", tmp_path).error
    assert not list(tmp_path.iterdir())


def test_client_user_errors(tmp_path: Path) -> None:
    server = ["--server", "http://127.0.0.1:9", "--token", "t"]
    assert "give either --adapter" in seshu("client", "submit", "--task", "qa", "--language", "hi", *server).error
    assert "cannot reach the coordinator" in seshu("client", "status", *server).error
    args = ["client", "train", "--data", tmp_path / "d.jsonl", "--release", tmp_path / "rel", "--out", tmp_path / "a"]
    assert "not a pulled release" in seshu(*args).error
    assert not list(tmp_path.iterdir())
