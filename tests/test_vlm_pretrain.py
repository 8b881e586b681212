"""`seshu vlm pretrain-projector`: image-caption records (LLaVA and COCO), caption-only labels, everything frozen
but the projector, and the synthetic-shapes check that the caption loss goes down."""

from __future__ import annotations

import json
import re
import runpy
from itertools import product
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    SHAPE_COLOURS,
    SHAPES,
    TINY_VISION_PATCHES,
    draw_shape,
    save_shapes_vlm,
    seshu,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
)

from seshu import assets
from seshu.config import load_recipe
from seshu.data.instructions import IGNORE_INDEX
from seshu.errors import UserError
from seshu.multimodal.config import DEFAULT_PROMPT, CaptionSource, VLMPretrainRecipe
from seshu.multimodal.loading import load_vlm
from seshu.multimodal.pretrain_projector import caption_row, plain_caption_row
from seshu.multimodal.records import CaptionRecord, read_caption_records
from seshu.multimodal.rows import MediaCollator

PATCHES = TINY_VISION_PATCHES
COLOURS = SHAPE_COLOURS
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PROJECTOR = "multi_modal_projector."  # the tensor names in the saved file (transformers' LLaVA layout)
SHAPES_ASSETS = Path(assets.resolve("seshu:multimodal/shapes"))
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shapes_assets.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-pretrain")


@pytest.fixture(scope="module")
def vlm_dir(root: Path, corpus_files: list[str]) -> Path:
    """A tiny VLM: a random CLIP vision tower and a tiny llama LM, linear projector."""
    return save_shapes_vlm(root, corpus_files[0])


@pytest.fixture(scope="module")
def shapes(root: Path) -> Path:
    """Drawn shapes with LLaVA records for training (4 variants of each of the 12 colour-shape pairs) and COCO
    captions for validation (one more variant of each)."""
    folder = root / "shapes"
    (folder / "images").mkdir(parents=True)
    train, images, annotations = [], [], []
    for n, ((colour, shape), variant) in enumerate(product(product(COLOURS, SHAPES), range(5))):
        name = f"images/{n:03d}.png"
        draw_shape(colour, shape, variant).save(folder / name)
        if variant < 4:
            human = "<image>\nWhat is this?" if n % 2 else "Describe the picture.\n<image>"
            train.append({"id": n, "image": name, "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": f"a {colour} {shape}"}]})  # fmt: skip
        else:
            images.append({"id": n, "file_name": name})
            annotations.append({"id": n, "image_id": n, "caption": f"a {colour} {shape}"})
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "validation.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder


def write_recipe(root: Path, name: str, vlm: Path, data: dict, **train: object) -> Path:
    recipe = {
        "model": {"init_from": str(vlm)},
        "data": data,
        "train": {
            "seq_len": 64,
            "batch_size": 8,
            "max_steps": 40,
            "lr": 1e-2,
            "warmup_steps": 0,
            "scheduler": "constant_with_warmup",
            "eval_every": 20,
            "save_every": 20,
            "log_every": 5,
            **train,
        },
        "output_dir": str(root / name),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def caption_loss(model: LlavaForConditionalGeneration, records: list[CaptionRecord], vlm: Path) -> float:
    """Mean caption-only loss of `records` under `model` (one batch)."""
    _, processor = load_vlm(str(vlm))
    tok = processor.tokenizer
    rows = [caption_row(tok, r, model.config.image_token_id, PATCHES, 64) for r in records]
    batch = MediaCollator(processor, tok.pad_token_id)([r for r in rows if r is not None])
    with torch.no_grad():
        return float(model.eval()(**batch).loss)


def test_projector_pretraining_trains_the_projector_alone_and_lowers_the_caption_loss(
    root: Path, vlm_dir: Path, shapes: Path
) -> None:
    data = {"train": str(shapes / "train.json"), "validation": str(shapes / "validation.json")}
    config = write_recipe(root, "run", vlm_dir, data)
    outcome = seshu("vlm", "pretrain-projector", "--config", config)
    assert outcome.code == 0, outcome.err + outcome.out
    out = root / "run"
    assert "48 image-caption records, 12 for validation" in outcome.out

    before, after = load_file(vlm_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith(PROJECTOR)]
    assert len(frozen) > 20 and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not any(torch.equal(before[k], after[k]) for k in before if k.startswith(PROJECTOR))

    # Plain transformers loads the result; its held-out caption loss is below the untrained projector's.
    model = LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    held_out = list(read_caption_records(CaptionSource(path=str(shapes / "validation.json")), DEFAULT_PROMPT))
    loss_before = caption_loss(LlavaForConditionalGeneration.from_pretrained(vlm_dir), held_out, vlm_dir)
    loss_after = caption_loss(model, held_out, vlm_dir)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in history if "loss" in e]
    assert train_losses[-1] < train_losses[0]

    # Not asserted (projector-only training need not make the image matter): the loss with each held-out image
    # against its caption vs with another shape's image, for the record.
    mismatched = [CaptionRecord(r.where, r.prompt, r.caption, held_out[(i + 1) % len(held_out)].images)
                  for i, r in enumerate(held_out)]  # fmt: skip
    print(f"caption loss: untrained {loss_before:.4f}, trained {loss_after:.4f}; "
          f"mismatched images {caption_loss(model, mismatched, vlm_dir):.4f}")  # fmt: skip

    assert not [p.name for p in out.glob("*") if p.suffix in PICKLES]
    card = (out / "README.md").read_text()
    assert "command: vlm pretrain-projector" in card and "image-text-to-text" in card


def test_labels_cover_the_caption_only(vlm_dir: Path, shapes: Path) -> None:
    _, processor = load_vlm(str(vlm_dir))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    record = next(read_caption_records(CaptionSource(path=str(shapes / "train.json")), ""))
    row = caption_row(tok, record, image_id, PATCHES, 64)
    assert row is not None and row["input_ids"].count(image_id) == PATCHES
    learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.decode(learned).startswith("a red square")
    assert all(label == IGNORE_INDEX for t, label in zip(row["input_ids"], row["labels"], strict=True) if t == image_id)
    with pytest.raises(UserError, match=r"train\.seq_len: 12 tokens cannot hold .*record 1"):
        caption_row(tok, record, image_id, PATCHES, 12)


def test_both_record_formats_are_read(shapes: Path) -> None:
    llava = list(read_caption_records(CaptionSource(path=str(shapes / "train.json")), "unused"))
    coco = list(read_caption_records(CaptionSource(path=str(shapes / "validation.json")), "<image>\nCaption?"))
    assert len(llava) == 48 and len(coco) == 12
    assert llava[1].prompt == "<image>\nWhat is this?" and llava[1].caption == "a red square"
    assert coco[0].prompt == "<image>\nCaption?" and coco[0].images == (str(shapes / "images" / "004.png"),)


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({"image": "images/000.png", "conversations": [{"from": "human", "value": "<image><image>\nHi"},
                                                       {"from": "gpt", "value": "a"}]},
         r"bad\.json, record 1: 2 <image> in the prompt but 1 image"),
        ({"image": "images/nope.png", "conversations": [{"from": "human", "value": "<image>"},
                                                        {"from": "gpt", "value": "a"}]},
         r"bad\.json, record 1: image file not found: .*nope\.png"),
        ({"image": "images/000.png", "conversations": [{"from": "human", "value": "<image>"}]},
         r"bad\.json, record 1: no 'gpt' turn"),
    ],
)  # fmt: skip
def test_a_bad_record_is_one_error_naming_it(root: Path, vlm_dir: Path, shapes: Path, record: dict, error: str) -> None:
    (shapes / "bad.json").write_text(json.dumps([record]))
    config = write_recipe(root, "bad", vlm_dir, {"train": str(shapes / "bad.json"), "validation": 0.5})
    outcome = seshu("vlm", "pretrain-projector", "--config", config)
    assert re.search(error, outcome.error), outcome.error
    assert not (root / "bad").exists()


def test_a_corrupt_image_is_one_error_naming_its_record(root: Path, vlm_dir: Path, shapes: Path) -> None:
    (shapes / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [{"image": "images/corrupt.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                 {"from": "gpt", "value": "a"}]}] * 2  # fmt: skip
    (shapes / "corrupt.json").write_text(json.dumps(records))
    data = {"train": str(shapes / "corrupt.json"), "validation": str(shapes / "corrupt.json")}
    outcome = seshu("vlm", "pretrain-projector", "--config", write_recipe(root, "corrupt", vlm_dir, data))
    assert "corrupt.json, record 1" in outcome.error and "not a readable image" in outcome.error


def test_recipe_errors(root: Path, vlm_dir: Path) -> None:
    path = write_recipe(root, "r", vlm_dir, {"train": "x.json", "prompt": "no image here"})
    with pytest.raises(UserError, match=r"'data\.prompt': .*<image> exactly once"):
        load_recipe(VLMPretrainRecipe, path)
    lm = root / "lm"
    config = write_recipe(root, "not-vlm", lm, {"train": "x.json"})
    assert "not a VLM; make one with `seshu vlm build`" in seshu("vlm", "pretrain-projector", "-c", config).error


# --------------------------------------------------------------------------------------------------
# LLaVA's plain layout, bundled shapes, bf16 VLMs


def test_plain_rows_are_the_images_then_the_caption(vlm_dir: Path) -> None:
    _, processor = load_vlm(str(vlm_dir))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    record = CaptionRecord("r.json, record 1", "Describe it.\n<image>", "a red square", ("a.png",))
    row = plain_caption_row(tok, record, image_id, PATCHES, 64)
    assert row is not None and row["images"] == ["a.png"]
    caption = tok("a red square\n", add_special_tokens=False)["input_ids"]
    # No chat template, role or prompt: the tokenizer's own special tokens, the image positions, the caption.
    start = row["input_ids"].index(image_id)
    assert row["input_ids"][start:] == [image_id] * PATCHES + caption
    assert row["labels"] == [IGNORE_INDEX] * (start + PATCHES) + caption
    assert plain_caption_row(tok, record, image_id, PATCHES, start + PATCHES) is None  # no caption token fits
    with pytest.raises(UserError, match=r"train\.seq_len: 8 tokens cannot hold r\.json, record 1"):
        plain_caption_row(tok, record, image_id, PATCHES, 8)


def test_bundled_shapes_are_what_their_script_makes(tmp_path: Path) -> None:
    runpy.run_path(str(SCRIPT))["main"](tmp_path)
    bundled = sorted(p.relative_to(SHAPES_ASSETS) for p in SHAPES_ASSETS.rglob("*") if p.is_file())
    assert bundled == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len([p for p in bundled if p.suffix == ".png"]) == len(COLOURS) * len(SHAPES) * 3
    assert sum((SHAPES_ASSETS / p).stat().st_size for p in bundled) < 60_000
    for name in bundled:
        if name.suffix == ".json":
            assert (SHAPES_ASSETS / name).read_bytes() == (tmp_path / name).read_bytes(), name
        else:  # the pixels, not the bytes: another zlib compresses the same image differently
            with Image.open(SHAPES_ASSETS / name) as ours, Image.open(tmp_path / name) as made:
                assert ours.tobytes() == made.tobytes() and ours.size == (32, 32), name
    captions = json.loads((SHAPES_ASSETS / "captions.json").read_text())
    assert captions[0]["conversations"][1] == {"from": "gpt", "value": "a red square"}
    instruct = json.loads((SHAPES_ASSETS / "instruct.json").read_text())
    assert {"from": "gpt", "value": "Red."} in instruct[0]["conversations"]


def test_packaged_caption_paths_resolve() -> None:
    source = CaptionSource(path="seshu:multimodal/shapes/captions.json", image_folder="seshu:multimodal/shapes")
    assert (source.path, source.image_folder) == (str(SHAPES_ASSETS / "captions.json"), str(SHAPES_ASSETS))
    records = list(read_caption_records(source, DEFAULT_PROMPT))
    assert len(records) == 36 and records[0].images == (str(SHAPES_ASSETS / "images" / "red-square-0.png"),)


def test_a_bf16_vlm_stays_bf16_with_a_float32_trained_projector(root: Path, vlm_dir: Path) -> None:
    """The bundled shapes, LLaVA's plain layout and a bf16 VLM (as `seshu vlm build --dtype bfloat16` writes):
    the frozen tensors come out bit for bit, the projector trained and rounded to bf16, checkpoints in float32."""
    bf16 = root / "vlm-bf16"
    LlavaForConditionalGeneration.from_pretrained(vlm_dir).to(torch.bfloat16).save_pretrained(bf16)
    AutoProcessor.from_pretrained(vlm_dir).save_pretrained(bf16)
    data = {"train": "seshu:multimodal/shapes/captions.json", "validation": 0.25, "template": "plain"}
    config = write_recipe(root, "run-bf16", bf16, data, max_steps=10, eval_every=5, save_every=5)
    outcome = seshu("vlm", "pretrain-projector", "--config", config)
    assert outcome.code == 0, outcome.err + outcome.out
    assert "in float32 (vision tower and LM frozen, bfloat16)" in outcome.out
    out = root / "run-bf16"

    before, after = load_file(bf16 / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and {t.dtype for t in after.values()} == {torch.bfloat16}
    frozen = [k for k in before if not k.startswith(PROJECTOR)]
    assert len(frozen) > 20 and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not any(torch.equal(before[k], after[k]) for k in before if k.startswith(PROJECTOR))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    checkpoint = load_file(out / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert {t.dtype for k, t in checkpoint.items() if k.startswith(PROJECTOR)} == {torch.float32}
    # The published projector is the checkpoint's float32 master weights, rounded.
    assert all(torch.equal(checkpoint[k].to(torch.bfloat16), after[k]) for k in after if k.startswith(PROJECTOR))
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in history if "eval_loss" in e]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert LlavaForConditionalGeneration.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
