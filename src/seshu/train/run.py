"""The one skeleton every training run follows: check the run folder, build the data into it, write the recipe,
track, train resumably on a Trainer, measure, publish and plot. Pretraining and fine-tuning bring only what is
their own, as a `Job`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import datasets
from transformers import PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainerCallback

from seshu.config import Dumpable, TrackSection, TrainSection, dump_recipe
from seshu.errors import first_line
from seshu.io import write_text_atomic
from seshu.train.common import (
    check_environment,
    check_output_dir,
    final_metrics,
    main_process_log,
    publish,
    remove_if_created,
    run_callbacks,
    silent,
    tracking_env,
    train_resumably,
    training_arguments,
)
from seshu.train.distributed import is_main_process, main_process_first


class RunRecipe(Dumpable, Protocol):
    """What the skeleton reads of a recipe (pretraining, fine-tuning, a VLM's projector pretraining): where the
    run goes, how it trains and how it is tracked; `dump_recipe` writes the whole of it into the run folder."""

    @property
    def output_dir(self) -> str: ...

    @property
    def train(self) -> TrainSection: ...

    @property
    def track(self) -> TrackSection: ...


TrainData: TypeAlias = datasets.Dataset | datasets.IterableDataset  # streamed pretraining data is iterable only


@dataclass
class Finished:
    """A trained run, before and after publishing."""

    output_dir: Path
    metrics: dict[str, float]  # validation loss and perplexity at the last step (empty without validation data)
    steps: int
    train_dataset: TrainData
    eval_dataset: datasets.Dataset


@dataclass
class Job:
    """What one kind of training brings to `run_job`."""

    tokenizer: PreTrainedTokenizerBase | ProcessorMixin  # published with the model (a VLM publishes its processor)
    # Train and validation datasets, cached under the run folder it is given (and anything else the run keeps
    # there, such as a tokenizer it trained). A failure here removes a run folder that this run created.
    build_datasets: Callable[[Path], tuple[TrainData, datasets.Dataset]]
    # The line logged before training starts.
    describe: Callable[[TrainData, datasets.Dataset], str]
    # A Trainer from `TrainingArguments` keyword arguments, the datasets and the callbacks.
    make_trainer: Callable[[dict[str, Any], TrainData, datasets.Dataset, list[TrainerCallback]], Trainer]
    # The model card of the finished run.
    card: Callable[[Finished], str]


def check_run(recipe: RunRecipe, resume: bool) -> None:
    """What is checked before any slow work (a tokenizer to train, a model to load): the run folder, and what
    the recipe asks of this machine."""
    check_output_dir(Path(recipe.output_dir), resume)
    check_environment(recipe.train, recipe.track)


def run_job(
    recipe: RunRecipe,
    job: Job,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    log: Callable[[str], None] = silent,
) -> Finished:
    """Train `job` as `recipe` says into its output folder (resuming its last checkpoint if `resume`), publish
    the model with its card, and plot the run. Progress goes to `log`, one line at a time."""
    log = main_process_log(log)
    out = Path(recipe.output_dir)
    # In a run of several processes the main one builds the data cache (and saves what else the job keeps) and
    # writes the recipe; the others then read the cache it left.
    with main_process_first():
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            train_ds, eval_ds = job.build_datasets(out)
        except BaseException:
            remove_if_created(out, created)
            raise
        if is_main_process():
            write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))

    log(job.describe(train_ds, eval_ds))
    has_eval = len(eval_ds) > 0
    with tracking_env(recipe.track, out):
        trainer = job.make_trainer(
            training_arguments(recipe.train, recipe.track, out, has_eval),
            train_ds,
            eval_ds,
            run_callbacks(out, recipe.train, callbacks, log),
        )
        train_resumably(trainer, out, resume, log)
        metrics = final_metrics(trainer, has_eval)
    finished = Finished(out, metrics, trainer.state.global_step, train_ds, eval_ds)
    publish(trainer, job.tokenizer, job.card(finished), out)
    if trainer.is_world_process_zero():
        plot_or_warn(out, log)
    return finished


def plot_or_warn(out: Path, log: Callable[[str], None]) -> None:
    """Plot the run into `out`; the model is published by now, so a plot that cannot be drawn (no log entries,
    a broken matplotlib) is a warning, not a failed run."""
    try:
        from seshu.evaluate.plot import plot_run

        plot_run(out)
    except Exception as exc:  # whatever it is, the trained model must stand
        log(f"warning: no training plot ({first_line(exc)}); the model is written")
