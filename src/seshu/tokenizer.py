"""Train byte-level BPE and Unigram tokenizers, and measure how well they fit each script.

A tokenizer decides how much a small language costs: a Hindi word split into ten tokens is ten times more
compute, a ten times shorter context and a worse model than an English word split into one. So training
can balance scripts (XLM-R style sampling, `balanced_sample`), and `tokenizer_stats` reports fertility
(tokens per whitespace word) and bytes per token per script, which is how the balance is checked.

Every tokenizer is a plain Hugging Face folder (tokenizer.json, tokenizer_config.json, ...) that
`transformers.AutoTokenizer.from_pretrained` loads without Seshu.

Vocabulary layout, the same for both kinds: ids 0-5 are `<pad>`, `<s>`, `</s>`, `<unk>`, `<|im_start|>`,
`<|im_end|>` (pad is 0 so that zero-filled buffers are padding), then the 256 bytes, then the learnt
vocabulary. The chat tokens are part of `vocab_size`, so `len(tokenizer) == vocab_size` and the model's
embedding size is the number the user asked for. Both kinds can encode any text without `<unk>`: BPE is
byte-level, and Unigram falls back to `<0xNN>` byte pieces (as Llama's SentencePiece does) for characters
its vocabulary lacks, such as the newline of the chat template in a one-line-per-document corpus.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from seshu.chat import CHAT_TOKENS, DEFAULT_CHAT_TEMPLATE
from seshu.config import TextUnit
from seshu.data.scripts import SCRIPTS, char_script, detect_script
from seshu.data.sources import corpus_files, read_documents
from seshu.errors import UserError, first_line
from seshu.hub.card import render_card
from seshu.hub.ids import is_hub_id
from seshu.io import sha256_file, staged_dir

TokenizerKind = Literal["bpe", "unigram"]
KINDS: tuple[str, ...] = ("bpe", "unigram")

# Dict order is id order: pad, bos, eos, unk get ids 0, 1, 2, 3.
SPECIAL_TOKENS: dict[str, str] = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
ALL_SPECIAL_TOKENS: tuple[str, ...] = (*SPECIAL_TOKENS.values(), *CHAT_TOKENS)

# The context the tokenizer advertises until a model is attached (transformers warns past it); whoever
# saves a model with it should set `model_max_length` to the model's real sequence length.
DEFAULT_MODEL_MAX_LENGTH = 2048

# GPT-2's split regex with one change: combining marks (\p{M}) and the zero-width (non-)joiners count as
# letters. GPT-2 uses ` ?\p{L}+`, which cuts every Indic word at each vowel sign and virama (they are marks,
# not letters), so no merge can ever span a whole word: on Hindi this alone gives 2.8 tokens per word
# instead of 1.6 at the same vocabulary size (4k vocab, 12k lines of en/hi/mr/te).
_SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    r"| ?[\p{L}\p{M}\x{200C}\x{200D}]+"
    r"| ?\p{N}+"
    r"| ?[^\s\p{L}\p{M}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)
_BYTE_ALPHABET_SIZE = 256


def min_vocab_size(kind: str) -> int:
    """The smallest vocabulary that can hold the special tokens and the 256 bytes (for either kind)."""
    return len(ALL_SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE


# --------------------------------------------------------------------------------------------------
# Choosing the training documents


def _balance_key(text: str) -> str | None:
    """The script a document is balanced under; None for text with no letters at all (numbers, rules,
    page markers), which keeps its own rate: a handful of such lines must not be upsampled as if they
    were a small language."""
    counts = Counter(s for s in map(char_script, text) if s is not None)
    return counts.most_common(1)[0][0] if counts else None


def balanced_sample(texts: Iterable[str], alpha: float, seed: int) -> Iterator[str]:
    """Documents re-sampled so that each script's share of characters becomes proportional to p**alpha.

    With p_i the character share of script i, the target share is q_i = p_i**alpha / sum_j p_j**alpha
    (XLM-R, Conneau et al. 2020: alpha=1 keeps the mix, alpha=0 gives all scripts the same share, 0.3 is
    the usual middle). Each document of script i is emitted floor(f_i) or ceil(f_i) times, f_i = q_i / p_i,
    so the expected total character count stays the same while small scripts are repeated and big ones
    thinned. The output is shuffled and fully determined by `seed`. Letterless documents keep rate 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"balance alpha must be between 0 and 1, not {alpha}")
    docs = list(texts)  # two passes: shares first, then sampling
    keys = [_balance_key(doc) for doc in docs]
    chars: Counter[str] = Counter()
    for doc, key in zip(docs, keys, strict=True):
        if key is not None:
            chars[key] += len(doc)
    total = sum(chars.values())
    factor: dict[str | None, float] = {None: 1.0}
    if total:
        weights = {s: (n / total) ** alpha for s, n in chars.items()}
        norm = sum(weights.values())
        factor.update({s: (weights[s] / norm) / (n / total) for s, n in chars.items()})

    rng = random.Random(seed)
    out: list[str] = []
    for doc, key in zip(docs, keys, strict=True):
        f = factor.get(key, 1.0)
        copies = math.floor(f) + (1 if rng.random() < f - math.floor(f) else 0)
        out.extend([doc] * copies)
    rng.shuffle(out)
    yield from out


def select_documents(
    texts: Iterable[str],
    *,
    balance_alpha: float | None = None,
    seed: int = 0,
    max_docs: int | None = None,
) -> list[str]:
    """The documents a tokenizer is trained on: non-blank inputs, at most `max_docs` of them (a uniform
    random sample, kept in input order, so memory stays bounded on a big corpus), then balanced by script
    when `balance_alpha` is given (which repeats small-script documents, so the result can be longer)."""
    if max_docs is not None and max_docs < 1:
        raise UserError(f"max docs must be at least 1, not {max_docs}")
    if balance_alpha is not None and not 0.0 <= balance_alpha <= 1.0:
        raise UserError(f"balance alpha must be between 0 and 1, not {balance_alpha}")
    rng = random.Random(seed)
    docs: list[str] = []
    seen = 0
    for text in texts:
        if not text.strip():
            continue
        seen += 1
        if max_docs is None or len(docs) < max_docs:
            docs.append(text)
        else:  # reservoir sampling (Algorithm R)
            slot = rng.randrange(seen)
            if slot < max_docs:
                docs[slot] = text
    if not docs:
        raise UserError("no text to train a tokenizer on: every input document is empty")
    if balance_alpha is not None:
        docs = list(balanced_sample(docs, balance_alpha, seed))
    return docs


# --------------------------------------------------------------------------------------------------
# Training


def _train_backend(kind: str, docs: list[str], vocab_size: int, show_progress: bool) -> Tokenizer:
    specials = list(ALL_SPECIAL_TOKENS)
    trainer: trainers.Trainer
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Every byte is in the alphabet from the start, so any text encodes and `<unk>` never appears.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    else:
        tok = Tokenizer(models.Unigram())
        # "first": only the start of the text gets the ▁ prefix, not each piece after a special token, so
        # "<|im_start|>user" round-trips without a stray space.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - _BYTE_ALPHABET_SIZE,  # the byte pieces are added after training
            special_tokens=specials,
            unk_token=SPECIAL_TOKENS["unk"],
            # The chat template's newline gets a piece of its own even from a one-line-per-document corpus
            # (a byte piece would share its offsets with a following unknown character).
            initial_alphabet=["\n"],
            show_progress=show_progress,
        )
    # NFC so that the same word typed with precomposed or combining characters is the same tokens.
    tok.normalizer = normalizers.NFC()
    try:
        tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    except Exception as exc:
        # The Unigram trainer must keep every character it saw; a tiny vocabulary cannot.
        if "not large enough" in str(exc):
            raise UserError(
                f"vocab size {vocab_size} cannot hold every distinct character of the corpus; raise --vocab-size"
            ) from None
        raise
    if kind == "unigram":
        tok.model = _with_byte_fallback(tok)
    return tok


def _with_byte_fallback(tok: Tokenizer) -> models.Unigram:
    """The trained Unigram model with `<0x00>`..`<0xFF>` pieces after the special tokens and byte fallback
    switched on. Their score is far below any learnt piece, so they are used only for unknown characters."""
    model = json.loads(tok.to_str())["model"]
    pieces = [(piece, score) for piece, score in model["vocab"]]
    n_special = len(ALL_SPECIAL_TOKENS)
    floor = min(score for _, score in pieces[n_special:]) if len(pieces) > n_special else 0.0
    byte_pieces = [(f"<0x{b:02X}>", floor - 20.0) for b in range(_BYTE_ALPHABET_SIZE)]
    vocab = pieces[:n_special] + byte_pieces + pieces[n_special:]
    return models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=True)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` as a transformers tokenizer with Seshu's special tokens and chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens=list(CHAT_TOKENS),
        model_max_length=model_max_length,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        # No bos/eos added on encode: packing adds them itself, once per document.
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )


def _check_kind_and_size(kind: str, vocab_size: int) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}")
    if vocab_size < min_vocab_size(kind):
        raise UserError(
            f"vocab size {vocab_size} is too small: a tokenizer needs at least {min_vocab_size(kind)} "
            f"({len(ALL_SPECIAL_TOKENS)} special tokens + {_BYTE_ALPHABET_SIZE} bytes)"
        )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    kind: TokenizerKind = "bpe",
    *,
    balance_alpha: float | None = None,
    seed: int = 0,
    max_docs: int | None = None,
    show_progress: bool = False,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE or a Unigram tokenizer of `vocab_size` tokens (special tokens included).

    `balance_alpha`, `seed` and `max_docs` choose the documents as in `select_documents`. On a small
    corpus the vocabulary can come out smaller than asked: there is nothing left to merge.
    """
    _check_kind_and_size(kind, vocab_size)
    docs = select_documents(texts, balance_alpha=balance_alpha, seed=seed, max_docs=max_docs)
    return wrap_tokenizer(_train_backend(kind, docs, vocab_size, show_progress), model_max_length)


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path, *, card: dict[str, Any] | None = None) -> None:
    """Write `tokenizer` as a Hugging Face folder at `out`, atomically: the folder appears only complete.

    `card` (what made it: inputs, settings) goes into the YAML front matter of a README.md model card.
    An existing tokenizer-only folder is replaced; any other folder (a model's, a project's) is refused
    rather than deleted.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in _TOKENIZER_FILES for p in out.iterdir())):
        raise UserError(f"{out}: exists and is not a tokenizer folder; choose another --out")
    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_card_text(tokenizer, card or {}), encoding="utf-8")


# What save_pretrained writes for a tokenizer (this or an older transformers), plus the card.
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "README.md",
    }
)


def _card_text(tokenizer: PreTrainedTokenizerBase, card: dict[str, Any]) -> str:
    meta = {"library_name": "transformers", "tags": ["seshu", "tokenizer"], "seshu": card}
    body = (
        f"A tokenizer of {len(tokenizer)} tokens made with `seshu tokenizer train`. Load it with\n"
        "`transformers.AutoTokenizer.from_pretrained(<this folder>)`; measure it with\n"
        "`seshu tokenizer stats`."
    )
    return render_card("Tokenizer", meta, body)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (a tokenizer's or a model's) or a Hub id, with a UserError when the
    folder is missing or holds no tokenizer."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{path}: a tokenizer is a folder (with tokenizer.json), not a file")
    elif not is_hub_id(path):  # a mistyped path: sending it to the Hub would only add retries to the error
        raise UserError(f"{path}: tokenizer folder not found; train one with `seshu tokenizer train`")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load a tokenizer from it ({first_line(exc)})") from None


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class ScriptStats:
    """Counts over the documents of one script; the ratios are what compare tokenizers."""

    documents: int = 0
    words: int = 0
    tokens: int = 0
    bytes: int = 0

    @property
    def fertility(self) -> float:
        """Tokens per whitespace-separated word: 1.0 is a word per token, English BPE is ~1.3."""
        return self.tokens / self.words if self.words else 0.0

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token: how much text each token (and each step of the model) carries."""
        return self.bytes / self.tokens if self.tokens else 0.0


def tokenizer_stats(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 512
) -> dict[str, ScriptStats]:
    """Per-script counts, each document counted under `detect_script(doc)`; blank documents are skipped.
    Tokens are counted without special tokens, so the figures describe the text alone."""
    stats: dict[str, ScriptStats] = {}
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(
            batch,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # long documents are fine here: nothing is fed to a model
        )["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            entry = stats.setdefault(detect_script(doc), ScriptStats())
            entry.documents += 1
            entry.words += len(doc.split())
            entry.tokens += len(ids)
            entry.bytes += len(doc.encode("utf-8"))
        batch.clear()

    for text in texts:
        if text.strip():
            batch.append(text)
            if len(batch) >= batch_size:
                flush()
    if batch:
        flush()
    order = {name: i for i, name in enumerate(SCRIPTS)}
    return dict(sorted(stats.items(), key=lambda item: order.get(item[0], len(order))))


def stats_report(stats: dict[str, ScriptStats]) -> dict[str, Any]:
    """The stats as plain JSON-ready data: {"by_script": {script: {documents, words, tokens, bytes,
    fertility, bytes_per_token}}}."""
    return {
        "by_script": {
            script: {
                "documents": s.documents,
                "words": s.words,
                "tokens": s.tokens,
                "bytes": s.bytes,
                "fertility": round(s.fertility, 4),
                "bytes_per_token": round(s.bytes_per_token, 4),
            }
            for script, s in stats.items()
        }
    }


# --------------------------------------------------------------------------------------------------
# The commands, as functions (`seshu tokenizer train|stats` only parse arguments and call these)


@dataclass
class TrainSummary:
    out: Path
    vocab_size: int  # as trained: smaller than asked when the corpus ran out of merges
    documents: int  # distinct input documents used
    training_documents: int  # after balancing, which repeats small-script documents


def train_from_paths(
    data: list[str],
    out: Path,
    vocab_size: int = 8000,
    kind: TokenizerKind = "bpe",
    *,
    text_field: str = "text",
    text_unit: TextUnit = "auto",
    balance_alpha: float | None = None,
    max_docs: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> TrainSummary:
    """Train a tokenizer on the corpora at `data` (files, folders or dataset ids) and save it at `out`,
    with a model card recording the settings and the sha256 of every input file."""
    _check_kind_and_size(kind, vocab_size)  # before reading a possibly large corpus
    if not data:
        raise UserError("no corpus given: pass at least one --data PATH")
    sources = [read_documents(path, text_field, text_unit=text_unit) for path in data]  # checks every path now
    docs = select_documents((doc for source in sources for doc in source), seed=seed, max_docs=max_docs)
    used = len(docs)
    if balance_alpha is not None:
        docs = list(balanced_sample(docs, balance_alpha, seed))
    tokenizer = train_tokenizer(docs, vocab_size, kind, seed=seed, show_progress=show_progress)

    inputs: list[dict[str, str]] = []
    for path in data:
        files = corpus_files(path)
        if files is None:  # a dataset id
            inputs.append({"path": path})
        else:
            inputs.extend({"path": str(f), "sha256": sha256_file(f)} for f in files)
    card = {
        "kind": kind,
        "vocab_size": len(tokenizer),
        "requested_vocab_size": vocab_size,
        "text_unit": text_unit,
        "balance_alpha": balance_alpha,
        "max_docs": max_docs,
        "seed": seed,
        "documents": used,
        "training_documents": len(docs),
        "inputs": inputs,
    }
    save_tokenizer(tokenizer, out, card=card)
    return TrainSummary(out=Path(out), vocab_size=len(tokenizer), documents=used, training_documents=len(docs))


def stats_from_paths(
    tokenizer: str, data: list[str], text_field: str = "text", text_unit: TextUnit = "auto"
) -> dict[str, ScriptStats]:
    """`tokenizer_stats` of the tokenizer at `tokenizer` (folder or Hub id) over the corpora at `data`."""
    if not data:
        raise UserError("no corpus given: pass at least one --data PATH")
    tok = load_tokenizer(tokenizer)
    sources = [read_documents(path, text_field, text_unit=text_unit) for path in data]
    return tokenizer_stats(tok, (doc for source in sources for doc in source))
