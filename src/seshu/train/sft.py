"""`seshu sft`: supervised fine-tuning with LoRA, QLoRA or full training, on trl's SFTTrainer and peft.

Conversations are tokenized by Seshu (`seshu.data.instructions`) with an answer mask, so the loss covers the
assistant's tokens only, with any chat template; trl turns that mask into labels. Every Seshu expert and
every donor contribution to the federation is made here.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from seshu.chat import CHAT_TOKENS
from seshu.config import SFTRecipe, SourceEntry, TrainSection
from seshu.data.instructions import InstructionStats, read_conversations, tokenize_conversation
from seshu.data.mixing import is_validation
from seshu.data.pipeline import cached_rows, sources_state, state_digest, tokenizer_state
from seshu.errors import UserError, first_line
from seshu.hub.card import describe_inputs, describe_model, render_card, usage_snippet
from seshu.models.fast_paths import use_fast_paths
from seshu.models.loading import check_model_dir, check_vocab_fits, default_device, embedding_rows, load_causal_lm
from seshu.models.registry import ARCHS, arch_of, count_parameters, model_context_length
from seshu.tokenizer import load_tokenizer
from seshu.train.common import LanguageModelLossMixin, main_process_log, silent
from seshu.train.distributed import state
from seshu.train.lora import apply_lora
from seshu.train.precision import resolve_precision
from seshu.train.run import Finished, Job, TrainData, check_run, run_job

ROW_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int32")), "assistant_masks": datasets.List(datasets.Value("int8"))}
)


@dataclass
class SFTResult:
    output_dir: Path
    metrics: dict[str, float]
    trainable_parameters: int
    total_parameters: int
    steps: int
    examples: int  # training conversations (validation ones not counted)
    answer_tokens: int  # tokens of those conversations the loss covered (assistant mask 1)

    @classmethod
    def of(cls, done: Finished, trainable: int, total: int, answers: Callable[[datasets.Dataset], int]) -> SFTResult:
        """The result of the finished run `done`; `answers` counts the tokens the loss covers in its rows."""
        assert isinstance(done.train_dataset, datasets.Dataset)  # fine-tuning rows are always cached
        return cls(
            output_dir=done.output_dir,
            metrics=done.metrics,
            trainable_parameters=trainable,
            total_parameters=total,
            steps=done.steps,
            examples=len(done.train_dataset),
            answer_tokens=answers(done.train_dataset),
        )


class SeshuSFTTrainer(LanguageModelLossMixin, SFTTrainer):
    """trl's SFTTrainer, validating on the language-modelling loss alone."""


# ------------------------------------------------------------------------------------------------
# Data


def _conversations(recipe: SFTRecipe, entries: list[SourceEntry], stats: InstructionStats) -> Iterator[list[dict]]:
    data = recipe.data
    for entry in entries:
        yield from read_conversations(
            entry.path, format=data.format, on_error=data.on_error, split=entry.split, name=entry.name, stats=stats
        )


def _rows(
    recipe: SFTRecipe, tokenizer: PreTrainedTokenizerBase, split: str, stats: InstructionStats
) -> Iterator[dict[str, list[int]]]:
    """Tokenized conversations of one split; conversations whose answers were cut off entirely are dropped.
    What the records held (and any skipped) is counted in `stats`."""
    data, seed = recipe.data, recipe.train.seed
    held_out = data.validation if isinstance(data.validation, float) else None
    entries = data.train_sources() if held_out is not None or split == "train" else data.validation_sources()
    conversations: Iterator[list[dict]] = _conversations(recipe, entries, stats)
    if held_out is not None:
        want = split == "validation"
        conversations = (
            c for c in conversations if is_validation(json.dumps(c, sort_keys=True), held_out, seed) == want
        )
    if split == "train" and data.max_records:
        conversations = islice(conversations, data.max_records)
    for messages in conversations:
        row = tokenize_conversation(tokenizer, messages, recipe.train.seq_len)
        if 1 in row["assistant_masks"]:
            yield row


def _fingerprint(recipe: SFTRecipe, tokenizer: PreTrainedTokenizerBase, split: str) -> str:
    state = {
        "split": split,
        "data": recipe.data.model_dump(mode="json"),
        "sources": sources_state(recipe.data),
        "tokenizer": tokenizer_state(tokenizer),
        "template": tokenizer.chat_template,
        "seq_len": recipe.train.seq_len,
        "seed": recipe.train.seed,
    }
    return state_digest(state)


def answer_tokens(ds: datasets.Dataset) -> int:
    """Tokens with assistant mask 1 in `ds`, summed by Arrow over the memory-mapped column (no row is
    decoded into Python)."""
    import pyarrow.compute as pc

    masks = ds.with_format("arrow")["assistant_masks"]
    total = pc.sum(pc.list_flatten(masks)).as_py()
    return int(total or 0)


def build_datasets(
    recipe: SFTRecipe, tokenizer: PreTrainedTokenizerBase, cache_dir: Path, log: Callable[[str], None] = silent
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and validation rows (`input_ids`, `assistant_masks`), written once to Arrow and memory-mapped.
    What the records held, and how many were skipped and why, goes to `log`."""
    # Read the first few records now: a bad path, format or record is reported before anything is written.
    for _ in islice(_conversations(recipe, recipe.data.train_sources(), InstructionStats()), 8):
        pass
    splits = []
    for split in ("train", "validation"):
        stats = InstructionStats()
        fingerprint = _fingerprint(recipe, tokenizer, split)
        gen_kwargs = {"recipe": recipe, "tokenizer": tokenizer, "split": split, "stats": stats}
        ds = cached_rows(_rows, ROW_FEATURES, gen_kwargs, fingerprint, cache_dir)
        if len(ds) == 0:
            raise UserError(
                f"data: the {split} split has no conversation with an answer within train.seq_len="
                f"{recipe.train.seq_len} tokens; add records or raise train.seq_len"
            )
        # A held-out fraction is read (and counted) in the train pass, before the split; separate validation
        # files in their own pass.
        separate = bool(recipe.data.validation_sources())
        if split == "train" or separate:
            label = f"{split} data" if separate else "data (training and held-out)"
            log(f"{label}: {read_summary(stats, cache_dir / f'{fingerprint}.summary')}")
        splits.append(ds)
    return splits[0], splits[1]


def read_summary(stats: InstructionStats, saved: Path) -> str:
    """This pass's summary of the records, kept beside the cached rows: a resumed run reads no record again."""
    if stats.records:
        saved.write_text(stats.summary(), encoding="utf-8")
        return stats.summary()
    return saved.read_text(encoding="utf-8") if saved.is_file() else "tokenized earlier (cached)"


def check_rows_fit(config: PretrainedConfig, ref: str, *splits: datasets.Dataset) -> None:
    """A conversation longer than the base model's context trains on positions it has no embedding for (learned
    positions fail mid-run) or never saw (RoPE). Only real rows count: a generous train.seq_len is harmless when
    every conversation is shorter than the context."""
    import pyarrow.compute as pc

    context = model_context_length(config)
    if context is None:
        return
    lengths = [pc.list_value_length(ds.with_format("arrow")["input_ids"]) for ds in splits]
    longer = sum(pc.sum(pc.greater(length, context)).as_py() or 0 for length in lengths)
    if longer:
        longest = max(pc.max(length).as_py() for length in lengths)
        raise UserError(
            f"train.seq_len: {longer} conversations (up to {longest} tokens) are longer than {ref}'s context of "
            f"{context} tokens (max_position_embeddings); set train.seq_len to {context} or less"
        )


# ------------------------------------------------------------------------------------------------
# Model


def _load_base(recipe: SFTRecipe, path: str) -> PreTrainedModel:
    precision, method = resolve_precision(recipe.train.precision), recipe.sft.method
    if method != "qlora":
        # LoRA keeps the frozen base in the training precision; full training keeps fp32 master weights.
        dtype = "bfloat16" if precision == "bf16" and method == "lora" else "float32"
        model, _ = load_causal_lm(path, dtype=dtype)
        return model
    spec = ARCHS.get(AutoConfig.from_pretrained(path).model_type)
    skip = [*spec.qlora_skip_modules, "lm_head"] if spec and spec.qlora_skip_modules else None
    return load_in_4bit(AutoModelForCausalLM, path, recipe.train, skip)


def load_in_4bit(
    model_class: type[Any], path: str, train: TrainSection, skip_modules: list[str] | None
) -> PreTrainedModel:
    """The model at `path` as `model_class`, its linear layers in 4-bit NF4 (double-quantized, computing in the
    training precision) but for `skip_modules` (None: transformers' default, the head), prepared for k-bit
    training."""
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(train.precision), torch.float32)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip_modules,  # (despite the name, also what 4-bit loading leaves alone)
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )
    check_model_dir(path)
    try:
        model = model_class.from_pretrained(
            path,
            quantization_config=quantization,
            dtype=compute,
            device_map={"": state().device},  # this process's own GPU when several train together
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model in 4 bits: {first_line(exc)}") from None
    if default_device() == "cpu":
        _keep_cpu_4bit_trainable(model)
    use_fast_paths(model)  # as `load_causal_lm` gives the other methods
    prepared: PreTrainedModel = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=train.gradient_checkpointing
    )
    return prepared


def _keep_cpu_4bit_trainable(model: PreTrainedModel) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel at the first
    forward pass in eval mode without gradients (an evaluation), for good. That kernel has no backward, so every
    training step after the first evaluation would stop the gradient at each quantized layer, and its packing
    asserts on widths that are not multiples of 32. Keep the training layout, which takes any width."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_model(
    recipe: SFTRecipe, tokenizer: PreTrainedTokenizerBase, tokens_added: bool
) -> PreTrainedModel | PeftModel:
    """The base model, resized to the tokenizer when chat tokens were added, wrapped for the method."""
    assert recipe.model.init_from is not None
    base = _load_base(recipe, recipe.model.init_from)
    if tokens_added:
        base.resize_token_embeddings(len(tokenizer))
    check_vocab_fits(tokenizer, embedding_rows(base), recipe.model.init_from)
    spec = arch_of(base.config)
    if recipe.sft.packing and spec is not None and not spec.packs_apart:
        raise UserError(
            f"sft.packing: a {spec.name} model carries its state from one packed sample into the next; "
            "set sft.packing: false"
        )
    if recipe.sft.method == "full":
        return base
    # New chat tokens start untrained: LoRA then also trains their embedding rows (and no other row).
    new_ids = tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) if tokens_added else None
    # LoRA's A matrices start random: seeded, a run repeats, and one of several processes starts where a single
    # process would (DDP hands the main process's start to the others, whatever it is).
    set_seed(recipe.train.seed)
    return apply_lora(base, recipe.sft.lora, "sft.lora", new_token_ids=new_ids)


# ------------------------------------------------------------------------------------------------
# Running


def _load_tokenizer(recipe: SFTRecipe) -> tuple[PreTrainedTokenizerBase, bool]:
    from seshu.chat import ensure_chat_template

    assert recipe.model.init_from is not None
    tokenizer = load_tokenizer(recipe.tokenizer.path or recipe.model.init_from)
    added = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def sft_card(recipe: SFTRecipe, result: SFTResult, *, vision: bool = False) -> str:
    """The model card of a fine-tuned adapter (or model); `vision` for a VLM's."""
    sources = [s.path for s in recipe.data.train_sources() + recipe.data.validation_sources()]
    base = recipe.model.init_from
    metadata: dict[str, Any] = {
        "library_name": "peft" if recipe.sft.method != "full" else "transformers",
        # The Hub's field names a Hub model; a local base is recorded (with hashes) under seshu.base_model.
        **({"base_model": base} if base and not Path(base).exists() else {}),
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": ["seshu", "sft", recipe.sft.method, *(["vision-language"] if vision else [])],
        "seshu": {
            "command": "sft",
            "method": recipe.sft.method,
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
            "steps": result.steps,
            "examples": result.examples,
            "answer_tokens": result.answer_tokens,
            "metrics": result.metrics,
            "inputs": describe_inputs([*sources, *([recipe.tokenizer.path] if recipe.tokenizer.path else [])]),
            "base_model": describe_model(base) if base else [],
            "recipe": recipe.model_dump(mode="json"),
        },
    }
    loss = result.metrics.get("eval_loss")
    what = "A LoRA adapter" if recipe.sft.method != "full" else "A model"
    body = (
        f"{what} fine-tuned from `{base}` with Seshu ({recipe.sft.method}, {result.steps} steps, "
        f"{result.trainable_parameters:,} trainable parameters)."
        + (f" Answer-only validation loss: {loss:.4f}." if loss is not None else "")
    )
    if recipe.sft.method != "full" or vision:
        body += "\n\n" + usage_snippet(base=base if recipe.sft.method != "full" else None, vision=vision)
    return render_card(Path(recipe.output_dir).name, metadata, body)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """Trainable and total parameters. peft's count unpacks 4-bit weights (bitsandbytes stores two per byte, so
    `numel()` alone undercounts a QLoRA base by half or more)."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    return sum(p.numel() for p in model.parameters() if p.requires_grad), count_parameters(model)


def check_start(recipe: SFTRecipe, resume: bool) -> str:
    """What is checked before anything loads: the base model's folder, the run folder and the packages the
    recipe needs; the base model's reference."""
    base_ref = recipe.model.init_from
    if not base_ref:
        raise UserError("model.init_from: name the base model to fine-tune (a local directory or an HF id)")
    check_run(recipe, resume)
    if recipe.sft.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("sft.method: qlora needs bitsandbytes (pip install --no-deps bitsandbytes)")
    check_model_dir(base_ref)
    return base_ref


def run(
    recipe: SFTRecipe,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    log: Callable[[str], None] = silent,
) -> SFTResult:
    """Fine-tune as the recipe says; returns where the adapter (or model) went and its validation metrics.
    Progress, and a summary of the records read (and any skipped), goes to `log`, one line at a time."""
    log = main_process_log(log)
    base_ref = check_start(recipe, resume)
    if recipe.vlm is not None:
        raise UserError(f"vlm: {base_ref} is a text-only model; the vlm section applies to a VLM base")
    tokenizer, tokens_added = _load_tokenizer(recipe)
    model = prepare_model(recipe, tokenizer, tokens_added)
    trainable, total = parameter_counts(model)

    def build(out: Path) -> tuple[TrainData, datasets.Dataset]:
        train, validation = build_datasets(recipe, tokenizer, out / "data-cache", log)
        check_rows_fit(model.config, base_ref, train, validation)
        return train, validation

    def describe(train: TrainData, validation: datasets.Dataset) -> str:
        return (
            f"{recipe.sft.method}: {trainable:,} of {total:,} parameters train; "
            f"{len(train):,} conversations, {len(validation):,} for validation"
        )

    def make_trainer(
        args: dict[str, Any], train: TrainData, validation: datasets.Dataset, hooks: list[TrainerCallback]
    ) -> Trainer:
        config = SFTConfig(**args, max_length=recipe.train.seq_len, packing=recipe.sft.packing, dataset_num_proc=None)
        return SeshuSFTTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            callbacks=hooks,
        )

    def result(done: Finished) -> SFTResult:
        return SFTResult.of(done, trainable, total, answer_tokens)

    job = Job(tokenizer, build, describe, make_trainer, lambda done: sft_card(recipe, result(done)))
    return result(run_job(recipe, job, resume=resume, callbacks=callbacks, log=log))
