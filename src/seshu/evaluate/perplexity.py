"""Perplexity and bits per byte of a causal LM on a corpus, overall and per script.

Perplexity depends on the tokenizer (a tokenizer that cuts text into more, easier pieces looks better), so
every report also gives bits per byte: the same summed log-loss divided by the UTF-8 size of the text, which
compares models with different tokenizers. Both are reported per script (`detect_script`) because a
multilingual model's average hides the language it is bad at.

Documents longer than the model's context are scored with the strided sliding window of the Hugging Face
guide "Perplexity of fixed-length models": each window re-reads the end of the previous one as context and
scores only its new tokens, so every token is predicted exactly once with at least `max_length - stride`
tokens of history (except near the start of a document, which has no more).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from seshu.config import TextUnit
from seshu.data.scripts import detect_script
from seshu.errors import UserError
from seshu.models.registry import model_context_length

# Context for models whose config records none (Mamba and other state-space models, which have no
# position limit): long enough that few documents need a second window, short enough for a CPU.
DEFAULT_MAX_LENGTH = 1024
# Documents tokenized per tokenizer call: a fast tokenizer encodes a batch in parallel.
_TOKENIZE_DOCS = 64
# Windows collected before batching: sorting this many by length keeps padding low when documents are short.
_BUFFER_BATCHES = 8


@dataclass
class NLLTotals:
    """Summed negative log-likelihood (natural log) and what it was summed over."""

    nll: float = 0.0
    tokens: int = 0  # predicted (scored) tokens
    bytes: int = 0  # UTF-8 bytes of the documents
    documents: int = 0

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            return math.nan
        mean = self.nll / self.tokens
        # exp overflows past ~709; a model that bad is reported as infinitely perplexed.
        return math.exp(mean) if mean < 700 else math.inf

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def add(self, other: NLLTotals) -> NLLTotals:
        """Add `other` into these totals (and return them, so that totals can be summed in one expression)."""
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents
        return self


def document_windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Sliding windows over one document's token ids, as (window ids, leading context-only tokens).

    Windows start every `stride` tokens and hold up to `max_length` ids; the tokens a window shares with the
    previous one are context only, the rest are scored. Every token after the first (which has nothing to be
    predicted from) is scored exactly once. A window's first token can never be scored, so windows overlap by
    at least one token: a `stride` of `max_length` or more acts as `max_length - 1`.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (context and a token to score), not {max_length}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    stride = min(stride, max_length - 1)
    windows: list[tuple[list[int], int]] = []
    scored_end = 1  # ids[:scored_end] are scored already (or, for the first, never can be)
    begin = 0
    while scored_end < len(ids):
        end = min(begin + max_length, len(ids))
        windows.append((ids[begin:end], scored_end - begin))
        scored_end = end
        begin += stride
    return windows


def document_start_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every document starts from: bos, or eos for tokenizers without one (packing puts an eos
    between documents, so it is what such a model saw before each document's first token)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    raise UserError(
        "the tokenizer has neither a bos nor an eos token, so a document's first token cannot be scored; "
        "give it one (e.g. eos_token='</s>') and save it again"
    )


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, NLLTotals]:
    """Summed log-loss of `model` on `texts`, per script (sum the values for the overall figure).

    Each document is tokenized without special tokens and scored after the document-start token, the way
    pretraining packs it ([bos] doc [eos]), so every token of the document is predicted and bits per byte
    covers all its bytes. `max_length` defaults to the model's context (1024 for models without one),
    `stride` to half of it. Windows of several documents run together, `batch_size` at a time.
    """
    context = model_context_length(model.config)
    max_length = max_length or context or DEFAULT_MAX_LENGTH
    if max_length < 2:
        raise UserError(f"max length {max_length} is too short: a window needs at least 2 tokens")
    if context is not None and max_length > context:
        raise UserError(f"max length {max_length} is longer than the model's context of {context} tokens")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise UserError(f"stride {stride} must be between 1 and the max length ({max_length})")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size}")
    start_id = document_start_id(tokenizer)

    totals: dict[str, NLLTotals] = {}
    pending: list[tuple[list[int], int, str]] = []
    was_training = model.training
    model.eval()  # dropout would make the figures noisy
    try:
        with torch.inference_mode(), _Progress(progress) as bar:
            for chunk in _chunks(texts, _TOKENIZE_DOCS):
                # verbose=False: documents longer than the tokenizer's model_max_length are expected here.
                encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
                for text, ids in zip(chunk, encoded, strict=True):
                    if not ids:
                        continue  # nothing to predict, so its bytes must not count either
                    script = detect_script(text)
                    doc = totals.setdefault(script, NLLTotals())
                    doc.documents += 1
                    doc.bytes += len(text.encode("utf-8"))
                    pending.extend(
                        (window, n_context, script)
                        for window, n_context in document_windows([start_id, *ids], max_length, stride)
                    )
                if len(pending) >= batch_size * _BUFFER_BATCHES:
                    pending = _score_windows(model, pending, batch_size, start_id, totals, bar, flush=False)
            _score_windows(model, pending, batch_size, start_id, totals, bar, flush=True)
    finally:
        model.train(was_training)
    return totals


def sum_totals(by_script: dict[str, NLLTotals]) -> NLLTotals:
    """All scripts together."""
    overall = NLLTotals()
    for totals in by_script.values():
        overall.add(totals)
    return overall


def perplexity_report(by_script: dict[str, NLLTotals]) -> dict[str, Any]:
    """The totals as JSON-ready data: {"perplexity", "bits_per_byte", "tokens", "bytes", "documents",
    "by_script": {script: {the same keys}}}, scripts with the most tokens first."""
    if not any(t.tokens for t in by_script.values()):
        raise UserError("no document had any text to score; check the data path and --text-field")
    overall = sum_totals(by_script)
    ordered = sorted(by_script.items(), key=lambda item: (-item[1].tokens, item[0]))
    return {**_row(overall), "by_script": {script: _row(t) for script, t in ordered}}


def _row(t: NLLTotals) -> dict[str, Any]:
    return {
        "perplexity": t.perplexity,
        "bits_per_byte": t.bits_per_byte,
        "tokens": t.tokens,
        "bytes": t.bytes,
        "documents": t.documents,
    }


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _score_windows(
    model: PreTrainedModel,
    windows: list[tuple[list[int], int, str]],
    batch_size: int,
    pad_id: int,
    totals: dict[str, NLLTotals],
    bar: _Progress,
    *,
    flush: bool,
) -> list[tuple[list[int], int, str]]:
    """Score full batches of `windows` (all of them when `flush`) into `totals`; return what is left."""
    # Longest first, so each batch holds windows of similar length and pads little.
    windows = sorted(windows, key=lambda w: len(w[0]), reverse=True)
    n_full = len(windows) if flush else len(windows) - len(windows) % batch_size
    for start in range(0, n_full, batch_size):
        batch = windows[start : start + batch_size]
        nll = _batch_nll(model, [(ids, n_context) for ids, n_context, _ in batch], pad_id)
        for (ids, n_context, script), value in zip(batch, nll, strict=True):
            totals[script].nll += value
            totals[script].tokens += len(ids) - n_context
            bar.advance(len(ids) - n_context)
    return windows[n_full:]


def _batch_nll(model: PreTrainedModel, windows: list[tuple[list[int], int]], pad_id: int) -> list[float]:
    """Summed NLL of each window's scored tokens, from one right-padded forward pass."""
    length = max(len(ids) for ids, _ in windows)
    input_ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    # Padding and context-only positions get -100 and are left out of the loss.
    labels = torch.full_like(input_ids, -100)
    for row, (ids, n_context) in enumerate(windows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, n_context : len(ids)] = torch.tensor(ids[n_context:])
    device = model.device
    # The model's own `loss` is a mean over the whole batch, in the model's dtype; the per-window sums come
    # from the logits instead, in float32, and only the scored positions are converted.
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    targets = labels[:, 1:].to(device)
    scored = targets != -100
    losses = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    # Summed in float64: a corpus adds up millions of terms.
    sums = torch.zeros(len(windows), dtype=torch.float64, device=device).index_add_(0, rows, losses.double())
    return sums.tolist()


class _Progress:
    """A rich progress line on stderr (tokens scored so far), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("scoring: {task.completed:,.0f} tokens"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("scoring", total=None)
        return self

    def advance(self, tokens: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, tokens)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def perplexity_from_paths(
    model: str,
    data: list[str],
    *,
    adapter: str | None = None,
    text_field: str = "text",
    text_unit: TextUnit = "auto",
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_docs: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """`seshu eval perplexity` as a function: the `perplexity_report` of the model folder (or Hub id)
    `model`, with the PEFT adapter folder `adapter` applied when given, on the documents of `data` (files,
    folders or dataset ids), the first `max_docs` if set."""
    from seshu.data.sources import read_documents
    from seshu.generate import load_for_generation

    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be at least 1, not {max_docs}")
    # Every source is opened (and so checked) before the model loads: a mistyped path fails in a second.
    streams = [read_documents(path, text_field, text_unit=text_unit) for path in data]
    documents: Iterable[str] = (doc for stream in streams for doc in stream)
    if max_docs is not None:
        documents = islice(documents, max_docs)
    lm, tokenizer = load_for_generation(model, adapter, device, dtype=dtype)
    totals = evaluate_perplexity(
        lm,
        tokenizer,
        documents,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
    )
    return perplexity_report(totals)
