"""`seshu eval generate --task caption`: a tiny VLM of `seshu vlm build` captions drawn shapes from COCO and LLaVA
records, once per image, scored with chrF/BLEU against every caption and by the captions' answer-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from helpers import TINY_VISION_PATCHES, draw_shape, save_tiny_clip, save_tiny_model, seshu
from transformers import LlavaForConditionalGeneration

from seshu.evaluate.tasks import translation_scores
from seshu.multimodal.config import DEFAULT_PROMPT
from seshu.multimodal.loading import load_vlm
from seshu.multimodal.pretrain_projector import caption_row
from seshu.multimodal.records import CaptionRecord
from seshu.multimodal.rows import MediaCollator
from seshu.multimodal.vlm import build_vlm

PAIRS = [("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"), ("red", "circle")]
QUICK = ("--max-new-tokens", 6, "--device", "cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-eval")


@pytest.fixture(scope="module")
def lm(root: Path, corpus_files: list[str]) -> Path:
    corpus = Path(corpus_files[0]).read_text(encoding="utf-8").splitlines()[:200]
    corpus += [f"a {colour} {shape}" for colour, shape in PAIRS]
    return save_tiny_model(root / "lm", corpus, arch="llama", context_length=128)


@pytest.fixture(scope="module")
def vlm(root: Path, lm: Path) -> Path:
    """A tiny VLM: a random CLIP tower (16 positions per image) and a random tiny llama, linear projector."""
    build_vlm(str(save_tiny_clip(root / "clip")), str(lm), root / "vlm")
    return root / "vlm"


@pytest.fixture(scope="module")
def shapes(root: Path) -> Path:
    """Drawn shapes in images/, a COCO file with two captions per image (the second ones after all the first
    ones, as COCO orders annotations by id, not image) and LLaVA records asking different questions."""
    folder = root / "shapes"
    (folder / "images").mkdir(parents=True)
    questions = ["What is this?", "Describe the picture in a few words, please.", "Colour?"]
    images, llava = [], []
    for n, (colour, shape) in enumerate(PAIRS):
        draw_shape(colour, shape, n).save(folder / "images" / f"{n}.png")
        images.append({"id": 100 + n, "file_name": f"{n}.png"})
        turns = [
            {"from": "human", "value": f"<image>\n{questions[n % 3]}"},
            {"from": "gpt", "value": f"a {colour} {shape}"},
        ]
        llava.append({"image": f"images/{n}.png", "conversations": turns})
    annotations = [
        {"id": i, "image_id": 100 + i % 5, "caption": f"a {c} {s}" if i < 5 else f"{c} {s} on white"}
        for i, (c, s) in enumerate(PAIRS * 2)
    ]
    (folder / "images" / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (folder / "llava.json").write_text(json.dumps(llava))
    return folder


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_coco_captions_generate_once_per_image_and_score_against_every_caption(
    vlm: Path, shapes: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated = []
    generate = LlavaForConditionalGeneration.generate

    def counting(self: LlavaForConditionalGeneration, *args: object, **kwargs: torch.Tensor) -> torch.Tensor:
        generated.append(int(kwargs["input_ids"].shape[0]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counting)
    out = root / "coco-rows.jsonl"
    outcome = seshu("eval", "generate", "--model", vlm, "--task", "caption", "--data", shapes / "images" / "coco.json",
                    "--out", out, "--batch-size", 2, "--json", *QUICK)  # fmt: skip
    assert outcome.code == 0, outcome.err
    report = json.loads(outcome.out)
    assert report["task"] == "caption" and report["records"] == 5
    assert set(report["scores"]) == {"chrf", "bleu", "loss", "perplexity", "answer_tokens"}
    assert sum(generated) == 5 and max(generated) == 2  # each image once, in batches of two

    written = rows(out)
    assert [r["references"] for r in written] == [[f"a {c} {s}", f"{c} {s} on white"] for c, s in PAIRS]
    assert [r["images"] for r in written] == [[str(shapes / "images" / f"{n}.png")] for n in range(5)]
    assert all(r["prompt"] == f"<|im_start|>user\n{DEFAULT_PROMPT}<|im_end|>\n<|im_start|>assistant\n" for r in written)
    # The scores are sacrebleu's multi-reference ones over the written predictions.
    expected = translation_scores([r["prediction"] for r in written], [r["references"] for r in written])
    assert report["scores"]["chrf"] == pytest.approx(expected["chrf"])
    assert report["scores"]["bleu"] == pytest.approx(expected["bleu"])

    # The loss is transformers' own mean loss over the ten captions' rows (the projector pretraining's).
    model, processor = load_vlm(str(vlm))
    tok = processor.tokenizer
    captions = [CaptionRecord(f"{n}", DEFAULT_PROMPT, ref, tuple(r["images"]))
                for n, r in enumerate(written) for ref in r["references"]]  # fmt: skip
    batch = MediaCollator(processor, tok.pad_token_id)(
        [caption_row(tok, c, model.config.image_token_id, TINY_VISION_PATCHES, 128) for c in captions]
    )
    with torch.no_grad():
        loss = float(model.eval()(**batch).loss)
    assert report["scores"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert report["scores"]["answer_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert report["scores"]["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)


def test_each_answer_is_seshu_generate_s_greedy_answer_for_its_image(vlm: Path, shapes: Path, root: Path) -> None:
    out = root / "batched.jsonl"
    data = shapes / "images" / "coco.json"
    outcome = seshu("eval", "generate", "--model", vlm, "--task", "caption", "--data", data, "--batch-size", 5,
                    "--out", out, *QUICK)  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert "caption, 5 records" in outcome.out
    for name in ("chrf", "bleu", "loss", "perplexity", "answer_tokens"):
        assert name in outcome.out
    written = rows(out)
    # The image matters even to this random VLM, so a batch that paired a prompt with another image would show.
    assert len({r["prediction"] for r in written}) > 1
    instruction = DEFAULT_PROMPT.removeprefix("<image>\n")
    for row in written:
        talk = seshu("generate", "--model", vlm, "--prompt", instruction, "--image", row["images"][0],
                     "--temperature", 0, "--repetition-penalty", 1, *QUICK)  # fmt: skip
        assert talk.code == 0, talk.err
        assert row["prediction"] == talk.out.strip()


def test_left_padded_batches_answer_as_one_prompt_at_a_time(vlm: Path, shapes: Path, root: Path) -> None:
    answers = []
    for batch_size in (1, 5):
        out = root / f"llava-{batch_size}.jsonl"
        outcome = seshu("eval", "generate", "--model", vlm, "--task", "caption", "--data", shapes / "llava.json",
                        "--batch-size", batch_size, "--out", out, "--json", *QUICK)  # fmt: skip
        assert outcome.code == 0, outcome.err
        answers.append([(r["prompt"], r["prediction"], r["references"]) for r in rows(out)])
        assert json.loads(outcome.out)["records"] == 5
    assert answers[0] == answers[1]
    assert len({prompt for prompt, _, _ in answers[0]}) == 3  # three questions, so three prompt lengths
    assert [refs for _, _, refs in answers[0]] == [[f"a {c} {s}"] for c, s in PAIRS]


def test_bad_input_is_one_line(vlm: Path, lm: Path, shapes: Path, root: Path) -> None:
    coco = shapes / "images" / "coco.json"

    def error(*args: object) -> str:
        return seshu("eval", "generate", *args, *QUICK).error

    assert "is a text-only model; --task caption is for image records" in error(
        "--model", lm, "--task", "caption", "--data", coco
    )
    assert "is a text-only model; --image-folder is for image records" in error(
        "--model", lm, "--task", "translation", "--data", coco, "--image-folder", shapes
    )
    assert "is a VLM; evaluate it on image records with --task caption" in error(
        "--model", vlm, "--task", "translation", "--data", coco
    )
    assert "--target-lang is for text models" in error(
        "--model", vlm, "--task", "caption", "--data", coco, "--target-lang", "Hindi"
    )
    assert f"{root / 'nowhere'}: image folder not found (--image-folder)" in error(
        "--model", vlm, "--task", "caption", "--data", coco, "--image-folder", root / "nowhere"
    )
    assert "--prompt must hold <image> once" in error(
        "--model", vlm, "--task", "caption", "--data", coco, "--prompt", "Caption it."
    )
    # An image file that is not there, and a prompt whose <image> count is not its images': named by record.
    broken = json.loads(coco.read_text())
    broken["images"][2]["file_name"] = "gone.png"
    (shapes / "images" / "broken.json").write_text(json.dumps(broken))
    assert "broken.json, annotation 3: image file not found" in error(
        "--model", vlm, "--task", "caption", "--data", shapes / "images" / "broken.json"
    )
    twice = json.loads((shapes / "llava.json").read_text())
    twice[1]["conversations"][0]["value"] = "<image><image>\nWhat is this?"
    (shapes / "twice.json").write_text(json.dumps(twice))
    assert "twice.json, record 2: 2 <image> in the prompt but 1 image" in error(
        "--model", vlm, "--task", "caption", "--data", shapes / "twice.json"
    )


def test_llava_s_coco_eval_captions_without_their_images(vlm: Path, root: Path) -> None:
    # LLaVA's caps_boxes file: 80 COCO val2014 images with five captions each; the images are not shipped with it.
    caps = SHARED_DATA / "images" / "llava_caps_boxes_coco2014_val_80.jsonl"
    if not caps.is_file():
        pytest.skip(f"{caps} is not here")
    message = seshu("eval", "generate", "--model", vlm, "--task", "caption", "--data", caps, *QUICK).error
    assert f"{caps}, record 1" in message, message
