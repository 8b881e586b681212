import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from seshu.config import PretrainRecipe, validate
from seshu.errors import UserError
from seshu.hub.card import read_card_metadata
from seshu.train import pretrain
from seshu.train.precision import describe_precision, resolve_precision


def make_recipe(out: Path, corpus: list[str], tokenizer: Path | None = None, **sections: Any) -> PretrainRecipe:
    raw: dict[str, Any] = {
        "model": {"arch": "llama", "preset": "tiny"},
        "tokenizer": {"path": str(tokenizer)} if tokenizer else {"train": {"vocab_size": 300}},
        "data": {"train": corpus, "validation": 0.1, "clean": {"min_chars": 20}},
        "train": {
            "seq_len": 32,
            "batch_size": 4,
            "max_steps": 24,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_every": 12,
            "save_every": 12,
            "log_every": 4,
        },
        "output_dir": str(out),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate(PretrainRecipe, raw, "test recipe")


def log_entries(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_writes_a_plain_hf_model(tmp_path: Path, corpus_files: list[str]) -> None:
    out = tmp_path / "run"
    lines: list[str] = []
    result = pretrain.run(make_recipe(out, corpus_files), log=lines.append)
    assert lines[:2] == [f"data: {path}: read line by line (text_unit: auto)" for path in corpus_files]
    assert lines[2] == "training a bpe tokenizer (300 tokens) on the training corpus"
    precision = describe_precision("auto")  # bf16 mixed precision on a CPU with native bf16, else float32
    assert lines[3].startswith(f"model: llama, {result.parameters:,} parameters; {precision}; 24 steps of 128 tokens")
    assert [line.split(" |")[0] for line in lines[4:] if "| loss" in line] == [f"step {s}/24" for s in range(4, 25, 4)]

    losses = [e["loss"] for e in log_entries(out) if "loss" in e]
    assert losses[-1] < losses[0] - 1.0
    assert result.steps == 24
    assert result.metrics["eval_perplexity"] < 300 / 2  # an untrained model scores about its vocabulary size

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The village", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]

    assert not list(out.glob("*.bin")), "the published model must hold no pickles"
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = read_card_metadata(out / "README.md")["seshu"]
    assert card["steps"] == 24
    assert card["metrics"]["eval_perplexity"] == pytest.approx(result.metrics["eval_perplexity"])
    assert {i["path"] for i in card["inputs"]} == set(corpus_files)
    assert all(len(i["sha256"]) == 64 for i in card["inputs"])
    assert card["recipe"]["model"]["arch"] == "llama"
    assert card["precision"] == resolve_precision("auto")
    assert f"Trained in {precision}." in (out / "README.md").read_text()
    assert (out / "tokenizer" / "tokenizer.json").is_file()


class _Crash(TrainerCallback):
    """Stands in for a kill: the process dies at `step`, after the checkpoint before it was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path
) -> None:
    whole = pretrain.run(make_recipe(tmp_path / "whole", corpus_files, tiny_tokenizer_dir))

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir), callbacks=[_Crash(17)])
    assert (out / "checkpoints" / "checkpoint-12").is_dir()
    assert not (out / "model.safetensors").exists()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir))

    resumed = pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir), resume=True)
    assert resumed.steps == 24
    steps = [e["step"] for e in log_entries(out) if "loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "the log reads as one run"
    a, b = load_file(whole.output_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_continued_pretraining_starts_from_the_given_model(tmp_path: Path, corpus_files: list[str]) -> None:
    first = pretrain.run(make_recipe(tmp_path / "first", corpus_files, train={"max_steps": 8}))
    again = make_recipe(
        tmp_path / "second", corpus_files, model={"init_from": str(first.output_dir)}, train={"max_steps": 4}
    )
    assert again.tokenizer.path is None  # the init model's tokenizer is used
    initial = pretrain.prepare_model(again, AutoTokenizer.from_pretrained(first.output_dir))
    trained = AutoModelForCausalLM.from_pretrained(first.output_dir)
    for (name, p), q in zip(initial.named_parameters(), trained.parameters(), strict=True):
        assert torch.equal(p, q), name
    result = pretrain.run(again)
    assert result.metrics["eval_perplexity"] <= first.metrics["eval_perplexity"] * 1.05


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"train": ["missing-corpus.txt"]}}, "missing-corpus.txt"),
        ({"model": {"arch": "transformer-xxl"}}, "unknown model arch"),
        ({"model": {"preset": "colossal"}}, "unknown preset"),
        ({"train": {"precision": "fp16"}}, "fp16 needs a CUDA GPU"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path, change: dict[str, Any], message: str
) -> None:
    if "precision" in change.get("train", {}) and torch.cuda.is_available():
        pytest.skip("fp16 is available here")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir, **change))
    assert not out.exists()


def test_empty_corpus_and_mismatched_tokenizer(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=r"empty\.txt"):
        pretrain.run(make_recipe(tmp_path / "a", [str(empty)], tiny_tokenizer_dir))
    assert not (tmp_path / "a").exists()

    small = pretrain.run(make_recipe(tmp_path / "small", corpus_files, train={"max_steps": 2}))
    mismatched = make_recipe(
        tmp_path / "b", corpus_files, tiny_tokenizer_dir, model={"init_from": str(small.output_dir)}
    )
    with pytest.raises(UserError, match="the tokenizer has 400 tokens but the model's vocabulary has 300"):
        pretrain.run(mismatched)
    assert not (tmp_path / "b").exists()


def test_missing_optional_packages_are_named_up_front(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find_spec(name, *a)
    )
    recipe = make_recipe(tmp_path / "run", corpus_files, tiny_tokenizer_dir, track={"report_to": "mlflow"})
    with pytest.raises(UserError, match=r"track.report_to: mlflow is not installed \(pip install 'seshu\[track\]'\)"):
        pretrain.run(recipe)
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_says_so_instead_of_training_past_max_steps(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path
) -> None:
    out = tmp_path / "done"
    pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir, train={"max_steps": 4, "save_every": 4}))
    with pytest.raises(UserError, match=r"already trained to step 4 \(train.max_steps=4\)"):
        pretrain.run(
            make_recipe(out, corpus_files, tiny_tokenizer_dir, train={"max_steps": 4, "save_every": 4}), resume=True
        )
    more = pretrain.run(
        make_recipe(out, corpus_files, tiny_tokenizer_dir, train={"max_steps": 6, "save_every": 4}), resume=True
    )
    assert more.steps == 6


def test_a_misspelt_override_fails_before_the_tokenizer_is_trained(tmp_path: Path, corpus_files: list[str]) -> None:
    recipe = make_recipe(tmp_path / "run", corpus_files, model={"overrides": {"hiden_size": 8}})
    with pytest.raises(UserError, match="'hiden_size' is not a field of LlamaConfig"):
        pretrain.run(recipe)
    assert not (tmp_path / "run").exists()


def test_lora_continued_pretraining_writes_an_adapter_that_folds(tmp_path: Path, corpus_files: list[str]) -> None:
    from peft import PeftModel

    from seshu.merge.fold import fold_adapter

    base = pretrain.run(make_recipe(tmp_path / "base", corpus_files, train={"max_steps": 6})).output_dir
    out = tmp_path / "cpt"
    recipe = make_recipe(out, corpus_files, model={"init_from": str(base)}, lora={"r": 4}, train={"max_steps": 8})
    result = pretrain.run(recipe)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    folded = tmp_path / "folded"
    fold_adapter(str(base), str(out), folded, dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(folded).config.model_type == "llama"
    assert result.metrics["eval_perplexity"] > 0

    with pytest.raises(UserError, match=r"lora: LoRA continued pretraining needs model\.init_from"):
        pretrain.run(make_recipe(tmp_path / "x", corpus_files, lora={"r": 4}))


def test_continued_pretraining_refuses_blocks_longer_than_the_models_context(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path
) -> None:
    base = pretrain.run(make_recipe(tmp_path / "base", corpus_files, tiny_tokenizer_dir, train={"max_steps": 2}))
    out = tmp_path / "longer"
    recipe = make_recipe(out, corpus_files, model={"init_from": str(base.output_dir)}, train={"seq_len": 48})
    with pytest.raises(
        UserError, match=r"train\.seq_len: blocks of 48 tokens are longer than .*base's context of 32 tokens"
    ):
        pretrain.run(recipe)
    assert not out.exists()


def test_a_plot_that_cannot_be_drawn_leaves_a_finished_run_finished(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import seshu.evaluate.plot
    from seshu.cli.pretrain import pretrain as pretrain_command

    def broken(*args: Any) -> None:
        raise RuntimeError("no display and no Agg either")

    monkeypatch.setattr(seshu.evaluate.plot, "plot_run", broken)
    out = tmp_path / "run"
    config = tmp_path / "recipe.yaml"
    recipe = make_recipe(out, corpus_files, tiny_tokenizer_dir, train={"max_steps": 2})
    config.write_text(json.dumps(recipe.model_dump(mode="json")), encoding="utf-8")
    pretrain_command(config=config, overrides=[], out=None, resume=False)  # returns: exit code 0
    printed = capsys.readouterr().out.splitlines()
    assert "warning: no training plot (no display and no Agg either); the model is written" in printed
    assert printed[-1].startswith("done: 2 steps") and (out / "model.safetensors").is_file()
    assert not (out / "training.png").exists()


def test_mlflow_tracks_into_the_run_folder(
    tmp_path: Path, corpus_files: list[str], tiny_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    import sqlite3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "1")  # transformers' callback then uploads the checkpoints
    started = tmp_path / "cwd"
    started.mkdir()
    monkeypatch.chdir(started)
    out = tmp_path / "run"
    track = {"report_to": "mlflow", "experiment": "tiny"}
    pretrain.run(make_recipe(out, corpus_files, tiny_tokenizer_dir, track=track, train={"max_steps": 4}))
    assert not list(started.iterdir()), "nothing (no ./mlruns) where the command was started"
    with sqlite3.connect(out / "mlflow.db") as db:
        (location,) = db.execute("select artifact_location from experiments where name = 'tiny'").fetchone()
        metrics = {name for (name,) in db.execute("select distinct key from metrics")}
    assert location == (out / "mlflow-artifacts").resolve().as_uri()
    assert {"loss", "eval_loss"} <= metrics
    assert list((out / "mlflow-artifacts").rglob("model.safetensors")), "the checkpoint went into the run folder"
