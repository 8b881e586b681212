"""Test-only builders shared by several test modules."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

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


@dataclass
class Outcome:
    """What a `seshu` command did: its exit code and what it wrote to stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one line a user error prints on stderr (the test fails if there is anything else there)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (self.code, self.err)
        assert "Traceback" not in self.err + self.out
        return lines[0]


def seshu(*args: object, stdin: str | None = None, env: dict[str, str] | None = None) -> Outcome:
    """`seshu ARGS` through the real entry point, in this process, with stdout and stderr captured apart, `env`
    over the environment and no SESHU_SERVER or SESHU_TOKEN of the caller's."""
    from seshu.cli import main

    argv = sys.argv
    sys.argv = ["seshu", *map(str, args)]
    try:
        isolated = {"SESHU_SERVER": None, "SESHU_TOKEN": None, **(env or {})}
        with CliRunner().isolation(input=stdin, env=isolated) as streams:
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    finally:
        sys.argv = argv
    return Outcome(code, out, err)
