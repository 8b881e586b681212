"""Test-only builders shared by several test modules."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

if TYPE_CHECKING:
    from PIL import Image

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


# A tiny CLIP vision tower: 32x32 images in 8x8 patches, so one `<image>` stands for 16 positions.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8)  # fmt: skip
TINY_VISION_PATCHES = 16
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle", "triangle")


def save_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A seeded random CLIP vision tower (`TINY_VISION`) with its image processor, saved to `out`."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def draw_shape(colour: str, shape: str, variant: int) -> Image.Image:
    """A `colour` `shape` (one of `SHAPE_COLOURS`, `SHAPES`) on white, 32x32, its size and place moved a little
    by `variant`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(image)
    x, y, size = 4 + variant % 3 * 2, 4 + variant // 3 % 3 * 2, 20 + variant % 2 * 2
    box = (x, y, x + size, y + size)
    fill = SHAPE_COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":  # a ring: a filled disc differs from a filled square only in the corners
        draw.ellipse(box, outline=fill, width=6)
    else:
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=fill)
    return image


def text_pretrain(lm: Path, texts: list[str], steps: int = 120) -> None:
    """A few steps of language modelling on `texts`, so that the LM has predictions a projector can steer (a
    random tiny LM's are uniform: there the caption loss cannot fall whatever the image positions hold)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm)
    tok = AutoTokenizer.from_pretrained(lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = [texts[i] for i in torch.randint(len(texts), (16,), generator=generator)]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=48)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(lm)


def save_shapes_vlm(root: Path, corpus_file: str) -> Path:
    """A tiny VLM in `root / "vlm"`: a random CLIP vision tower, a linear projector and a tiny llama LM briefly
    pretrained on the first lines of `corpus_file` and the shape captions ("a red square")."""
    from itertools import product

    from seshu.multimodal.vlm import build_vlm

    clip = save_tiny_clip(root / "clip-vision")
    corpus = Path(corpus_file).read_text(encoding="utf-8").splitlines()[:200]
    corpus += [f"a {c} {s}" for c, s in product(SHAPE_COLOURS, SHAPES)]
    lm = save_tiny_model(root / "lm", corpus, arch="llama", context_length=128)
    text_pretrain(lm, corpus)
    build_vlm(str(clip), str(lm), root / "vlm")
    return root / "vlm"


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
