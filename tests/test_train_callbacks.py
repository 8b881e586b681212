"""seshu.train.callbacks: the run log a resumed run keeps as one, and the progress line."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from seshu.train import callbacks
from seshu.train.callbacks import LOG_NAME, ProgressCallback, RunLogCallback, format_duration, perplexity


class Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    return fake


@pytest.fixture
def args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[], use_cpu=True)


def entries(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / LOG_NAME).read_text(encoding="utf-8").splitlines()]


def test_perplexity_and_durations() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50)) == pytest.approx(50)
    assert perplexity(800.0) == math.inf  # exp would overflow
    assert format_duration(75) == "1m15s"
    assert format_duration(2 * 3600 + 5 * 60 + 59) == "2h05m"
    assert format_duration(-3) == "0m00s"


def test_the_run_log_records_losses_throughput_and_validation_perplexity(
    tmp_path: Path, args: TrainingArguments, clock: Clock
) -> None:
    log = RunLogCallback(tmp_path, tokens_per_step=128)
    state, control = TrainerState(max_steps=10), TrainerControl()
    log.on_train_begin(args, state, control)
    state.global_step, clock.now = 4, 102.0
    log.on_log(args, state, control, logs={"loss": 3.5, "learning_rate": 1e-3})
    log.on_log(args, state, control, logs={"eval_loss": math.log(20)})
    log.on_log(args, state, control, logs={})  # nothing to record
    state.global_step, clock.now = 8, 103.0
    log.on_log(args, state, control, logs={"loss": 2.5})

    first, evaluation, second = entries(tmp_path)
    assert first == {"step": 4, "loss": 3.5, "learning_rate": 1e-3, "tokens_per_second": 4 * 128 / 2.0}
    assert evaluation["step"] == 4 and evaluation["eval_perplexity"] == pytest.approx(20)
    assert second["tokens_per_second"] == pytest.approx(4 * 128 / 1.0)  # since the previous training entry


def test_a_resumed_run_drops_the_entries_past_its_checkpoint(
    tmp_path: Path, args: TrainingArguments, clock: Clock
) -> None:
    lines = [{"step": s, "loss": 5.0 - s / 10} for s in (2, 4, 6, 8)]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(e) + "\n" for e in lines) + "\n", encoding="utf-8")
    log = RunLogCallback(tmp_path, tokens_per_step=16)
    state = TrainerState(max_steps=10, global_step=4)  # the checkpoint the run resumes from
    log.on_train_begin(args, state, TrainerControl())
    assert [e["step"] for e in entries(tmp_path)] == [2, 4]
    state.global_step = 6
    log.on_log(args, state, TrainerControl(), logs={"loss": 4.1})
    assert [e["step"] for e in entries(tmp_path)] == [2, 4, 6]


def test_only_the_main_process_writes_the_log(tmp_path: Path, args: TrainingArguments, clock: Clock) -> None:
    log = RunLogCallback(tmp_path, tokens_per_step=16)
    state = TrainerState(max_steps=10, global_step=2)
    state.is_world_process_zero = False
    log.on_train_begin(args, state, TrainerControl())
    log.on_log(args, state, TrainerControl(), logs={"loss": 1.0})
    assert not (tmp_path / LOG_NAME).exists()


def test_the_progress_line_goes_to_the_log_callback(args: TrainingArguments, clock: Clock) -> None:
    lines: list[str] = []
    progress = ProgressCallback(tokens_per_step=1000, log=lines.append)
    state, control = TrainerState(max_steps=100, global_step=20), TrainerControl()  # resumed at step 20
    progress.on_train_begin(args, state, control)
    state.global_step, clock.now = 30, 110.0  # 10 steps in 10 s
    progress.on_log(args, state, control, logs={"loss": 2.34567})
    progress.on_log(args, state, control, logs={"eval_loss": math.log(12.5)})
    progress.on_log(args, state, control, logs={"train_runtime": 10.0})  # the end-of-run summary: no line
    assert lines == [
        "step 30/100 | loss 2.3457 | 1,000 tok/s | ETA 1m10s",
        "step 30/100 | val ppl 12.50 | 1,000 tok/s | ETA 1m10s",
    ]
    state.global_step, clock.now = 40, 120.0
    progress.on_log(args, state, control, logs={"loss": 2.0})
    assert lines[-1] == "step 40/100 | loss 2.0000 | val ppl 12.50 | 1,000 tok/s | ETA 1m00s"


def test_no_rate_before_the_first_step(args: TrainingArguments, clock: Clock) -> None:
    lines: list[str] = []
    progress = ProgressCallback(tokens_per_step=1000, log=lines.append)
    state = TrainerState(max_steps=10, global_step=0)
    progress.on_train_begin(args, state, TrainerControl())
    progress.on_log(args, state, TrainerControl(), logs={"eval_loss": 0.0})
    assert lines == ["step 0/10 | val ppl 1.00"]
