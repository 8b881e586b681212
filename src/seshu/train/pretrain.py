"""`seshu pretrain`: train a causal LM from scratch, or continue pretraining one, on packed text blocks.

The training loop is transformers' Trainer (so `accelerate launch` scales it to several GPUs unchanged and
checkpoints resume exactly); Seshu adds the recipe, the data pipeline, progress, the run log and the card.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from seshu.config import PretrainRecipe
from seshu.data.pipeline import build_block_datasets, describe_text_units, training_documents
from seshu.errors import UserError
from seshu.hub.card import describe_inputs, describe_model, render_card, usage_snippet
from seshu.models.loading import check_vocab_fits, default_device, embedding_rows, load_causal_lm
from seshu.models.mamba import scan_path
from seshu.models.registry import (
    build_config,
    build_model,
    check_overrides,
    count_parameters,
    get_preset_arch,
    model_context_length,
)
from seshu.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from seshu.train.common import LanguageModelLossMixin, loss_without_logits, main_process_log, silent, tokens_per_step
from seshu.train.distributed import from_main_process, is_main_process
from seshu.train.lora import apply_lora
from seshu.train.precision import describe_precision, resolve_precision
from seshu.train.run import Finished, Job, TrainData, check_run, run_job

TOKENIZER_DIR = "tokenizer"

# The `seshu.command` of a pretrained model's card.
CARD_COMMAND = "pretrain"


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


class CausalLMTrainer(LanguageModelLossMixin, Trainer):
    """transformers' Trainer, validating on the language-modelling loss alone."""

    def __init__(self, model: PreTrainedModel | PeftModel, **kwargs: Any) -> None:
        loss_without_logits(model)
        super().__init__(model=model, **kwargs)


def _prepare_tokenizer(
    recipe: PretrainRecipe, out: Path, log: Callable[[str], None]
) -> tuple[PreTrainedTokenizerBase, bool]:
    """The recipe's tokenizer, the init model's, one trained earlier in this run, or a new one (True: the main
    process saves it into the run)."""
    if recipe.tokenizer.path:
        return load_tokenizer(recipe.tokenizer.path), False
    if recipe.model.init_from:
        return load_tokenizer(recipe.model.init_from), False
    if (out / TOKENIZER_DIR / "tokenizer.json").is_file():  # resuming a run that trained its own
        return load_tokenizer(str(out / TOKENIZER_DIR)), False
    spec = recipe.tokenizer.train
    log(f"training a {spec.kind} tokenizer ({spec.vocab_size} tokens) on the training corpus")

    def train() -> PreTrainedTokenizerBase:
        docs = training_documents(recipe.data, seed=recipe.train.seed)
        return train_tokenizer(
            docs,
            spec.vocab_size,
            spec.kind,
            balance_alpha=spec.balance_alpha,
            seed=recipe.train.seed,
            max_docs=spec.max_docs,
        )

    # Trained once, by the main process; the others of a run receive it.
    return from_main_process(train), True


def prepare_model(recipe: PretrainRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel | PeftModel:
    """The model training starts from: `init_from` loaded, or a fresh one seeded with `train.seed`."""
    if recipe.model.init_from:
        model, _ = load_causal_lm(recipe.model.init_from, dtype="float32")
        check_vocab_fits(tokenizer, embedding_rows(model), recipe.model.init_from)
        check_block_fits(recipe.train.seq_len, model, recipe.model.init_from)
        set_seed(recipe.train.seed)  # LoRA's A matrices start random (see `seshu.train.sft.prepare_model`)
        return apply_lora(model, recipe.lora, "lora") if recipe.lora else model
    config = build_config(
        recipe.model.arch,
        recipe.model.preset,
        vocab_size=len(tokenizer),
        context_length=recipe.train.seq_len,
        special_token_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        overrides=recipe.model.overrides,
    )
    return build_model(config, seed=recipe.train.seed)


def check_block_fits(seq_len: int, model: PreTrainedModel, ref: str) -> None:
    """Every packed block is `seq_len` tokens long: a model continued past its context trains on positions it
    has no embedding for (learned positions fail mid-run) or never saw (RoPE)."""
    context = model_context_length(model.config)
    if context is not None and seq_len > context:
        raise UserError(
            f"train.seq_len: blocks of {seq_len} tokens are longer than {ref}'s context of {context} tokens "
            f"(max_position_embeddings); set train.seq_len to {context} or less"
        )


def _card(recipe: PretrainRecipe, model: PreTrainedModel | PeftModel, metrics: dict[str, float], steps: int) -> str:
    sources = [s.path for s in recipe.data.train_sources() + recipe.data.validation_sources()]
    if recipe.tokenizer.path:
        sources.append(recipe.tokenizer.path)
    tokens = steps * recipe.train.batch_size * recipe.train.grad_accum * recipe.train.seq_len
    scan = scan_path(model, default_device())  # for a state-space model: which selective scan trained it
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["seshu", model.config.model_type],
        "seshu": {
            "command": CARD_COMMAND,
            "parameters": count_parameters(model),
            "steps": steps,
            "tokens_per_device": tokens,
            "metrics": metrics,
            "inputs": describe_inputs(sources),
            "init_from": describe_model(recipe.model.init_from) if recipe.model.init_from else None,
            "recipe": recipe.model_dump(mode="json"),
            "precision": resolve_precision(recipe.train.precision),
            **({"scan": scan} if scan else {}),
        },
    }
    ppl = metrics.get("eval_perplexity")
    body = (
        f"A {model.config.model_type} causal language model with {count_parameters(model):,} parameters, "
        f"{'continued from ' + recipe.model.init_from if recipe.model.init_from else 'trained from scratch'} "
        f"with Seshu for {steps} steps ({tokens:,} tokens per device)."
        + (f" Validation perplexity: {ppl:.2f}." if ppl is not None else "")
        + f" Trained in {describe_precision(recipe.train.precision)}"
        + (f", with {scan}." if scan else ".")
        + "\n\n"
        + usage_snippet()
    )
    return render_card(f"{Path(recipe.output_dir).name}", metadata, body)


def run(
    recipe: PretrainRecipe,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    log: Callable[[str], None] = silent,
) -> PretrainResult:
    """Pretrain as the recipe says; returns where the model went and its final validation metrics.

    `callbacks` are added to the Trainer's own (for tracking or control beyond what the recipe offers); progress
    goes to `log`, one line at a time.
    """
    log = main_process_log(log)
    out = Path(recipe.output_dir)
    check_run(recipe, resume)
    if recipe.lora and not recipe.model.init_from:
        raise UserError("lora: LoRA continued pretraining needs model.init_from, the model to adapt")
    if not recipe.model.init_from:  # checked before minutes of tokenizer training
        check_overrides(get_preset_arch(recipe.model.arch, recipe.model.preset), recipe.model.overrides)
    for line in describe_text_units(recipe.data):
        log(line)
    tokenizer, trained_tokenizer = _prepare_tokenizer(recipe, out, log)
    if not recipe.model.init_from:
        tokenizer.model_max_length = recipe.train.seq_len  # the context the new model is trained for
    model = prepare_model(recipe, tokenizer)

    def build_datasets(out: Path) -> tuple[TrainData, datasets.Dataset]:
        blocks = build_block_datasets(
            recipe.data, tokenizer, recipe.train.seq_len, recipe.train.seed, out / "data-cache"
        )
        if trained_tokenizer and is_main_process():
            save_tokenizer(tokenizer, out / TOKENIZER_DIR)
        return blocks

    def make_trainer(
        args: dict[str, Any], train: TrainData, validation: datasets.Dataset, hooks: list[TrainerCallback]
    ) -> Trainer:
        return CausalLMTrainer(
            model=model,
            args=TrainingArguments(**args),
            data_collator=collate_blocks,
            train_dataset=train,
            eval_dataset=validation,
            callbacks=hooks,
        )

    def card(done: Finished) -> str:
        return _card(recipe, model, done.metrics, done.steps)

    parameters = count_parameters(model)
    scan = scan_path(model, default_device())
    describe = (
        f"model: {model.config.model_type}, {parameters:,} parameters"
        + (f" (scan: {scan})" if scan else "")
        + f"; {describe_precision(recipe.train.precision)}"
        + f"; {recipe.train.max_steps} steps of {tokens_per_step(recipe.train):,} tokens"
    )
    job = Job(tokenizer, build_datasets, lambda *_: describe, make_trainer, card)
    done = run_job(recipe, job, resume=resume, callbacks=callbacks, log=log)
    return PretrainResult(output_dir=done.output_dir, metrics=done.metrics, parameters=parameters, steps=done.steps)
