"""The steps pretraining and fine-tuning share: run-folder checks, Trainer arguments, tracking, resumable
training, publishing. `seshu.train.run` puts them in order."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import ModelOutput

from seshu.config import TrackSection, TrainSection
from seshu.errors import UserError
from seshu.io import publish_files
from seshu.train.callbacks import ProgressCallback, RunLogCallback, perplexity
from seshu.train.distributed import is_main_process, on_cpu
from seshu.train.precision import resolve_precision

CHECKPOINTS = "checkpoints"
# transformers 5.2x renamed TrainingArguments' `gradient_checkpointing` to `activation_checkpointing`; the old name
# warns and is to go in v6. Seshu supports transformers >= 5.0, so it passes the name this transformers has.
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)
MLFLOW_ARTIFACTS = "mlflow-artifacts"


def silent(line: str) -> None:
    """The default `log`: library code reports only to a caller that listens (the CLI prints)."""


def main_process_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on the main process and `silent` on the others, so that a run of several processes reads as one."""
    return log if is_main_process() else silent


class LanguageModelLossMixin:
    """Reports the language-modelling loss alone at evaluation time (mix into a Trainer class).

    A Mixtral's loss includes the router's load-balancing term, which belongs in training but would inflate
    validation perplexity; it is subtracted when the model is not training.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training:  # asking for outputs here would cost trl an extra forward pass per step
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:
            config = self.accelerator.unwrap_model(model).config  # type: ignore[attr-defined]
            loss = loss - config.router_aux_loss_coef * aux
        return (loss, outputs) if return_outputs else loss


def loss_without_logits(model: torch.nn.Module) -> None:
    """Have `model`, while it trains on labels, return its loss without its logits (the Trainer reads the loss
    alone; a Trainer that also reads the logits, as trl's does for token accuracy, must not use this).

    Under mixed precision accelerate wraps the model's forward to cast every output tensor to float32
    (`convert_outputs_to_fp32`), and the logits are [batch, seq_len, vocab]: the copy took 32 ms of a 0.69 s
    Llama-small bf16 step on 2 CPU cores, most of what Seshu trailed a plain bf16 loop by, and on a GPU it is a
    float32 tensor of gigabytes at a large vocabulary. The loss is computed inside the model, so it is unchanged;
    evaluation (the model not training) still gets its logits.
    """
    forward = model.forward

    @functools.wraps(forward)
    def forward_without_logits(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        if model.training and kwargs.get("labels") is not None and isinstance(output, ModelOutput):
            output["logits"] = None  # ModelOutput has no del; a None entry is skipped like an absent one
        return output

    # An instance attribute, as accelerate's own wrappers are (it wraps this one, and restores it on unwrapping).
    model.forward = forward_without_logits


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse to train over a finished or interrupted run unless asked to resume it."""
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a folder")
    if (out / CHECKPOINTS).exists() or (out / "config.json").exists() or (out / "adapter_config.json").exists():
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")


def check_environment(train: TrainSection, track: TrackSection) -> None:
    """What the recipe asks of this machine and its packages, checked before any work starts."""
    if train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    needs = {
        "bitsandbytes": train.optimizer == "adamw_8bit",
        "mlflow": track.report_to == "mlflow",
        "tensorboard": track.report_to == "tensorboard",
    }
    for package, needed in needs.items():
        if needed and importlib.util.find_spec(package) is None:
            key = "train.optimizer" if package == "bitsandbytes" else "track.report_to"
            hint = package if package == "bitsandbytes" else "'seshu[track]'"
            raise UserError(f"{key}: {package} is not installed (pip install {hint})")


def tokens_per_step(train: TrainSection) -> int:
    """Tokens one optimizer step sees across all processes (at most, for padded fine-tuning batches)."""
    return train.batch_size * train.grad_accum * train.seq_len * int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(train: TrainSection, track: TrackSection, out: Path, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments of `TrainingArguments` (or trl's `SFTConfig`) for the recipe's `train` and `track`."""
    return dict(
        output_dir=str(out / CHECKPOINTS),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        # A CPU runs bf16 autocast too; Trainer only allows it once told it is on the CPU.
        use_cpu=on_cpu(),
        bf16=resolve_precision(train.precision) == "bf16",
        fp16=train.precision == "fp16",
        **{_CHECKPOINTING: train.gradient_checkpointing},
        # AdamW as torch's fused kernel (the same update to float rounding; Trainer's own default): one pass over
        # each parameter instead of a dozen elementwise ops, 8 ms -> 4 ms per Llama-small step on 2 CPU cores,
        # and on a GPU a few kernel launches per step instead of several per parameter.
        optim="adamw_torch_fused" if train.optimizer == "adamw_torch" else train.optimizer,
        torch_compile=train.compile,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_every,
        save_strategy="steps",
        save_steps=train.save_every,
        save_total_limit=train.save_total_limit,
        logging_steps=train.log_every,
        report_to=[] if track.report_to == "none" else [track.report_to],
        run_name=out.name,
        seed=train.seed,
        data_seed=train.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def run_callbacks(
    out: Path, train: TrainSection, extra: list[TrainerCallback] | None, log: Callable[[str], None] = silent
) -> list[TrainerCallback]:
    """The run log and the progress line (given to `log`), then any callbacks the caller adds."""
    per_step = tokens_per_step(train)
    return [RunLogCallback(out, per_step), ProgressCallback(per_step, log), *(extra or [])]


@contextlib.contextmanager
def tracking_env(track: TrackSection, out: Path) -> Iterator[None]:
    """Point mlflow at a local SQLite store in the run folder unless the user chose one; restore env after.

    (mlflow 3 refuses its old plain-folder store; a single SQLite file is the local store it supports.)
    """
    wanted: dict[str, str] = {}
    if track.report_to == "mlflow":
        chosen = track.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        uri = chosen or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        if not chosen and is_main_process():  # the only process that reports to mlflow
            _create_local_experiment(uri, track.experiment, out / MLFLOW_ARTIFACTS)
        wanted = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": track.experiment}
    elif track.report_to == "tensorboard":
        wanted = {"TENSORBOARD_LOGGING_DIR": str(out / "tensorboard")}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _create_local_experiment(uri: str, name: str, artifacts: Path) -> None:
    """Create the experiment in the run folder's own store with its artifacts beside it: left to mlflow, a new
    experiment's artifacts go to ./mlruns under whatever folder the command was started from."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def train_resumably(trainer: Trainer, out: Path, resume: bool, log: Callable[[str], None] = silent) -> None:
    """Train from the last checkpoint when resuming (from scratch when there is none yet)."""
    trainer.remove_callback(PrinterCallback)
    checkpoint = get_last_checkpoint(str(out / CHECKPOINTS)) if resume and (out / CHECKPOINTS).is_dir() else None
    if checkpoint:
        done = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        if done >= trainer.args.max_steps:
            raise UserError(
                f"{out}: already trained to step {done} (train.max_steps={trainer.args.max_steps}); "
                "raise train.max_steps to train further"
            )
    if resume:
        log(f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet: starting afresh")
    trainer.train(resume_from_checkpoint=checkpoint)


def final_metrics(trainer: Trainer, has_eval: bool) -> dict[str, float]:
    """Validation loss and perplexity at the last step (evaluating again only if the run did not end on an eval)."""
    if not has_eval:
        return {}
    last = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    loss = float(last[-1]["eval_loss"] if last else trainer.evaluate()["eval_loss"])
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def publish(trainer: Trainer, tokenizer: PreTrainedTokenizerBase | ProcessorMixin, card: str, out: Path) -> None:
    """Write the trained model (or adapter), its tokenizer (or a VLM's processor) and card into `out`, each file
    by atomic rename. Every process of the run calls it: under FSDP or DeepSpeed ZeRO-3 the weights are gathered
    from all of them; only the main process writes."""
    main = trainer.is_world_process_zero()
    staging = out / ".final.partial"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if not main:
        return
    # Trainer also pickles its arguments next to the weights; the published artifact is safetensors only.
    (staging / "training_args.bin").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(staging))
    (staging / "README.md").write_text(card, encoding="utf-8")
    publish_files(staging, out)


def remove_if_created(out: Path, created: bool) -> None:
    """Undo a run folder this run made, when the run fails before training (nothing half-written is left)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
