"""Packing: blocks of exactly seq_len, EOS between documents, BOS if any, nothing lost but the tail."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, count, islice

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from seshu.data.packing import pack_documents, pack_token_ids
from seshu.errors import UserError

EOS, BOS = 0, 99
DOCS = ["the cat sat", "on the mat", "a dog ran far away", "the end"]


def flatten(blocks: Iterable[list[int]]) -> list[int]:
    return list(chain.from_iterable(blocks))


def tiny_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on DOCS; `special` names its eos/bos tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def test_blocks_are_exactly_seq_len_and_keep_every_token_but_the_tail() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    stream = [1, 2, 3, EOS, 4, 5, EOS, 6, 7, 8, 9, EOS]
    assert list(pack_token_ids(docs, 4, EOS)) == [stream[0:4], stream[4:8], stream[8:12]]
    blocks = list(pack_token_ids(docs, 5, EOS))
    assert all(len(b) == 5 for b in blocks)
    assert flatten(blocks) == stream[:10]  # only the final partial block (2 tokens) is dropped


def test_bos_before_each_document_when_given() -> None:
    blocks = list(pack_token_ids([[1, 2], [3]], 3, EOS, bos_id=BOS))
    assert blocks == [[BOS, 1, 2], [EOS, BOS, 3]]


def test_long_document_spans_blocks_and_empty_documents_add_nothing() -> None:
    blocks = list(pack_token_ids([[], list(range(1, 11)), []], 3, EOS))
    assert blocks == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_packing_is_lazy() -> None:
    endless = ([i] for i in count(1))
    assert list(islice(pack_token_ids(endless, 4, EOS), 2)) == [[1, EOS, 2, EOS], [3, EOS, 4, EOS]]


def test_seq_len_must_be_positive() -> None:
    with pytest.raises(ValueError):
        list(pack_token_ids([[1]], 0, EOS))


def test_pack_documents_puts_eos_between_documents() -> None:
    tokenizer = tiny_tokenizer(eos_token="</s>")
    blocks = list(pack_documents(DOCS, tokenizer, seq_len=5))
    flat = flatten(blocks)
    assert all(len(b) == 5 for b in blocks)
    assert tokenizer.decode(flat).split() == [
        *["the", "cat", "sat", "</s>"],
        *["on", "the", "mat", "</s>"],
        *["a", "dog", "ran", "far", "away", "</s>"],
        "the",  # "the end </s>" is 3 tokens: the 15 that fill three blocks stop after "the"
    ]
    # Batching is an implementation detail: any batch size gives the same blocks.
    assert list(pack_documents(DOCS, tokenizer, seq_len=5, batch_docs=1)) == blocks


def test_pack_documents_adds_bos_when_the_tokenizer_has_one() -> None:
    tokenizer = tiny_tokenizer(eos_token="</s>", bos_token="<s>")
    flat = flatten(pack_documents(DOCS[:2], tokenizer, seq_len=10))
    assert tokenizer.convert_ids_to_tokens(flat) == [
        "<s>",
        "the",
        "cat",
        "sat",
        "</s>",
        "<s>",
        "on",
        "the",
        "mat",
        "</s>",
    ]


def test_a_token_that_is_both_bos_and_eos_is_used_once() -> None:
    tokenizer = tiny_tokenizer(eos_token="</s>", bos_token="</s>")
    flat = flatten(pack_documents(DOCS[:2], tokenizer, seq_len=8))
    assert tokenizer.convert_ids_to_tokens(flat) == ["the", "cat", "sat", "</s>", "on", "the", "mat", "</s>"]


def test_tokenizer_without_eos_is_a_user_error() -> None:
    with pytest.raises(UserError, match="has no end-of-sequence token"):
        pack_documents(DOCS, tiny_tokenizer(), seq_len=4)
