"""`seshu eval generate --task caption`: a VLM captions the images of image-caption records (or answers the
questions of LLaVA records about them), scored against the records' reference answers.

Records are read by `seshu.multimodal.records` (LLaVA's records, or COCO captions JSON with `prompt` as the user
turn) and grouped by what the model reads, its prompt and images: COCO gives an image five captions or more, so the
image is generated for once and scored against all of them with sacrebleu's multi-reference chrF and BLEU, as the
text tasks score (CIDEr would need COCO's Java tokenizer). The prompt is rendered with the VLM's chat template as
`seshu generate` renders it (`LoadedVLM.render`); generation is greedy, in left-padded batches sorted by length, and
stops at the end of the turn. Every reference is also scored by teacher forcing on the rows projector pretraining
trains on (`caption_row`: loss on the answer and its end-of-turn token only, never the prompt or the image
positions), so `loss` reads like that training's validation loss.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from seshu.chat import end_of_turn_ids
from seshu.errors import UserError
from seshu.evaluate.generation_eval import (
    GenerationEvalResult,
    default_max_new_tokens,
    greedy_answers,
    greedy_config,
    summed_nll,
)
from seshu.evaluate.perplexity import NLLTotals
from seshu.evaluate.tasks import VLM_TASKS, TaskRecord, translation_scores
from seshu.models.registry import model_context_length
from seshu.multimodal.config import DEFAULT_PROMPT, CaptionSource
from seshu.multimodal.generate import LoadedVLM, load_vlm_for_generation, vlm_inputs
from seshu.multimodal.images import load_image
from seshu.multimodal.pretrain_projector import caption_row
from seshu.multimodal.records import CaptionRecord, read_caption_records
from seshu.multimodal.rows import MediaCollator
from seshu.multimodal.vlm import IMAGE_TOKEN
from seshu.progress import progress_bar

# Teacher forcing on a model without a context limit: long enough for any caption row.
_NO_LIMIT = 1 << 20


def read_caption_task(data: str, image_folder: str | None = None, prompt: str = DEFAULT_PROMPT) -> list[TaskRecord]:
    """The records of `data` grouped by what the model reads: one record per prompt and images, holding every
    answer given to them as its references (groups in order of first appearance, answers in file order). The
    prompt is in `fields["prompt"]`, the image paths in `images`; a bad record raises a `UserError` naming it."""
    if image_folder is not None and not Path(image_folder).expanduser().is_dir():
        raise UserError(f"{image_folder}: image folder not found (--image-folder)")
    if prompt.count(IMAGE_TOKEN) != 1:
        raise UserError(
            f"--prompt must hold {IMAGE_TOKEN} once, where the image goes; it has {prompt.count(IMAGE_TOKEN)}"
        )
    groups: dict[tuple[str, tuple[str, ...]], tuple[str, list[str]]] = {}
    for record in read_caption_records(CaptionSource(path=data, image_folder=image_folder), prompt):
        _, answers = groups.setdefault((record.prompt, record.images), (record.where, []))
        answers.append(record.caption)
    if not groups:
        raise UserError(f"{data}: no image-caption records to evaluate")
    return [
        TaskRecord(where, answers, {"prompt": text}, images=images)
        for (text, images), (where, answers) in groups.items()
    ]


def _images(record: TaskRecord) -> list[Image.Image]:
    try:
        return [load_image(path) for path in record.images]
    except UserError as exc:
        raise UserError(f"{record.where}: {exc}") from None


def _positions(loaded: LoadedVLM) -> int:
    """How many positions one image fills (its `<image>` token's expansion)."""
    return int(loaded.model.config.image_seq_length)


def generate_answers(
    loaded: LoadedVLM,
    records: list[TaskRecord],
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    first_line: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to the rendered `prompts` (one per record, in their order) with the records' images, in
    left-padded batches of similar length; each ends at the chat template's end of turn."""
    tokenizer = loaded.tokenizer
    stops = end_of_turn_ids(tokenizer)
    context = model_context_length(loaded.model.config)
    lengths = [
        len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + len(record.images) * (_positions(loaded) - 1)
        for prompt, record in zip(prompts, records, strict=True)
    ]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: an out-of-memory shows at once
    answers = [""] * len(prompts)
    with torch.inference_mode(), progress_bar(progress, len(prompts), "generating") as advance:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            images = [image for i in batch for image in _images(records[i])]
            inputs = vlm_inputs(loaded.processor, [prompts[i] for i in batch], images)
            room = max_new_tokens
            if context is not None:
                room = min(room, context - int(inputs["input_ids"].shape[1]))
                if room < 1:
                    raise UserError(
                        f"{records[batch[0]].where}: the prompt with its image positions fills the model's "
                        f"{context}-token context, leaving no room for an answer; shorten the prompt"
                    )
            config = greedy_config(tokenizer, room, stops)
            texts = greedy_answers(loaded.model, tokenizer, inputs, config, first_line=first_line)
            for i, text in zip(batch, texts, strict=True):
                answers[i] = text
            advance(len(batch))
    return answers


def answer_nll(
    loaded: LoadedVLM, records: list[TaskRecord], *, batch_size: int = 8, progress: bool = False
) -> NLLTotals:
    """Summed NLL of every reference answer's tokens (and its end of turn) after the record's prompt and images,
    by teacher forcing, on projector pretraining's rows."""
    model, tokenizer = loaded.model, loaded.tokenizer
    image_token_id, positions = int(model.config.image_token_id), _positions(loaded)
    seq_len = model_context_length(model.config) or _NO_LIMIT
    rows = []
    for record in records:
        for answer in record.references:
            caption = CaptionRecord(record.where, record.fields["prompt"], answer, record.images)
            row = caption_row(tokenizer, caption, image_token_id, positions, seq_len)
            if row is not None:  # None: no answer token fits the context after the prompt
                rows.append(row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = MediaCollator(loaded.processor, int(pad or 0))
    totals = NLLTotals(documents=len(rows))
    device = next(model.parameters()).device
    with torch.inference_mode(), progress_bar(progress, len(rows), "scoring answers") as advance:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**{name: value.to(device) for name, value in batch.items()}, use_cache=False).logits
            nll, tokens = summed_nll(logits, labels)
            totals.nll += nll
            totals.tokens += tokens
            advance(len(batch["input_ids"]))
    return totals


def evaluate_captions(
    loaded: LoadedVLM,
    records: list[TaskRecord],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    first_line: bool = False,
    progress: bool = False,
) -> GenerationEvalResult:
    """Generate for every record of `read_caption_task` and score: chrF and BLEU against all its references, and
    the references' answer-only loss, perplexity (exp of the loss) and token count. `max_new_tokens` defaults to
    `default_max_new_tokens` of the model."""
    if not records:
        raise UserError("no records to evaluate")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    if loaded.tokenizer.pad_token is None:  # padded positions are masked, so any token will do (Phi-2 has no pad)
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    prompts = [loaded.render([{"role": "user", "content": record.fields["prompt"]}]) for record in records]
    predictions = generate_answers(
        loaded,
        records,
        prompts,
        max_new_tokens=max_new_tokens or default_max_new_tokens(loaded.model),
        batch_size=batch_size,
        first_line=first_line,
        progress=progress,
    )
    scores: dict[str, float] = translation_scores(predictions, [record.references for record in records])
    totals = answer_nll(loaded, records, batch_size=batch_size, progress=progress)
    if not totals.tokens:
        raise UserError("no reference answer has a token within the model's context; nothing to score")
    scores.update({"loss": totals.nll / totals.tokens, "perplexity": totals.perplexity, "answer_tokens": totals.tokens})
    return GenerationEvalResult(VLM_TASKS[0], scores, prompts, predictions, records)


def caption_eval_from_paths(
    model: str,
    task: str,
    data: str | None,
    *,
    image_folder: str | None = None,
    prompt: str | None = None,
    first_line: bool | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    max_records: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> GenerationEvalResult:
    """`seshu eval generate` on the VLM folder `model`: read and group the records of `data` (the first
    `max_records` groups), load the VLM on `device`, and evaluate. The records are all checked before it loads."""
    if task not in VLM_TASKS:
        raise UserError(f"{model} is a VLM; evaluate it on image records with --task {VLM_TASKS[0]}, not {task}")
    if data is None:
        raise UserError("give the image-caption records with --data (LLaVA JSON/JSONL or COCO captions JSON)")
    records = read_caption_task(data, image_folder, DEFAULT_PROMPT if prompt is None else prompt)
    loaded = load_vlm_for_generation(model, device)
    return evaluate_captions(
        loaded,
        records[:max_records],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        first_line=bool(first_line),
        progress=progress,
    )
