"""`seshu vlm pretrain-projector`: train a VLM's projector alone on image-caption pairs (LLaVA's stage 1), so that
the image features it hands the frozen language model start to mean something to it.

Everything but the projector is frozen, and stays in the dtype it was saved in (a bf16 VLM is trained and
published in bf16, its frozen tensors bit for bit); the projector trains with float32 master weights and is rounded
to the VLM's dtype when published. The loss covers the caption only, never the prompt or the image positions
(-100). With `data.template: chat` each record is rendered with the VLM's chat template (the user turn holds
`<image>` and the prompt, the caption is the answer, with its end-of-turn token), as `seshu sft` and `seshu chat`
will see it later; with `plain`, as LLaVA-1.5's stage 1 lays it out (see `plain_caption_row`). Training runs on
`seshu.train.run` (transformers' Trainer), so checkpoints, resuming, tracking, 8-bit AdamW and bf16 work as in
pretraining; the result is a whole VLM folder that plain transformers loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)

from seshu.data.mixing import is_validation
from seshu.data.pipeline import cached_rows, state_digest
from seshu.errors import UserError
from seshu.hub.card import describe_inputs, describe_model, render_card, usage_snippet
from seshu.models.registry import count_parameters
from seshu.multimodal.config import IMAGE_TOKEN, CaptionSource, VLMPretrainRecipe
from seshu.multimodal.loading import load_vlm
from seshu.multimodal.records import CaptionRecord, read_caption_records, record_key
from seshu.multimodal.rows import (
    ROW_FEATURES,
    check_image_tokens,
    conversation_row,
    image_row,
    media_trainer,
    rows_state,
)
from seshu.train.common import main_process_log, silent
from seshu.train.run import Finished, Job, TrainData, check_run, run_job

CARD_COMMAND = "vlm pretrain-projector"


@dataclass
class ProjectorResult:
    output_dir: Path
    metrics: dict[str, float]  # validation caption loss and perplexity at the last step
    trainable_parameters: int  # the projector's
    total_parameters: int
    steps: int
    records: int  # training records


# ------------------------------------------------------------------------------------------------
# Model


def freeze_all_but_projector(model: LlavaForConditionalGeneration) -> int:
    """Freeze the vision tower, the LM and its head; the projector's parameter count (what trains)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for parameter in projector.parameters():
        parameter.requires_grad_(True)
    return count_parameters(projector)


def float32_projector(model: LlavaForConditionalGeneration) -> torch.dtype:
    """Give `model`'s projector float32 weights to train, whatever the dtype of the rest (which is left as it is);
    returns the projector's dtype before, the one to publish it in (`RoundProjector`).

    Float32 master weights, as mixed-precision training keeps them: bf16 holds 8 significant bits, so an update
    below about 1/256 of a weight (LLaVA's stage-1 learning rate is 1e-3, and it decays) would round away.
    """
    projector = model.model.multi_modal_projector
    dtype = next(projector.parameters()).dtype
    projector.float()
    # The vision tower hands over features in its own dtype; LLaVA casts the projector's output to the LM's.
    projector.register_forward_pre_hook(_to_own_dtype)
    return dtype


def _to_own_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class RoundProjector(TrainerCallback):
    """At the end of training, round the float32 projector to `dtype`, the VLM's, so the published VLM is of one
    dtype as its input was. Checkpoints keep the float32 weights, so a resumed run continues from them exactly.
    A validation at the last step was measured before the rounding (a later one, after)."""

    def __init__(self, projector: nn.Module, dtype: torch.dtype) -> None:
        self.projector = projector
        self.dtype = dtype

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.projector.to(self.dtype)


# ------------------------------------------------------------------------------------------------
# Data


def caption_row(
    tokenizer: PreTrainedTokenizerBase, record: CaptionRecord, image_token_id: int, image_tokens: int, seq_len: int
) -> dict[str, Any] | None:
    """The training row of one caption record: its prompt as the user turn, its caption as the answer (see
    `conversation_row`)."""
    messages = [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.caption}]
    return conversation_row(tokenizer, messages, record.images, record.where, image_token_id, image_tokens, seq_len)


def plain_caption_row(
    tokenizer: PreTrainedTokenizerBase, record: CaptionRecord, image_token_id: int, image_tokens: int, seq_len: int
) -> dict[str, Any] | None:
    """The row of one caption record in LLaVA-1.5's stage-1 `plain` layout: one `<image>` per image, then the
    caption and a newline (LLaVA's `plain` separator); no chat template, roles or prompt. The tokenizer adds its
    own special tokens (a BOS, say), as LLaVA's `tokenizer_image_token` does; the loss covers everything after
    the last image: the caption, the newline and any end token the tokenizer adds."""
    ids = list(tokenizer(IMAGE_TOKEN * len(record.images) + record.caption + "\n")["input_ids"])
    last_image = max(i for i, token in enumerate(ids) if token == image_token_id)
    learn = [int(i > last_image) for i in range(len(ids))]
    return image_row(ids, learn, record.images, record.where, image_token_id, image_tokens, seq_len)


CaptionRow: TypeAlias = Callable[[PreTrainedTokenizerBase, CaptionRecord, int, int, int], dict[str, Any] | None]

# How each `data.template` makes a record's row.
CAPTION_ROWS: dict[str, CaptionRow] = {"chat": caption_row, "plain": plain_caption_row}


def _records(recipe: VLMPretrainRecipe, sources: list[CaptionSource]) -> Iterator[CaptionRecord]:
    for source in sources:
        yield from read_caption_records(source, recipe.data.prompt)


def _split_records(recipe: VLMPretrainRecipe, split: str) -> Iterator[CaptionRecord]:
    data, seed = recipe.data, recipe.train.seed
    if not isinstance(data.validation, float):
        return _records(recipe, data.train_sources() if split == "train" else data.validation_sources())
    want = split == "validation"
    fraction = data.validation
    return (r for r in _records(recipe, data.train_sources()) if is_validation(record_key(r), fraction, seed) == want)


def _rows(
    recipe: VLMPretrainRecipe, tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int, split: str
) -> Iterator[dict[str, Any]]:
    records = _split_records(recipe, split)
    if split == "train" and recipe.data.max_records:
        records = islice(records, recipe.data.max_records)
    make_row = CAPTION_ROWS[recipe.data.template]
    for record in records:
        row = make_row(tokenizer, record, image_token_id, image_tokens, recipe.train.seq_len)
        if row is not None:
            yield row


def build_datasets(
    recipe: VLMPretrainRecipe, tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_tokens: int, cache: Path
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and validation rows, tokenized once into Arrow under `cache` (the images are read at each step)."""
    for _ in islice(_records(recipe, recipe.data.train_sources()), 8):  # a bad path or record, before any writing
        pass
    splits = []
    for split in ("train", "validation"):
        state = rows_state(recipe, tokenizer, split, image_token_id, image_tokens)
        gen_kwargs = {
            "recipe": recipe,
            "tokenizer": tokenizer,
            "image_token_id": image_token_id,
            "image_tokens": image_tokens,
            "split": split,
        }
        ds = cached_rows(_rows, ROW_FEATURES, gen_kwargs, state_digest(state), cache)
        if len(ds) == 0:
            raise UserError(f"data: the {split} split has no image-caption record; add records")
        splits.append(ds)
    return splits[0], splits[1]


# ------------------------------------------------------------------------------------------------
# Running


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _card(recipe: VLMPretrainRecipe, result: ProjectorResult, dtype: torch.dtype) -> str:
    sources = [s.path for s in recipe.data.train_sources() + recipe.data.validation_sources()]
    base = recipe.model.init_from
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["seshu", "llava", "vision-language"],
        "seshu": {
            "command": CARD_COMMAND,
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
            "steps": result.steps,
            "records": result.records,
            "dtype": _name(dtype),
            "metrics": result.metrics,
            "inputs": describe_inputs(sources),
            "init_from": describe_model(base),
            "recipe": recipe.model_dump(mode="json"),
        },
    }
    loss = result.metrics.get("eval_loss")
    body = (
        f"The VLM `{base}` with its projector pretrained on image-caption pairs by Seshu ({result.steps} steps, "
        f"{result.records:,} records, {result.trainable_parameters:,} projector parameters trained; the vision "
        f"tower and the language model are unchanged). Weights in {_name(dtype)}, as the "
        "input's (the projector trained in float32)."
        + (f" Caption-only validation loss: {loss:.4f}." if loss is not None else "")
        + "\n\n"
        + usage_snippet(vision=True)
    )
    return render_card(Path(recipe.output_dir).name, metadata, body)


def run(
    recipe: VLMPretrainRecipe,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    log: Callable[[str], None] = silent,
) -> ProjectorResult:
    """Pretrain the projector of `recipe.model.init_from` as the recipe says; returns where the VLM went and its
    validation caption loss. Progress goes to `log`, one line at a time."""
    log = main_process_log(log)
    check_run(recipe, resume)
    model, processor = load_vlm(recipe.model.init_from, dtype=None)
    check_image_tokens(processor, model.config, recipe.model.init_from)
    tokenizer = processor.tokenizer
    trainable = freeze_all_but_projector(model)
    dtype = float32_projector(model)
    total = count_parameters(model)
    image_token_id, image_tokens = int(model.config.image_token_id), int(model.config.image_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    make_trainer = media_trainer(model, processor, pad_id)

    def build(out: Path) -> tuple[TrainData, datasets.Dataset]:
        return build_datasets(recipe, tokenizer, image_token_id, image_tokens, out / "data-cache")

    def describe(train: TrainData, validation: datasets.Dataset) -> str:
        assert isinstance(train, datasets.Dataset)
        return (
            f"projector: {trainable:,} of {total:,} parameters train, in float32 (vision tower and LM frozen, "
            f"{_name(dtype)}); "
            f"{len(train):,} image-caption records, {len(validation):,} for validation; "
            f"{image_tokens} positions per image"
        )

    def result(done: Finished) -> ProjectorResult:
        assert isinstance(done.train_dataset, datasets.Dataset)
        return ProjectorResult(done.output_dir, done.metrics, trainable, total, done.steps, len(done.train_dataset))

    def trainer(
        args: dict[str, Any], train: TrainData, validation: datasets.Dataset, hooks: list[TrainerCallback]
    ) -> Trainer:
        return make_trainer(args, train, validation, [*hooks, RoundProjector(model.model.multi_modal_projector, dtype)])

    job = Job(processor, build, describe, trainer, lambda done: _card(recipe, result(done), dtype))
    return result(run_job(recipe, job, resume=resume, callbacks=callbacks, log=log))
