"""`seshu sft` on a VLM: visual (and spoken) instruction tuning, LLaVA's stage 2.

The records are conversations with images and recordings (`seshu.multimodal.conversations`: LLaVA's and
LLaMA-Factory's layouts). Each recording is transcribed by Whisper once, when the rows are built, and its words
take the place of its `<audio>`, as `seshu chat --audio` places them; each `<image>` expands to the positions its
features fill. The loss covers the assistant's answers only: prompt, image and transcript positions are -100.

LoRA (or QLoRA) adapts the language model alone: the vision tower gets no adapter and stays frozen (and is never
quantized, nor are the projector and the head). The projector trains whole beside the adapters (saved with
them, peft's `modules_to_save`) or stays as projector pretraining left it (`vlm.projector: freeze`); full
training trains the LM (and the projector, by the same option). `seshu adapters fold` turns the adapter into
a standalone VLM. Training runs on `seshu.train.run`'s skeleton with transformers' Trainer, as projector
pretraining does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, cast

import datasets
import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    TrainerCallback,
    set_seed,
)

from seshu.chat import CHAT_TOKENS
from seshu.config import SFTRecipe, SourceEntry, VLMSection
from seshu.data.instructions import IGNORE_INDEX, InstructionStats
from seshu.data.mixing import is_validation
from seshu.data.pipeline import cached_rows, state_digest
from seshu.errors import UserError
from seshu.models.registry import arch_of
from seshu.multimodal.conversations import MediaConversation, read_media_conversations, with_transcripts
from seshu.multimodal.loading import load_vlm
from seshu.multimodal.rows import ROW_FEATURES, check_image_tokens, conversation_row, media_trainer, rows_state
from seshu.multimodal.speech import Transcriber, bundled_model
from seshu.train.common import main_process_log, silent
from seshu.train.lora import apply_lora
from seshu.train.precision import resolve_precision
from seshu.train.run import Finished, Job, TrainData, run_job
from seshu.train.sft import (
    SFTResult,
    check_rows_fit,
    check_start,
    load_in_4bit,
    parameter_counts,
    read_summary,
    sft_card,
)

PROJECTOR = "multi_modal_projector"
# What LoRA never adapts (a regex on module paths, as peft's `exclude_modules` takes it): the vision tower has
# q_proj, k_proj, v_proj and fc1/fc2 of its own, which the LM's target names would otherwise match.
NOT_ADAPTED = f".*(vision_tower|{PROJECTOR}).*"


# ------------------------------------------------------------------------------------------------
# Data


@dataclass
class MediaStats(InstructionStats):
    """`InstructionStats` with the images and recordings the conversations held."""

    images: int = 0
    recordings: int = 0

    def summary(self) -> str:
        return f"{super().summary()}; {self.images} images, {self.recordings} recordings"


class Listener:
    """Transcribes recordings with the Whisper of `vlm.whisper`, loaded at the first recording (records without
    audio never load one)."""

    def __init__(self, vlm: VLMSection, log: Callable[[str], None]) -> None:
        self.vlm = vlm
        self.log = log
        self.transcriber: Transcriber | None = None

    def __call__(self, path: str) -> str:
        if self.transcriber is None:
            model = self.vlm.whisper or bundled_model()
            self.transcriber = Transcriber(model, seconds=self.vlm.audio_seconds, log=self.log)
        return self.transcriber(path)


def _conversations(
    recipe: SFTRecipe, entries: list[SourceEntry], stats: InstructionStats
) -> Iterator[MediaConversation]:
    data, vlm = recipe.data, recipe.vlm or VLMSection()
    for entry in entries:
        yield from read_media_conversations(
            entry.path,
            format=data.format,
            on_error=data.on_error,
            split=entry.split,
            name=entry.name,
            stats=stats,
            media_folder=vlm.media_folder,
        )


def _split(recipe: SFTRecipe, split: str, stats: InstructionStats) -> Iterator[MediaConversation]:
    data, seed = recipe.data, recipe.train.seed
    if not isinstance(data.validation, float):
        return _conversations(recipe, data.train_sources() if split == "train" else data.validation_sources(), stats)
    want = split == "validation"
    fraction = data.validation
    conversations = _conversations(recipe, data.train_sources(), stats)
    return (c for c in conversations if is_validation(c.key(), fraction, seed) == want)


def _rows(
    recipe: SFTRecipe,
    tokenizer: PreTrainedTokenizerBase,
    image_token_id: int,
    image_tokens: int,
    split: str,
    stats: MediaStats,
    listen: Listener,
) -> Iterator[dict[str, Any]]:
    conversations = _split(recipe, split, stats)
    if split == "train" and recipe.data.max_records:
        conversations = islice(conversations, recipe.data.max_records)
    for conversation in conversations:
        stats.images += len(conversation.images)
        stats.recordings += len(conversation.audios)
        messages = with_transcripts(conversation.messages, [listen(path) for path in conversation.audios])
        row = conversation_row(
            tokenizer,
            messages,
            conversation.images,
            conversation.where,
            image_token_id,
            image_tokens,
            recipe.train.seq_len,
        )
        if row is not None:
            yield row


def build_datasets(
    recipe: SFTRecipe,
    tokenizer: PreTrainedTokenizerBase,
    image_token_id: int,
    image_tokens: int,
    cache: Path,
    log: Callable[[str], None] = silent,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and validation rows, built once into Arrow under `cache` (recordings transcribed then; the images
    are read at each step). What the records held goes to `log`."""
    for _ in islice(_conversations(recipe, recipe.data.train_sources(), InstructionStats()), 8):
        pass  # a bad path, format or record, before anything is written
    vlm = recipe.vlm or VLMSection()
    listen = Listener(vlm, log)
    separate = bool(recipe.data.validation_sources())
    splits = []
    for split in ("train", "validation"):
        state = rows_state(recipe, tokenizer, split, image_token_id, image_tokens)
        state["speech"] = [vlm.media_folder, vlm.whisper, vlm.audio_seconds]
        stats = MediaStats()
        gen_kwargs = {
            "recipe": recipe,
            "tokenizer": tokenizer,
            "image_token_id": image_token_id,
            "image_tokens": image_tokens,
            "split": split,
            "stats": stats,
            "listen": listen,
        }
        fingerprint = state_digest(state)
        ds = cached_rows(_rows, ROW_FEATURES, gen_kwargs, fingerprint, cache)
        if len(ds) == 0:
            raise UserError(
                f"data: the {split} split has no conversation with an answer within train.seq_len="
                f"{recipe.train.seq_len} tokens; add records or raise train.seq_len"
            )
        if split == "train" or separate:
            label = f"{split} data" if separate else "data (training and held-out)"
            log(f"{label}: {read_summary(stats, cache / f'{fingerprint}.summary')}")
        splits.append(ds)
    return splits[0], splits[1]


def answer_tokens(ds: datasets.Dataset) -> int:
    """Tokens the loss covers in `ds` (labels other than -100), counted by Arrow."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(ds.with_format("arrow")["labels"])
    return int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)


# ------------------------------------------------------------------------------------------------
# Model


def _load_base(recipe: SFTRecipe, path: str) -> LlavaForConditionalGeneration:
    method, precision = recipe.sft.method, resolve_precision(recipe.train.precision)
    if method == "qlora":
        spec = arch_of(AutoConfig.from_pretrained(path).get_text_config())
        # Module paths from the top (transformers matches a skip pattern from the start, or as a suffix).
        skip = ["model.vision_tower", f"model.{PROJECTOR}", "lm_head", *(spec.qlora_skip_modules if spec else ())]
        return cast(
            LlavaForConditionalGeneration, load_in_4bit(LlavaForConditionalGeneration, path, recipe.train, skip)
        )
    # LoRA keeps the frozen base in the training precision; full training keeps fp32 master weights.
    model, _ = load_vlm(path, dtype="bfloat16" if method == "lora" and precision == "bf16" else "float32")
    return model


def untrained_chat_tokens(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of Seshu's chat tokens whose embedding rows never trained: `seshu vlm build` adds them to an LM
    without a chat template with every new row at the same mean, so rows still equal to one another have
    not moved since. The adapter then trains those rows (and no other)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in CHAT_TOKENS]
    known = [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    if len(known) < len(ids):
        return []
    rows = cast(torch.Tensor, model.get_input_embeddings().weight)[known]
    return known if bool((rows == rows[0]).all()) else []


def prepare_model(
    recipe: SFTRecipe, tokenizer: PreTrainedTokenizerBase, path: str
) -> LlavaForConditionalGeneration | PeftModel:
    """The VLM wrapped for the method: the vision tower frozen, the projector trained or frozen as `vlm.projector`
    says, LoRA on the language model only."""
    vlm = recipe.vlm or VLMSection()
    model = _load_base(recipe, path)
    train_projector = vlm.projector == "train"
    projector = model.model.multi_modal_projector
    if recipe.sft.method == "full":
        model.model.vision_tower.requires_grad_(False)
        projector.requires_grad_(train_projector)
        return model
    if train_projector:
        projector.float()  # a whole module trains in fp32 master weights, whatever the frozen base's dtype
    if recipe.train.gradient_checkpointing and recipe.sft.method == "lora":
        model.enable_input_require_grads()  # the frozen embeddings give checkpointed layers no gradient path
    set_seed(recipe.train.seed)  # LoRA's A matrices start random: seeded, a run (of one or several processes) repeats
    return apply_lora(
        model,
        recipe.sft.lora,
        "sft.lora",
        new_token_ids=untrained_chat_tokens(model, tokenizer) or None,
        exclude_modules=NOT_ADAPTED,
        modules_to_save=[PROJECTOR] if train_projector else None,
    )


# ------------------------------------------------------------------------------------------------
# Running


def _check_recipe(recipe: SFTRecipe, base: str) -> None:
    if recipe.tokenizer.path:
        raise UserError(f"tokenizer.path: {base} is a VLM and brings its own tokenizer (in its processor)")
    if recipe.sft.packing:
        raise UserError("sft.packing: not supported for a VLM (its rows carry images); set sft.packing: false")


def run(
    recipe: SFTRecipe,
    *,
    resume: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    log: Callable[[str], None] = silent,
) -> SFTResult:
    """Fine-tune the VLM of `recipe.model.init_from` on conversations with images and recordings, as the recipe
    says; returns where the adapter (or model) went and its answer-only validation metrics."""
    log = main_process_log(log)
    base_ref = check_start(recipe, resume)
    _check_recipe(recipe, base_ref)
    processor = LlavaProcessor.from_pretrained(base_ref)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = prepare_model(recipe, tokenizer, base_ref)
    config = model.config
    check_image_tokens(processor, config, base_ref)
    image_token_id, image_tokens = int(config.image_token_id), int(config.image_seq_length)
    trainable, total = parameter_counts(model)

    def build(out: Path) -> tuple[TrainData, datasets.Dataset]:
        train, validation = build_datasets(recipe, tokenizer, image_token_id, image_tokens, out / "data-cache", log)
        check_rows_fit(config, base_ref, train, validation)
        return train, validation

    def describe(train: TrainData, validation: datasets.Dataset) -> str:
        projector = "trains whole" if (recipe.vlm or VLMSection()).projector == "train" else "frozen"
        return (
            f"{recipe.sft.method}: {trainable:,} of {total:,} parameters train (the language model; the projector "
            f"{projector}; the vision tower frozen); {len(train):,} conversations, {len(validation):,} for "
            f"validation; {image_tokens} positions per image"
        )

    def result(done: Finished) -> SFTResult:
        return SFTResult.of(done, trainable, total, answer_tokens)

    job = Job(
        processor,
        build,
        describe,
        media_trainer(model, processor, int(tokenizer.pad_token_id)),
        lambda done: sft_card(recipe, result(done), vision=True),
    )
    return result(run_job(recipe, job, resume=resume, callbacks=callbacks, log=log))
