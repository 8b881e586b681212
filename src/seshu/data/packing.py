"""Tokenise documents and pack them into fixed-length blocks, with no padding.

Every block is exactly `seq_len` tokens of real text: documents are joined end to end with an EOS token
between them (and a BOS before each when the tokenizer has one), and the stream is cut every `seq_len`
tokens. Nothing is wasted on padding, no attention mask is needed, and a long document simply continues in
the next block. Only the last partial block of the whole stream is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from transformers import PreTrainedTokenizerBase

from seshu.errors import UserError


def pack_token_ids(
    token_lists: Iterable[list[int]], seq_len: int, eos_id: int, bos_id: int | None = None
) -> Iterator[list[int]]:
    """Blocks of exactly `seq_len` ids from documents laid end to end as [bos] + ids + [eos]."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    prefix = [] if bos_id is None else [bos_id]
    buffer: list[int] = []
    for ids in token_lists:
        if not ids:
            continue
        buffer.extend(prefix)
        buffer.extend(ids)
        buffer.append(eos_id)
        full = len(buffer) - len(buffer) % seq_len
        for start in range(0, full, seq_len):
            yield buffer[start : start + seq_len]
        del buffer[:full]


def pack_documents(
    docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, batch_docs: int = 256
) -> Iterator[list[int]]:
    """`pack_token_ids` over documents tokenised `batch_docs` at a time (a fast tokenizer uses all cores
    on a batch, and one document at a time would spend most of its time crossing into Rust)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        name = tokenizer.name_or_path or "the tokenizer"
        raise UserError(
            f"{name} has no end-of-sequence token, which packing puts between documents; "
            "give it one (e.g. eos_token='</s>') and save it again"
        )
    bos_id = tokenizer.bos_token_id
    # Tokenizers such as GPT-2's use one token for both; adding it twice would only double the separator.
    if bos_id == eos_id:
        bos_id = None
    return pack_token_ids(_token_lists(docs, tokenizer, batch_docs), seq_len, eos_id, bos_id)


def _token_lists(docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, batch_docs: int) -> Iterator[list[int]]:
    iterator = iter(docs)
    while batch := list(islice(iterator, batch_docs)):
        # verbose=False: documents longer than model_max_length are expected here, packing cuts them.
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
