"""Trainer callbacks shared by pretraining and fine-tuning: a one-line progress report and the run log."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

LOG_NAME = "train_log.jsonl"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def perplexity(loss: float) -> float:
    # exp overflows past ~709; a model that bad is reported as infinitely perplexed.
    return math.exp(loss) if loss < 700 else math.inf


class RunLogCallback(TrainerCallback):
    """Appends every logged training and evaluation entry to RUN_DIR/train_log.jsonl, with tokens/s.

    On resume, entries past the checkpoint's step are dropped first, so the log reads as one run.
    """

    def __init__(self, run_dir: Path, tokens_per_step: int) -> None:
        self.path = run_dir / LOG_NAME
        self.tokens_per_step = tokens_per_step
        self._last: tuple[float, int] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self.path.exists():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._last = (time.perf_counter(), state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry: dict[str, Any] = {"step": state.global_step, **logs}
        if "loss" in logs and self._last is not None:
            now = time.perf_counter()
            steps = state.global_step - self._last[1]
            if steps > 0 and now > self._last[0]:
                entry["tokens_per_second"] = steps * self.tokens_per_step / (now - self._last[0])
            self._last = (now, state.global_step)
        if "eval_loss" in logs:
            entry["eval_perplexity"] = perplexity(logs["eval_loss"])
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


class ProgressCallback(TrainerCallback):
    """One line per logging step, given to `log`: loss, validation perplexity, tokens/s and time left."""

    def __init__(self, tokens_per_step: int, log: Callable[[str], None]) -> None:
        self.tokens_per_step = tokens_per_step
        self.log = log
        self._start: tuple[float, int] | None = None
        self._val_ppl: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = (time.perf_counter(), state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs or self._start is None:
            return
        if "eval_loss" in logs:
            self._val_ppl = perplexity(logs["eval_loss"])
        if "loss" not in logs and "eval_loss" not in logs:
            return
        elapsed = time.perf_counter() - self._start[0]
        done = state.global_step - self._start[1]
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if self._val_ppl is not None:
            parts.append(f"val ppl {self._val_ppl:.2f}")
        if rate:
            parts.append(f"{rate * self.tokens_per_step:,.0f} tok/s")
            parts.append(f"ETA {format_duration((state.max_steps - state.global_step) / rate)}")
        self.log(" | ".join(parts))
