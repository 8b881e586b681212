"""Instruction data for SFT: records of any known layout -> canonical messages -> tokens with an answer mask.

`read_conversations` reads Alpaca, ShareGPT, OpenAI-style `messages`, prompt/completion and Self-Instruct
records (the registry is in `instruction_formats`) from json, jsonl, parquet, folders and Hugging Face
dataset ids, and checks every conversation; a bad record is named by file and record number, and
`on_error="skip"` counts it instead of stopping. `ensure_chat_template` gives a tokenizer without a chat
template Seshu's ChatML one, so that the saved tokenizer renders the same everywhere.
`tokenize_conversation` returns the ids and `assistant_masks` (1 on what the model must learn: each answer
and its end-of-turn token), which is the column `trl.SFTTrainer` turns into labels.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from seshu.chat import ensure_chat_template
from seshu.data.instruction_formats import (
    FORMATS,
    InstructionFormat,
    Message,
    detect_format,
    validate_conversation,
)
from seshu.data.sources import SourceRecord, read_records
from seshu.errors import UserError, first_line

__all__ = [
    "FORMATS",
    "InstructionFormat",
    "InstructionStats",
    "Message",
    "detect_format",
    "ensure_chat_template",
    "labels_from_mask",
    "read_conversations",
    "read_record_conversations",
    "tokenize_conversation",
    "validate_conversation",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and so every transformers model) skips

# `{% generation %}`, `{%- generation -%}` ...: the markers transformers turns into an assistant mask
# (the same test as trl's `has_generation_markers`).
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Rendered once to check a template before hours of training depend on it.
# --------------------------------------------------------------------------------------------------
# Reading records


@dataclass
class InstructionStats:
    """What a `read_conversations` pass saw; filled in as the records are read."""

    records: int = 0
    conversations: int = 0
    skipped: int = 0
    first_error: str | None = None  # the first skipped record's error, with where it is, for the summary line
    reasons: Counter[str] = field(default_factory=Counter)  # skipped records by what was wrong with them

    def summary(self) -> str:
        """One line for a log: "1000 records -> 997 conversations, 3 skipped: 2x no answer; 1x empty message
        (first: FILE, record 7: ...)", the reasons most frequent first."""
        line = f"{self.records} records -> {self.conversations} conversations"
        if self.skipped:
            reasons = "; ".join(f"{count}x {reason}" for reason, count in self.reasons.most_common())
            line += f", {self.skipped} skipped: {reasons} (first: {self.first_error})"
        return line


def read_conversations(
    path: str,
    *,
    format: str = "auto",
    on_error: Literal["raise", "skip"] = "raise",
    split: str = "train",
    name: str | None = None,
    stats: InstructionStats | None = None,
) -> Iterator[list[Message]]:
    """The conversations in the instruction data at `path` (a file, a folder or a dataset id), lazily.

    `format` is a name in `FORMATS`, or "auto": each file's format is detected from its first record, and
    the file's other records must share it (a record of another layout is then a bad record). Every
    conversation is checked with `validate_conversation`. A bad record raises a `UserError` naming the file
    and record, or with `on_error="skip"` is counted in `stats` and passed over. The path and the format
    name are checked at call time, before any record is read.
    """
    pairs = read_record_conversations(path, format=format, on_error=on_error, split=split, name=name, stats=stats)
    return (conversation for _, conversation in pairs)


def read_record_conversations(
    path: str,
    *,
    format: str = "auto",
    on_error: Literal["raise", "skip"] = "raise",
    split: str = "train",
    name: str | None = None,
    stats: InstructionStats | None = None,
) -> Iterator[tuple[SourceRecord, list[Message]]]:
    """`read_conversations`, each conversation with the record it came from (whose other fields, such as a
    multimodal record's images, the caller may need)."""
    if format != "auto" and format not in FORMATS:
        raise UserError(f"unknown instruction format {format!r}: choose auto or one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be raise or skip, not {on_error!r}")
    records = read_records(path, split=split, name=name)  # checks the path now
    return _conversations(records, path, format, on_error, stats if stats is not None else InstructionStats())


def _conversations(
    records: Iterator[SourceRecord], path: str, format: str, on_error: str, stats: InstructionStats
) -> Iterator[tuple[SourceRecord, list[Message]]]:
    formats: dict[str, InstructionFormat] = {}  # source -> its format, detected from its first good record
    read = usable = 0  # this pass's own counts: `stats` may be shared by several passes
    first_error: str | None = None
    for record in records:
        read += 1
        stats.records += 1
        try:
            conversations = _convert(record, format, formats)
        except ValueError as exc:
            message = f"{record.where}: {exc}"
            if on_error == "raise":
                raise UserError(f"{message}; fix the record, or set data.on_error: skip to skip bad ones") from None
            stats.skipped += 1
            stats.reasons[str(exc)] += 1
            stats.first_error = stats.first_error or message
            first_error = first_error or message
            continue
        usable += 1
        stats.conversations += len(conversations)
        for conversation in conversations:
            yield record, conversation
    if not usable:
        # Every record was skipped: training on nothing would only fail later, and less clearly.
        raise UserError(f"{path}: none of its {read} records is usable; the first error: {first_error}")


def _convert(record: SourceRecord, format: str, formats: dict[str, InstructionFormat]) -> list[list[Message]]:
    """The checked conversations of one record; ValueError says what is wrong with it."""
    value = record.value
    if not isinstance(value, dict):
        raise ValueError(f"expected an object with instruction fields, found {type(value).__name__}")
    if format != "auto":
        fmt = FORMATS[format]
    elif record.source in formats:
        fmt = formats[record.source]
    else:
        fmt = formats[record.source] = FORMATS[detect_format(value)]
    conversations = fmt.convert(value)
    if not conversations:
        raise ValueError(f"the {fmt.name} record holds no conversation")
    for conversation in conversations:
        validate_conversation(conversation)
    return conversations


# --------------------------------------------------------------------------------------------------
# Chat template


# --------------------------------------------------------------------------------------------------
# Tokenizing with an answer mask


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_length: int | None = None
) -> dict[str, list[int]]:
    """`{"input_ids", "assistant_masks"}` for one conversation rendered with the tokenizer's chat template.

    The mask is 1 on what the model must learn (each assistant answer and its end-of-turn token) and 0 on
    the system and user turns and the assistant header. A template with `{% generation %}` markers gives it
    directly (transformers' `return_assistant_tokens_mask`); any other template is handled by rendering the
    conversation's beginnings, which needs a template whose rendering of a beginning is a beginning of the
    whole rendering (every common chat template is). Sequences longer than `max_length` lose their end; if
    that cuts off every answer the mask is all zeros, and the caller should drop the example.
    """
    validate_conversation(messages)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    template = tokenizer.get_chat_template() if tokenizer.chat_template else None
    if template is None:
        raise UserError("the tokenizer has no chat template; call ensure_chat_template(tokenizer) first")
    # transformers maps the marked characters to tokens through offsets, which only fast tokenizers have.
    if _GENERATION_MARKER.search(template) and tokenizer.is_fast:
        out = _apply(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if 1 not in mask:
            raise UserError(
                "chat template's {% generation %} markers cover no token of the assistant's answers; "
                "put each answer and its end-of-turn token between {% generation %} and {% endgeneration %}"
            )
    else:
        input_ids, mask = _prefix_mask(tokenizer, messages)
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def _prefix_mask(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Ids of the whole conversation, and a mask from rendering its beginnings: assistant turn i covers the
    text between the rendering of turns [:i] with the generation prompt (which ends with the assistant
    header) and the rendering of turns [:i+1], less the whitespace that separates it from the next turn.

    The text spans are turned into token spans by tokenizing each beginning and finding where its ids stop
    agreeing with the whole conversation's; a token that straddles a boundary (merged across it) counts as
    the answer's, so that no answer text goes unlearned.
    """
    full = _render(tokenizer, messages)
    input_ids = _encode(tokenizer, full)
    mask = [0] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1])
        if not (full.startswith(prompt) and full.startswith(turn) and len(turn) > len(prompt)):
            raise UserError(
                "chat template renders the beginning of a conversation differently from the whole "
                f"conversation (at turn {i + 1}), so the answer tokens cannot be told apart; add "
                "{% generation %} markers around each assistant answer in the template"
            )
        # The newline after ChatML's <|im_end|> separates turns; the model need not learn to emit it
        # (generation stops at <|im_end|>), and the generation-marker path leaves it out too.
        turn = turn[: max(len(prompt) + 1, len(turn.rstrip()))]
        start = _common_prefix(_encode(tokenizer, prompt), input_ids)
        turn_ids = _encode(tokenizer, turn)
        agreed = _common_prefix(turn_ids, input_ids)
        end = agreed if agreed == len(turn_ids) else min(agreed + 1, len(input_ids))
        mask[start:end] = [1] * (end - start)
    return input_ids, mask


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool = False) -> str:
    rendered = _apply(tokenizer, messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(rendered, str)  # tokenize=False returns the text
    return rendered


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **kwargs: Any) -> Any:
    """`apply_chat_template`, with a template that fails on this conversation (a `raise_exception` for a
    role it does not support, say) turned into a UserError: the template is the user's to fix."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:
        raise UserError(f"chat template does not render this conversation: {first_line(exc)}") from None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # As apply_chat_template(tokenize=True) does: the template writes any BOS itself. verbose=False because
    # a long conversation is truncated by the caller, not an error.
    ids: list[int] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def labels_from_mask(input_ids: list[int], assistant_masks: list[int]) -> list[int]:
    """Labels for answer-only loss: the id where the mask is 1, -100 (ignored by the loss) where it is 0."""
    if len(input_ids) != len(assistant_masks):
        raise ValueError(f"{len(input_ids)} ids but {len(assistant_masks)} mask values")
    return [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, assistant_masks, strict=True)]
