"""`seshu pretrain`: train a causal LM from scratch, or continue pretraining one, on packed text blocks.

The training loop is transformers' Trainer (so `accelerate launch` scales it to several GPUs unchanged and
checkpoints resume exactly); Seshu adds the recipe, the data pipeline, progress, the run log and the card.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from seshu.config import PretrainRecipe, dump_recipe
from seshu.data.pipeline import build_block_datasets, training_documents
from seshu.errors import UserError
from seshu.hub.card import describe_inputs, render_card
from seshu.io import publish_files, write_text_atomic
from seshu.models.loading import check_vocab_fits, default_device, embedding_rows, load_causal_lm
from seshu.models.registry import build_config, build_model, count_parameters, get_preset_arch
from seshu.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from seshu.train.callbacks import ProgressCallback, RunLogCallback, perplexity

CHECKPOINTS = "checkpoints"
TOKENIZER_DIR = "tokenizer"


@dataclass
class PretrainResult:
    output_dir: Path
    metrics: dict[str, float]
    parameters: int
    steps: int


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Packed blocks need no padding or attention mask: the labels are the inputs (the model shifts them)."""
    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


class CausalLMTrainer(Trainer):
    """Reports the language-modelling loss alone at evaluation time.

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
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = getattr(outputs, "aux_loss", None)
        if not model.training and aux is not None:
            loss = loss - self.accelerator.unwrap_model(model).config.router_aux_loss_coef * aux
        return (loss, outputs) if return_outputs else loss


def _check_output_dir(out: Path, resume: bool) -> None:
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a folder")
    if (out / CHECKPOINTS).exists() or (out / "config.json").exists():
        raise UserError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")


def _check_environment(recipe: PretrainRecipe) -> None:
    """What the recipe asks of this machine and its packages, checked before any work starts."""
    if recipe.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    needs = {
        "bitsandbytes": recipe.train.optimizer == "adamw_8bit",
        "mlflow": recipe.track.report_to == "mlflow",
        "tensorboard": recipe.track.report_to == "tensorboard",
    }
    for package, needed in needs.items():
        if needed and importlib.util.find_spec(package) is None:
            key = "train.optimizer" if package == "bitsandbytes" else "track.report_to"
            hint = package if package == "bitsandbytes" else "'seshu[track]'"
            raise UserError(f"{key}: {package} is not installed (pip install {hint})")


def _prepare_tokenizer(recipe: PretrainRecipe, out: Path) -> tuple[PreTrainedTokenizerBase, bool]:
    """The recipe's tokenizer, the init model's, one trained earlier in this run, or a new one (True)."""
    if recipe.tokenizer.path:
        return load_tokenizer(recipe.tokenizer.path), False
    if recipe.model.init_from:
        return load_tokenizer(recipe.model.init_from), False
    if (out / TOKENIZER_DIR / "tokenizer.json").is_file():  # resuming a run that trained its own
        return load_tokenizer(str(out / TOKENIZER_DIR)), False
    spec = recipe.tokenizer.train
    print(f"training a {spec.kind} tokenizer ({spec.vocab_size} tokens) on the training corpus", flush=True)
    docs = training_documents(recipe.data, seed=recipe.train.seed)
    tokenizer = train_tokenizer(
        docs,
        spec.vocab_size,
        spec.kind,
        balance_alpha=spec.balance_alpha,
        seed=recipe.train.seed,
        max_docs=spec.max_docs,
    )
    return tokenizer, True


def prepare_model(recipe: PretrainRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The model training starts from: `init_from` loaded, or a fresh one seeded with `train.seed`."""
    if recipe.model.init_from:
        model, _ = load_causal_lm(recipe.model.init_from, dtype="float32")
        check_vocab_fits(tokenizer, embedding_rows(model), recipe.model.init_from)
        return model
    config = build_config(
        recipe.model.arch,
        recipe.model.preset,
        vocab_size=len(tokenizer),
        context_length=recipe.train.seq_len,
        special_token_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        overrides=recipe.model.overrides,
    )
    return build_model(config, seed=recipe.train.seed)


def _training_arguments(recipe: PretrainRecipe, out: Path, has_eval: bool) -> TrainingArguments:
    t = recipe.train
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # A CPU runs bf16 autocast too; Trainer only allows it once told it is on the CPU.
        use_cpu=default_device() == "cpu",
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        optim=t.optimizer,
        torch_compile=t.compile,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.save_total_limit,
        logging_steps=t.log_every,
        report_to=[] if recipe.track.report_to == "none" else [recipe.track.report_to],
        run_name=Path(recipe.output_dir).name,
        seed=t.seed,
        data_seed=t.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


@contextlib.contextmanager
def _tracking_env(recipe: PretrainRecipe, out: Path) -> Iterator[None]:
    """Point mlflow at a local SQLite store in the run folder unless the user chose one; restore env after.

    (mlflow 3 refuses its old plain-folder store; a single SQLite file is the local store it supports.)
    """
    wanted: dict[str, str] = {}
    if recipe.track.report_to == "mlflow":
        uri = (
            recipe.track.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        )
        wanted = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": recipe.track.experiment}
    elif recipe.track.report_to == "tensorboard":
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


def _card(recipe: PretrainRecipe, model: PreTrainedModel, metrics: dict[str, float], steps: int) -> str:
    sources = [s.path for s in recipe.data.train_sources() + recipe.data.validation_sources()]
    if recipe.tokenizer.path:
        sources.append(recipe.tokenizer.path)
    if recipe.model.init_from:
        sources.append(recipe.model.init_from)
    tokens = steps * recipe.train.batch_size * recipe.train.grad_accum * recipe.train.seq_len
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["seshu", model.config.model_type],
        "seshu": {
            "command": "pretrain",
            "parameters": count_parameters(model),
            "steps": steps,
            "tokens_per_device": tokens,
            "metrics": metrics,
            "inputs": describe_inputs(sources),
            "recipe": recipe.model_dump(mode="json"),
        },
    }
    ppl = metrics.get("eval_perplexity")
    body = (
        f"A {model.config.model_type} causal language model with {count_parameters(model):,} parameters, "
        f"{'continued from ' + recipe.model.init_from if recipe.model.init_from else 'trained from scratch'} "
        f"with Seshu for {steps} steps ({tokens:,} tokens per device)."
        + (f" Validation perplexity: {ppl:.2f}." if ppl is not None else "")
        + "\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n"
    )
    return render_card(f"{Path(recipe.output_dir).name}", metadata, body)


def _final_metrics(trainer: Trainer, has_eval: bool) -> dict[str, float]:
    """Validation loss and perplexity at the last step (evaluating again only if the run did not end on an eval)."""
    if not has_eval:
        return {}
    last = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    loss = float(last[-1]["eval_loss"] if last else trainer.evaluate()["eval_loss"])
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}


def run(
    recipe: PretrainRecipe, *, resume: bool = False, callbacks: list[TrainerCallback] | None = None
) -> PretrainResult:
    """Pretrain as the recipe says; returns where the model went and its final validation metrics.

    `callbacks` are added to the Trainer's own (for tracking or control beyond what the recipe offers).
    """
    out = Path(recipe.output_dir)
    _check_output_dir(out, resume)
    _check_environment(recipe)
    if not recipe.model.init_from:
        get_preset_arch(recipe.model.arch, recipe.model.preset)  # before minutes of tokenizer training
    tokenizer, trained_tokenizer = _prepare_tokenizer(recipe, out)
    model = prepare_model(recipe, tokenizer)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_ds, eval_ds = build_block_datasets(
            recipe.data, tokenizer, recipe.train.seq_len, recipe.train.seed, out / "data-cache"
        )
        if trained_tokenizer:
            save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))

    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * world
    print(
        f"model: {model.config.model_type}, {count_parameters(model):,} parameters; "
        f"{t.max_steps} steps of {tokens_per_step:,} tokens",
        flush=True,
    )
    with _tracking_env(recipe, out):
        trainer = CausalLMTrainer(
            model=model,
            args=_training_arguments(recipe, out, has_eval=len(eval_ds) > 0),
            data_collator=collate_blocks,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            callbacks=[RunLogCallback(out, tokens_per_step), ProgressCallback(tokens_per_step), *(callbacks or [])],
        )
        trainer.remove_callback(PrinterCallback)
        checkpoint = get_last_checkpoint(str(out / CHECKPOINTS)) if resume and (out / CHECKPOINTS).is_dir() else None
        if resume:
            print(f"resuming from {checkpoint}" if checkpoint else "no checkpoint yet: starting afresh", flush=True)
        trainer.train(resume_from_checkpoint=checkpoint)
        metrics = _final_metrics(trainer, has_eval=len(eval_ds) > 0)
    steps = trainer.state.global_step

    if trainer.is_world_process_zero():
        staging = out / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))
        # Trainer also pickles its arguments next to the weights; the published artifact is safetensors only.
        (staging / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(staging))
        (staging / "README.md").write_text(_card(recipe, model, metrics, steps), encoding="utf-8")
        publish_files(staging, out)
        from seshu.evaluate.plot import plot_run

        plot_run(out)
    return PretrainResult(output_dir=out, metrics=metrics, parameters=count_parameters(model), steps=steps)
