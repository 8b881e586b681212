"""Test-only builders shared by several test modules."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BASE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def save_bpe_tokenizer(corpus: list[str], out: Path, vocab_size: int = 300, chat_tokens: bool = True) -> Path:
    """A small byte-level BPE (any text encodes) with bos/eos/pad/unk, optionally the ChatML tokens, and no
    chat template of its own, saved to `out`."""
    specials = BASE_SPECIALS + (CHAT_SPECIALS if chat_tokens else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=specials[4:],
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(out))
    return out


def save_tiny_model(
    out: Path,
    corpus: list[str],
    *,
    arch: str = "llama",
    tied: bool = False,
    chat_tokens: bool = False,
    vocab_size: int = 300,
    context_length: int = 64,
) -> Path:
    """A seeded tiny `arch` model and its byte-level BPE tokenizer (trained on `corpus`; without a chat template,
    and without the chat tokens unless `chat_tokens`), saved together in `out`."""
    from seshu.models.registry import build_config, build_model

    tokenizer_dir = save_bpe_tokenizer(corpus, out.parent / f"{out.name}-tokenizer", vocab_size, chat_tokens)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = build_config(
        arch, "tiny", vocab_size=len(tokenizer), context_length=context_length, special_token_ids=ids,
        overrides={"tie_word_embeddings": tied},
    )  # fmt: skip
    build_model(config, seed=0).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
