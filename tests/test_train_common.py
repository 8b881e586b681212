"""seshu.train.common and seshu.train.run: the steps every training run shares, each on its own."""

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, MambaConfig, Trainer, TrainingArguments

from seshu.config import TrackSection, TrainSection
from seshu.errors import UserError
from seshu.models.registry import build_config, build_model, model_context_length
from seshu.train.common import (
    CHECKPOINTS,
    LanguageModelLossMixin,
    check_environment,
    check_output_dir,
    final_metrics,
    publish,
    tokens_per_step,
    tracking_env,
    train_resumably,
    training_arguments,
)
from seshu.train.run import plot_or_warn


def test_a_run_folder_is_new_empty_or_resumed(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", resume=False)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", resume=False)
    for marker in (CHECKPOINTS, "config.json", "adapter_config.json"):
        run = tmp_path / marker.replace(".", "-")
        run.mkdir()
        (run / marker).mkdir() if marker == CHECKPOINTS else (run / marker).write_text("{}")
        with pytest.raises(UserError, match="already holds a run; pass --resume to continue it"):
            check_output_dir(run, resume=False)
        check_output_dir(run, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", resume=False)


def test_what_the_recipe_asks_of_the_machine_is_checked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"train\.precision: fp16 needs a CUDA GPU"):
            check_environment(TrainSection(precision="fp16"), TrackSection())
    real = importlib.util.find_spec
    missing = {"bitsandbytes", "tensorboard"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(UserError, match=r"train.optimizer: bitsandbytes is not installed \(pip install bitsandbytes\)"):
        check_environment(TrainSection(optimizer="adamw_8bit"), TrackSection())
    with pytest.raises(
        UserError, match=r"track.report_to: tensorboard is not installed \(pip install 'seshu\[track\]'\)"
    ):
        check_environment(TrainSection(), TrackSection(report_to="tensorboard"))
    check_environment(TrainSection(), TrackSection(report_to="mlflow"))


def test_tokens_per_step_counts_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    train = TrainSection(batch_size=4, grad_accum=2, seq_len=64)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert tokens_per_step(train) == 512
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert tokens_per_step(train) == 2048


def test_training_arguments_follow_the_recipe(tmp_path: Path) -> None:
    train = TrainSection(max_steps=7, batch_size=3, lr=1e-3, eval_every=5, precision="fp32")
    kwargs = training_arguments(train, TrackSection(), tmp_path / "run", has_eval=False)
    args = TrainingArguments(**kwargs)
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate) == (7, 3, 1e-3)
    assert args.output_dir == str(tmp_path / "run" / CHECKPOINTS)
    assert args.eval_strategy == "no" and args.report_to == [] and args.run_name == "run"
    tracked = training_arguments(train, TrackSection(report_to="mlflow"), tmp_path / "run", has_eval=True)
    assert tracked["eval_strategy"] == "steps" and tracked["report_to"] == ["mlflow"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_passed_without_a_deprecation(tmp_path: Path, checkpointing: bool) -> None:
    train = TrainSection(gradient_checkpointing=checkpointing, precision="fp32")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
        args = TrainingArguments(**training_arguments(train, TrackSection(), tmp_path / "run", has_eval=False))
    assert args.gradient_checkpointing is checkpointing  # (transformers mirrors the old name)


def test_the_context_of_a_model_is_its_position_limit() -> None:
    assert model_context_length(LlamaConfig(max_position_embeddings=96)) == 96
    assert model_context_length(MambaConfig()) is None  # a state-space model has no position limit


def test_mlflow_keeps_its_store_and_artifacts_in_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    out.mkdir()
    note = tmp_path / "note.txt"
    note.write_text("kept with the run")
    with tracking_env(TrackSection(report_to="mlflow", experiment="exp"), out):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"
        assert os.environ["MLFLOW_EXPERIMENT_NAME"] == "exp"
        mlflow.set_experiment("exp")  # what transformers' MLflowCallback does
        with mlflow.start_run():
            mlflow.log_artifact(str(note))
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_NAME" not in os.environ
    assert [p.name for p in out.rglob("note.txt")] == ["note.txt"]
    assert str(next(out.rglob("note.txt"))).startswith(str(out / "mlflow-artifacts"))
    assert not list(elsewhere.iterdir()), "nothing is written where the command was started"

    # A store the user chose is left as it is.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared.db'}")
    with tracking_env(TrackSection(report_to="mlflow"), tmp_path / "other"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'shared.db'}"
    assert not (tmp_path / "other").exists()


def test_tensorboard_logs_into_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/somewhere/else")
    with tracking_env(TrackSection(report_to="tensorboard"), tmp_path):
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/somewhere/else"


def tiny_model(arch: str = "llama") -> torch.nn.Module:
    config = build_config(arch, "tiny", vocab_size=64, context_length=16, special_token_ids={})
    return build_model(config, seed=0)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, rows: int) -> None:
        self.ids = torch.randint(0, 64, (rows, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_trainer(out: Path, max_steps: int, eval_rows: int = 0, arch: str = "llama") -> Trainer:
    train = TrainSection(max_steps=max_steps, batch_size=2, save_every=2, log_every=1, precision="fp32")
    args = TrainingArguments(**training_arguments(train, TrackSection(), out, has_eval=eval_rows > 0))

    class LMTrainer(LanguageModelLossMixin, Trainer):
        pass

    return LMTrainer(
        model=tiny_model(arch),
        args=args,
        train_dataset=Blocks(8),
        eval_dataset=Blocks(eval_rows) if eval_rows else None,
    )


def test_adamw_trains_as_the_fused_kernel(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path / "run", max_steps=2)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    eight_bit = training_arguments(TrainSection(optimizer="adamw_8bit"), TrackSection(), tmp_path, has_eval=False)
    assert eight_bit["optim"] == "adamw_8bit"


def test_resuming_says_what_it_does_and_refuses_a_finished_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    lines: list[str] = []
    trainer = tiny_trainer(out, max_steps=2)
    train_resumably(trainer, out, resume=True, log=lines.append)
    assert lines == ["no checkpoint yet: starting afresh"] and trainer.state.global_step == 2

    more = tiny_trainer(out, max_steps=4)
    train_resumably(more, out, resume=True, log=lines.append)
    assert lines[-1] == f"resuming from {out / CHECKPOINTS / 'checkpoint-2'}" and more.state.global_step == 4
    with pytest.raises(UserError, match=r"already trained to step 4 \(train.max_steps=4\); raise train.max_steps"):
        train_resumably(tiny_trainer(out, max_steps=4), out, resume=True)


def test_final_metrics_reuse_the_last_evaluation(tmp_path: Path) -> None:
    assert final_metrics(tiny_trainer(tmp_path / "a", max_steps=1), has_eval=False) == {}
    trainer = tiny_trainer(tmp_path / "b", max_steps=2, eval_rows=4)
    trainer.train()
    metrics = final_metrics(trainer, has_eval=True)
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)


def test_a_mixtures_validation_loss_leaves_out_the_router_term(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_steps=1, arch="mixtral")
    model = trainer.model
    ids = Blocks(2).ids
    model.train()
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids)
        lm_only = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert full.aux_loss > 0 and not torch.isclose(full.loss, lm_only)
    torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": ids, "labels": ids}), full.loss)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, {"input_ids": ids, "labels": ids}), lm_only)


def test_publishing_writes_safetensors_a_tokenizer_and_the_card(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    trainer = tiny_trainer(out, max_steps=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    publish(trainer, tokenizer, "---\nx: 1\n---\n\n# card\n", out)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= names
    assert "training_args.bin" not in names and not (out / ".final.partial").exists()
    assert (out / "README.md").read_text() == "---\nx: 1\n---\n\n# card\n"
    weights = load_file(out / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in reloaded.state_dict().items():
        if name in weights:
            torch.testing.assert_close(tensor, weights[name])


def test_a_plot_that_cannot_be_drawn_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    plot_or_warn(tmp_path, lines.append)  # no run log at all
    assert len(lines) == 1 and lines[0].startswith("warning: no training plot (") and "train_log.jsonl" in lines[0]

    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    import seshu.evaluate.plot

    def broken(*args: Any) -> None:
        raise RuntimeError("matplotlib is broken\nsecond line")

    monkeypatch.setattr(seshu.evaluate.plot, "plot_run", broken)
    plot_or_warn(tmp_path, lines.append)
    assert lines[-1] == "warning: no training plot (matplotlib is broken); the model is written"
    monkeypatch.undo()
    plot_or_warn(tmp_path, lines.append)
    assert len(lines) == 2 and (tmp_path / "training.png").is_file()
