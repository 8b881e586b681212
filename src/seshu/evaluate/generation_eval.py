"""`seshu eval generate`: generate an answer for every record of a task, batched and greedy, and score it.

Prompts are the task's plain template, wrapped in the tokenizer's chat template when it has one (a model
fine-tuned on chats expects its turns; `chat=False` keeps the plain text for a base model). Generation is
greedy, so the scores are reproducible, and runs in left-padded batches sorted by prompt length, so that
little compute goes to padding; each sequence stops at eos or the template's end-of-turn token, and one-line
tasks (translation, QA) stop a sequence at its first line break. The instruct task also scores the reference
answers by teacher forcing: answer-only perplexity, exp(mean NLL over the assistant tokens), with the same
mask SFT trains on. A VLM's caption task (`seshu.multimodal.caption_eval`) builds on the batched greedy generation
and the loss here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from seshu.chat import chat_prompt, encode_prompt, end_of_turn_ids
from seshu.errors import UserError
from seshu.evaluate.perplexity import NLLTotals
from seshu.evaluate.tasks import (
    VLM_TASKS,
    Task,
    TaskRecord,
    check_template,
    get_task,
    read_line_pairs,
    render_prompt,
)
from seshu.generate import SamplingOptions
from seshu.io import write_text_atomic
from seshu.models.registry import model_context_length
from seshu.progress import progress_bar

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class GenerationEvalResult:
    task: str
    scores: dict[str, float]
    prompts: list[str]
    predictions: list[str]
    records: list[TaskRecord]
    truncated: int = 0  # prompts cut from the left to leave room for the answer in the model's context

    def report(self) -> dict[str, Any]:
        return {"task": self.task, "records": len(self.records), "scores": self.scores}

    def rows(self) -> Iterator[dict[str, Any]]:
        """One {"prompt", "prediction", "reference" | "references"} per record (QA keeps every gold answer,
        caption every caption of the image), with the record's "images" when it has some."""
        for prompt, prediction, record in zip(self.prompts, self.predictions, self.records, strict=True):
            refs: dict[str, Any] = (
                {"references": record.references}
                if self.task in _MULTI_REFERENCE
                else {"reference": record.references[0]}
            )
            images = {"images": list(record.images)} if record.images else {}
            yield {"prompt": prompt, "prediction": prediction, **refs, **images}


# Tasks whose records may hold several references: their output rows list them all, for every record alike.
_MULTI_REFERENCE = frozenset({"qa", "caption"})


# --------------------------------------------------------------------------------------------------
# Prompts


def default_max_new_tokens(model: Any) -> int:
    """`DEFAULT_MAX_NEW_TOKENS`, or half the model's context when that is shorter, so a prompt still fits."""
    context = model_context_length(model.config)
    return DEFAULT_MAX_NEW_TOKENS if context is None else max(1, min(DEFAULT_MAX_NEW_TOKENS, context // 2))


def instruction_tuned(model: str, adapter: str | None) -> bool | None:
    """Whether the model (folder or Hub id, with `adapter`) was fine-tuned on chat-formatted text: False for a
    Seshu model whose card says it was only pretrained (or only made chat-ready), None when its card cannot
    tell (an adapter, a fine-tuned, folded or merged model, or a model from elsewhere)."""
    if adapter is not None or not Path(model).is_dir():
        return None
    from seshu.hub.card import seshu_block
    from seshu.models import chat_ready
    from seshu.train import pretrain

    # Such a model never saw chat-formatted text, whatever template its tokenizer carries (Seshu's tokenizers ship
    # one, so that fine-tuning can use it).
    not_tuned = (pretrain.CARD_COMMAND, chat_ready.CARD_COMMAND)
    return False if seshu_block(Path(model)).get("command") in not_tuned else None


def use_chat(tokenizer: PreTrainedTokenizerBase, task: Task, chat: bool | None) -> bool:
    """Whether prompts go through the chat template: as asked, else when the tokenizer has one (instruct always).

    A tokenizer without a template gets Seshu's ChatML one only if it already knows the ChatML tokens: new
    tokens would have no embeddings in the model being evaluated.
    """
    if task.answer_perplexity and chat is False:
        raise UserError("the instruct task renders conversations, so it needs the chat template; drop --no-chat")
    wanted = bool(tokenizer.chat_template) if chat is None else chat
    if not (wanted or task.answer_perplexity):
        return False
    if not tokenizer.chat_template:
        from seshu.chat import ensure_chat_template

        if ensure_chat_template(tokenizer):  # True when it had to add tokens
            raise UserError(
                "the tokenizer has no chat template and no ChatML tokens, so the model cannot read chat prompts; "
                "evaluate a model fine-tuned with a chat template"
                + ("" if task.answer_perplexity else ", or --no-chat")
            )
    return True


def build_prompts(
    task: Task,
    records: list[TaskRecord],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str | None = None,
    values: dict[str, str] | None = None,
    chat: bool = False,
) -> list[str]:
    """The prompt text of each record: a conversation up to its last answer, or the filled template (as the
    one user turn of a chat when `chat`)."""
    prompts = []
    for record in records:
        if record.messages is not None:
            prompts.append(chat_prompt(tokenizer, record.messages[:-1]))
            continue
        text = render_prompt(task, record, template, values or {})
        prompts.append(chat_prompt(tokenizer, [{"role": "user", "content": text.strip()}]) if chat else text)
    return prompts


# --------------------------------------------------------------------------------------------------
# Batched greedy generation


class _FirstLineDone(StoppingCriteria):
    """Stops each sequence once its answer has a line break after some text (leading blank lines are allowed:
    a chat model may start its answer on a new line)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [
            "\n" in str(self.tokenizer.decode(row[self.prompt_length :], skip_special_tokens=True)).lstrip()
            for row in input_ids.tolist()
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def finish_prediction(text: str, first_line: bool) -> str:
    """The answer as scored: without surrounding whitespace, and only its first line when `first_line`."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if first_line else text


def greedy_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, stop_ids: list[int]) -> GenerationConfig:
    """Greedy decoding without a repetition penalty (the model's own best answer), ending at any of `stop_ids`."""
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0)
    return options.generation_config(tokenizer, stop_ids)


def generate_batch(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    first_line: bool,
) -> list[str]:
    """Greedy continuations of the prompts (token ids), generated together from one left-padded batch."""
    config = greedy_config(tokenizer, max_new_tokens, stop_ids)
    pad = int(config.pad_token_id)
    width = max(len(ids) for ids in prompt_ids)
    # Left padding: every prompt ends at the same column, so each row's next token comes from its own last one.
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    return greedy_answers(model, tokenizer, inputs, config, first_line=first_line)


def greedy_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    config: GenerationConfig,
    *,
    first_line: bool,
) -> list[str]:
    """The answers `model.generate` gives to a left-padded batch (`input_ids`, `attention_mask` and whatever
    else the model reads, such as a VLM's `pixel_values`), each cut at its first stop token of `config`."""
    width = int(inputs["input_ids"].shape[1])
    device = next(model.parameters()).device
    criteria = StoppingCriteriaList([_FirstLineDone(tokenizer, width)]) if first_line else None
    output = model.generate(
        **{name: value.to(device) for name, value in inputs.items()},
        generation_config=config,
        stopping_criteria=criteria,
    )
    texts = []
    eos = config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))  # what follows is padding
        texts.append(finish_prediction(str(tokenizer.decode(row[:end], skip_special_tokens=True)), first_line))
    return texts


def fit_prompt(ids: list[int], context: int | None, max_new_tokens: int) -> tuple[list[int], bool]:
    """The prompt ids cut from the left so that the answer still fits the model's context (True if cut)."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids, False
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in a {context}-token context")
    return ids[-room:], True


def generate_all(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    stop_ids: list[int] | None = None,
    first_line: bool = False,
    progress: bool = False,
) -> tuple[list[str], int]:
    """Greedy predictions for all prompts (in their order) and how many prompts had to be cut to fit."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    stop_ids = stop_ids or ([] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)])
    context = model_context_length(model.config)
    fitted = [fit_prompt(encode_prompt(tokenizer, prompt), context, max_new_tokens) for prompt in prompts]
    # Longest first: each batch holds prompts of similar length, and an out-of-memory shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(fitted[i][0]))
    predictions = [""] * len(prompts)
    with torch.inference_mode(), progress_bar(progress, len(prompts), "generating") as advance:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            texts = generate_batch(
                model,
                tokenizer,
                [fitted[i][0] for i in batch],
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
                first_line=first_line,
            )
            for i, text in zip(batch, texts, strict=True):
                predictions[i] = text
            advance(len(batch))
    return predictions, sum(cut for _, cut in fitted)


# --------------------------------------------------------------------------------------------------
# Answer-only perplexity


def answer_nll(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> NLLTotals:
    """Summed NLL of the assistant tokens of each conversation (teacher forcing), with SFT's answer mask."""
    from seshu.data.instructions import labels_from_mask, tokenize_conversation

    context = model_context_length(model.config)
    examples = []
    for messages in conversations:
        encoded = tokenize_conversation(tokenizer, messages, max_length=context)
        labels = labels_from_mask(encoded["input_ids"], encoded["assistant_masks"])
        if any(label != -100 for label in labels[1:]):  # a conversation cut before its answer has nothing to score
            examples.append((encoded["input_ids"], labels))
    totals = NLLTotals(documents=len(examples))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    with torch.inference_mode(), progress_bar(progress, len(examples), "scoring answers") as advance:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            nll, tokens = _batch_answer_nll(model, batch, int(pad))
            totals.nll += nll
            totals.tokens += tokens
            advance(len(batch))
    return totals


def _batch_answer_nll(model: Any, batch: list[tuple[list[int], list[int]]], pad: int) -> tuple[float, int]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, row_labels) in enumerate(batch):  # right padding: positions are 0.. as in training
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    return summed_nll(logits, labels)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the labelled tokens (each predicted from the position before it; -100 is not scored) and
    how many there were."""
    targets = labels[:, 1:].to(logits.device)
    scored = targets != -100
    # float32 for the loss whatever the model's dtype; summed in float64 (many tokens).
    losses = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    return float(losses.double().sum()), int(scored.sum())


# --------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_generation(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    records: list[TaskRecord],
    *,
    template: str | None = None,
    values: dict[str, str] | None = None,
    chat: bool | None = None,
    first_line: bool | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = False,
) -> GenerationEvalResult:
    """Generate for every record and score: the task's scorer on the predictions, plus answer-only perplexity
    for instruct. `first_line` defaults to the task's choice (translation and QA answer in one line)."""
    if not records:
        raise UserError("no records to evaluate")
    chat_on = use_chat(tokenizer, task, chat)
    prompts = build_prompts(task, records, tokenizer, template=template, values=values, chat=chat_on)
    predictions, truncated = generate_all(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_ids=end_of_turn_ids(tokenizer) if chat_on else None,
        first_line=task.first_line if first_line is None else first_line,
        progress=progress,
    )
    scores: dict[str, float] = {}
    if task.score is not None:
        scores.update(task.score(predictions, [r.references for r in records]))
    if task.answer_perplexity:
        conversations = [r.messages for r in records if r.messages is not None]
        totals = answer_nll(model, tokenizer, conversations, batch_size=batch_size, progress=progress)
        if not totals.tokens:
            raise UserError("no conversation has an answer token within the model's context; nothing to score")
        scores.update({"perplexity": totals.perplexity, "answer_tokens": totals.tokens})
    return GenerationEvalResult(task.name, scores, prompts, predictions, records, truncated)


def generation_eval_from_paths(
    model: str,
    task: str,
    *,
    data: str | None = None,
    src_file: str | None = None,
    tgt_file: str | None = None,
    adapter: str | None = None,
    prompt_template: str | None = None,
    target_lang: str | None = None,
    source_lang: str | None = None,
    chat: bool | None = None,
    first_line: bool | None = None,
    image_folder: str | None = None,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    max_records: int | None = None,
    device: str | None = None,
    out: Path | None = None,
    progress: bool = False,
) -> GenerationEvalResult:
    """`seshu eval generate` as a function: read the records (`data`, or for translation the line-aligned
    `src_file`/`tgt_file`), load the model (with `adapter`), evaluate, and write per-record outputs to `out`
    (JSON Lines, atomically). Inputs are all checked before the model loads.

    A VLM (`seshu vlm build`) runs the caption task on image records instead (`seshu.multimodal.caption_eval`):
    `image_folder` is where their image paths point, `prompt` the user turn of COCO records.

    `max_new_tokens` defaults to `default_max_new_tokens` of the model; `chat` to off for a model that was
    only pretrained (`instruction_tuned`), else to whether the tokenizer has a chat template."""
    if max_records is not None and max_records < 1:
        raise UserError(f"--max-records must be at least 1, not {max_records}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    from seshu.multimodal.loading import is_vlm

    if is_vlm(model):
        text_only = {
            "--src-file": src_file,
            "--tgt-file": tgt_file,
            "--adapter": adapter,
            "--prompt-template": prompt_template,
            "--target-lang": target_lang,
            "--source-lang": source_lang,
            "--chat/--no-chat": chat,
        }
        given = _first_given(text_only)
        if given:
            raise UserError(f"{model} is a VLM, evaluated on image records; {given} is for text models, drop it")
        from seshu.multimodal.caption_eval import caption_eval_from_paths

        result = caption_eval_from_paths(
            model,
            task,
            data,
            image_folder=image_folder,
            prompt=prompt,
            first_line=first_line,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_records=max_records,
            device=device,
            progress=progress,
        )
    else:
        image_only = {
            f"--task {task}": task if task in VLM_TASKS else None,
            "--image-folder": image_folder,
            "--prompt": prompt,
        }
        given = _first_given(image_only)
        if given:
            raise UserError(
                f"{model} is a text-only model; {given} is for image records, which need a VLM "
                "(made by `seshu vlm build`)"
            )
        result = _text_eval(
            model,
            get_task(task),
            data=data,
            src_file=src_file,
            tgt_file=tgt_file,
            adapter=adapter,
            prompt_template=prompt_template,
            values={k: v for k, v in (("target_lang", target_lang), ("source_lang", source_lang)) if v is not None},
            chat=chat,
            first_line=first_line,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_records=max_records,
            device=device,
            progress=progress,
        )
    if out is not None:
        write_text_atomic(Path(out), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows()))
    return result


def _first_given(options: dict[str, Any]) -> str | None:
    """The first option (by its flag) that was given a value."""
    return next((flag for flag, value in options.items() if value is not None), None)


def _text_eval(
    model: str,
    spec: Task,
    *,
    data: str | None,
    src_file: str | None,
    tgt_file: str | None,
    adapter: str | None,
    prompt_template: str | None,
    values: dict[str, str],
    chat: bool | None,
    first_line: bool | None,
    max_new_tokens: int | None,
    batch_size: int,
    max_records: int | None,
    device: str | None,
    progress: bool,
) -> GenerationEvalResult:
    if prompt_template is not None:
        if spec.template is None:
            raise UserError(f"the {spec.name} task takes its prompts from the conversations; drop --prompt-template")
        check_template(spec, prompt_template)
    records = _read_records(spec, data, src_file, tgt_file, max_records)
    if spec.template is not None:  # a missing --target-lang should fail now, not after the model loads
        render_prompt(spec, records[0], prompt_template, values)

    from seshu.generate import load_for_generation

    lm, tokenizer = load_for_generation(model, adapter, device)
    if chat is None and instruction_tuned(model, adapter) is False and not spec.answer_perplexity:
        chat = False
    return evaluate_generation(
        lm,
        tokenizer,
        spec,
        records,
        template=prompt_template,
        values=values,
        chat=chat,
        first_line=first_line,
        max_new_tokens=max_new_tokens or default_max_new_tokens(lm),
        batch_size=batch_size,
        progress=progress,
    )


def _read_records(
    task: Task, data: str | None, src_file: str | None, tgt_file: str | None, max_records: int | None
) -> list[TaskRecord]:
    paired = src_file is not None or tgt_file is not None
    if paired and task.name != "translation":
        raise UserError("--src-file and --tgt-file make translation records; use --data for the other tasks")
    if paired and data is not None:
        raise UserError("give either --data or --src-file with --tgt-file, not both")
    if paired:
        if src_file is None or tgt_file is None:
            raise UserError("--src-file and --tgt-file go together: give both")
        records = read_line_pairs(src_file, tgt_file)
        return records[:max_records] if max_records is not None else records
    if data is None:
        hint = " (or --src-file and --tgt-file)" if task.name == "translation" else ""
        raise UserError(f"give the evaluation records with --data{hint}")
    return list(islice(task.read(data), max_records))
