"""Training rows of a VLM, for projector pretraining and visual instruction tuning alike: a conversation
rendered with the VLM's chat template, each `<image>` expanded to the positions its features fill, labels -100
everywhere but on the answers; and the collator that pads them and reads their images into `pixel_values`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image
from transformers import (
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from seshu.data.instructions import IGNORE_INDEX, Message, tokenize_conversation
from seshu.data.pipeline import sources_state, tokenizer_state
from seshu.errors import UserError
from seshu.multimodal.images import load_image
from seshu.train.run import TrainData

ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "images": datasets.List(datasets.Value("string")),
        "record": datasets.Value("string"),
    }
)


def rows_state(
    recipe: Any, tokenizer: PreTrainedTokenizerBase, split: str, image_token_id: int, image_tokens: int
) -> dict[str, Any]:
    """What the cached rows of one split depend on, for `seshu.data.pipeline.state_digest`: the recipe's data
    section and sources (one with `train_sources()` and `validation_sources()`), the tokenizer and its chat
    template, the image expansion, `train.seq_len` and `train.seed` (the held-out split)."""
    return {
        "split": split,
        "data": recipe.data.model_dump(mode="json"),
        "sources": sources_state(recipe.data),
        "tokenizer": tokenizer_state(tokenizer),
        "template": tokenizer.chat_template,
        "image": [image_token_id, image_tokens],
        "seq_len": recipe.train.seq_len,
        "seed": recipe.train.seed,
    }


def conversation_row(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    images: tuple[str, ...],
    where: str,
    image_token_id: int,
    image_tokens: int,
    seq_len: int,
) -> dict[str, Any] | None:
    """`input_ids` and `labels` of one conversation whose `<image>` tokens stand for `images`: each expanded to
    `image_tokens` positions, labels -100 but on the assistant's answers (and their end-of-turn tokens).

    A row longer than `seq_len` loses its end, and never in the middle of an image: it is cut before the first
    image that does not fit whole, and keeps the images before it. None when no answer token is left."""
    row = tokenize_conversation(tokenizer, messages)
    return image_row(row["input_ids"], row["assistant_masks"], images, where, image_token_id, image_tokens, seq_len)


def image_row(
    token_ids: list[int],
    learn: list[int],
    images: tuple[str, ...],
    where: str,
    image_token_id: int,
    image_tokens: int,
    seq_len: int,
) -> dict[str, Any] | None:
    """The row of tokens `token_ids` whose `<image>` tokens stand for `images`, learning the tokens where `learn`
    is 1: each `<image>` expanded to `image_tokens` positions (labels -100), cut as `conversation_row` says."""
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []  # where each image's positions begin
    for token, learned in zip(token_ids, learn, strict=True):
        if token == image_token_id:
            starts.append(len(ids))
            ids += [token] * image_tokens
            labels += [IGNORE_INDEX] * image_tokens
        else:
            ids.append(token)
            labels.append(token if learned else IGNORE_INDEX)
    whole = [start for start in starts if start + image_tokens <= seq_len]
    if starts and not whole and any(label != IGNORE_INDEX for label in labels[starts[0] :]):
        raise UserError(
            f"train.seq_len: {seq_len} tokens cannot hold {where} up to the end of its first image "
            f"({starts[0] + image_tokens} tokens with {image_tokens} positions per image); raise train.seq_len"
        )
    cut = starts[len(whole)] if len(whole) < len(starts) else seq_len
    labels = labels[: min(cut, seq_len)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids[: len(labels)], "labels": labels, "images": list(images[: len(whole)]), "record": where}


def check_image_tokens(processor: LlavaProcessor, config: LlavaConfig, where: str) -> None:
    """The processor must expand `<image>` to as many positions as the vision tower gives features (and as the
    config says), or the first batch would fail deep inside the model."""
    size = processor.image_processor.crop_size or processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or size.get("shortest_edge")
    blank = Image.new("RGB", (int(width), int(height)), "white")
    ids = processor(text=str(processor.image_token), images=[blank], add_special_tokens=False)["input_ids"][0]
    expanded = list(ids).count(int(config.image_token_id))
    if expanded != int(config.image_seq_length):
        raise UserError(
            f"{where}: the processor expands {processor.image_token} to {expanded} positions but the model's "
            f"config says {config.image_seq_length} (image_seq_length); rebuild the VLM with `seshu vlm build`"
        )


class MediaCollator:
    """Pads a batch of rows (labels with -100) and reads their images into `pixel_values`, in the order of the
    `<image>` positions; a batch without images has no `pixel_values`."""

    def __init__(self, processor: LlavaProcessor, pad_id: int) -> None:
        self.image_processor = processor.image_processor
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        images = []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
            for path in row["images"]:
                try:
                    images.append(load_image(path))
                except UserError as exc:
                    raise UserError(f"{row['record']}: {exc}") from None
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


def media_trainer(
    model: torch.nn.Module, processor: LlavaProcessor, pad_id: int
) -> Callable[[dict[str, Any], TrainData, datasets.Dataset, list[TrainerCallback]], Trainer]:
    """A `Job.make_trainer` for VLM rows: transformers' Trainer on `model`, batches made by `MediaCollator`."""

    def make_trainer(
        args: dict[str, Any], train: TrainData, validation: datasets.Dataset, hooks: list[TrainerCallback]
    ) -> Trainer:
        return Trainer(
            model=model,
            args=TrainingArguments(**args),
            data_collator=MediaCollator(processor, pad_id),
            train_dataset=train,
            eval_dataset=validation,
            callbacks=hooks,
        )

    return make_trainer
