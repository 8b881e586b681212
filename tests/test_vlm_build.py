"""`seshu vlm build`: CLIP vision tower + projector + Seshu LM as transformers' own LLaVA, loaded back without
Seshu; image loading; the multimodal chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from helpers import TINY_VISION, TINY_VISION_PATCHES, save_tiny_clip, save_tiny_model, seshu
from PIL import Image, ImageDraw
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlavaForConditionalGeneration,
)

from seshu.errors import UserError
from seshu.multimodal.chat_template import multimodal_chat_template
from seshu.multimodal.images import load_image
from seshu.multimodal.language import fold_head_bias
from seshu.multimodal.vision import load_vision_config, load_vision_tower
from seshu.multimodal.vlm import BuiltVLM, build_vlm

PHOTO = SHARED_DATA / "images" / "extreme_ironing.jpg"
ARCHS = ("llama", "phi", "mixtral", "mamba")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# 32x32 images in 8x8 patches: 16 patch tokens, plus CLIP's class token.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8)  # fmt: skip
PATCHES = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm")


@pytest.fixture(scope="module")
def clip_dir(root: Path) -> Path:
    """A full random CLIP (vision and text towers), saved without an image processor."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(root / "clip")
    return root / "clip"


@pytest.fixture(scope="module")
def vision_tower_dir(root: Path) -> Path:
    """A random CLIP vision tower alone, with its image processor."""
    torch.manual_seed(1)
    out = root / "clip-vision"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def corpus(corpus_files: list[str]) -> list[str]:
    return Path(corpus_files[0]).read_text(encoding="utf-8").splitlines()[:200]


@pytest.fixture(scope="module")
def built(root: Path, clip_dir: Path, corpus: list[str]) -> dict[str, tuple[BuiltVLM, Path]]:
    """One linear-projector VLM per arch. Llama and Mamba LMs have tied embeddings: LLaVA ties the first and
    cannot tie the second."""
    result = {}
    for arch in ARCHS:
        lm = save_tiny_model(root / f"lm-{arch}", corpus, arch=arch, tied=arch in ("llama", "mamba"))
        out = root / f"vlm-{arch}"
        result[arch] = (build_vlm(str(clip_dir), str(lm), out), out)
    return result


def drawn_image() -> Image.Image:
    """A red square on a blue disc on white, drawn here so that no shared data is needed."""
    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 2, 40, 38), fill="blue")
    draw.rectangle((14, 12, 30, 28), fill="red")
    return image


def _images() -> list[pytest.param]:
    photo = pytest.mark.skipif(not PHOTO.is_file(), reason="shared data (extreme_ironing.jpg) absent")
    return [pytest.param("drawn", id="drawn"), pytest.param("photo", id="photo", marks=photo)]


def _image(kind: str) -> Image.Image:
    return drawn_image() if kind == "drawn" else load_image(PHOTO)


@pytest.mark.parametrize("kind", _images())
@pytest.mark.parametrize("arch", ARCHS)
def test_plain_transformers_reload_gives_the_same_logits(
    built: dict[str, tuple[BuiltVLM, Path]], arch: str, kind: str
) -> None:
    vlm, out = built[arch]
    prompt = "<image>\nWhat is in the picture?"
    before = vlm.processor(images=_image(kind), text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = vlm.model(**before).logits

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    after = processor(images=_image(kind), text=prompt, return_tensors="pt")
    assert torch.equal(after["input_ids"], before["input_ids"])
    assert torch.equal(after["pixel_values"], before["pixel_values"])
    with torch.no_grad():
        logits = model(**after).logits
    assert logits.shape == expected.shape
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
    assert int((after["input_ids"] == model.config.image_token_id).sum()) == PATCHES
    assert not [p.name for p in out.rglob("*") if p.suffix in PICKLES]


def test_text_only_logits_are_the_language_models(root: Path, built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    ids = torch.tensor([[1, 40, 41, 42, 77, 99]])
    for arch in ARCHS:
        lm = AutoModelForCausalLM.from_pretrained(root / f"lm-{arch}").eval()
        vlm = LlavaForConditionalGeneration.from_pretrained(built[arch][1]).eval()
        with torch.no_grad():
            expected, got = lm(input_ids=ids).logits, vlm(input_ids=ids).logits
        assert torch.allclose(got[..., : expected.shape[-1]], expected, atol=1e-5, rtol=0), arch
        assert built[arch][0].report.text_logits_error == 0.0


def test_mamba_gets_untied_embeddings(built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    config = json.loads((built["mamba"][1] / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    model = LlavaForConditionalGeneration.from_pretrained(built["mamba"][1])
    embeddings = model.get_input_embeddings().weight
    assert embeddings.data_ptr() != model.lm_head.weight.data_ptr()
    assert torch.equal(embeddings, model.lm_head.weight)


def test_new_tokens_start_at_the_mean_row(built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    vlm, _ = built["llama"]
    assert vlm.report.tokens_added == ["<image>", "<|im_start|>", "<|im_end|>"]
    rows = vlm.model.get_input_embeddings().weight
    known = vlm.report.image_token_id
    assert torch.allclose(rows[known:], rows[:known].mean(dim=0).expand(3, -1), atol=1e-6)


def test_linear_projector_is_exactly_one_linear_layer(built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    out = built["phi"][1]
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        w = weights.get_tensor("multi_modal_projector.linear_1.weight")
        b = weights.get_tensor("multi_modal_projector.linear_1.bias")
    projector = LlavaForConditionalGeneration.from_pretrained(out).model.multi_modal_projector
    x = torch.randn(3, 7, w.shape[1], generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        assert torch.equal(projector(x), F.linear(x, w, b))


def test_mlp_projector_and_full_features_from_a_vision_tower_folder(
    root: Path, vision_tower_dir: Path, built: dict[str, tuple[BuiltVLM, Path]]
) -> None:
    out = root / "vlm-mlp"
    report = build_vlm(
        str(vision_tower_dir), str(root / "lm-llama"), out, projector="mlp2x_gelu", feature_select="full",
        feature_layer=-1,
    ).report  # fmt: skip
    assert report.image_tokens == PATCHES + 1  # the class token is kept
    config = json.loads((out / "config.json").read_text())
    assert (config["projector_hidden_act"], config["vision_feature_layer"]) == ("gelu", -1)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=drawn_image(), text="<image> hi", return_tensors="pt")
    assert int((inputs["input_ids"] == report.image_token_id).sum()) == PATCHES + 1
    model = LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
        projector = model.model.multi_modal_projector
        x = torch.randn(2, 32)
        assert not torch.allclose(projector(x), projector.linear_1(x))  # not a single linear map


@pytest.mark.skipif(not PHOTO.is_file(), reason="shared data (extreme_ironing.jpg) absent")
def test_photo_expands_to_the_patch_count(built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    processor = AutoProcessor.from_pretrained(built["llama"][1])
    inputs = processor(images=load_image(PHOTO), text="<image>", return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (32, 32)
    assert inputs["input_ids"].tolist()[0].count(built["llama"][0].report.image_token_id) == PATCHES


def test_image_text_to_text_pipeline_runs(built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(built["llama"][1]))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": drawn_image()}, {"type": "text", "text": "Hi"}]}
    ]
    answer = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert answer[0]["generated_text"][-1]["role"] == "assistant"


def test_head_bias_of_a_phi_is_folded_exactly(root: Path, clip_dir: Path) -> None:
    lm = AutoModelForCausalLM.from_pretrained(root / "lm-phi")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        lm.lm_head.bias.copy_(torch.randn(lm.lm_head.bias.shape, generator=generator))
        lm.model.final_layernorm.bias.copy_(0.1 * torch.randn(64, generator=generator))
    lm.save_pretrained(root / "lm-phi-bias")
    AutoTokenizer.from_pretrained(root / "lm-phi").save_pretrained(root / "lm-phi-bias")
    build_vlm(str(clip_dir), str(root / "lm-phi-bias"), root / "vlm-phi-bias")
    ids = torch.randint(0, 300, (1, 24), generator=generator)
    with torch.no_grad():
        expected = lm.eval()(input_ids=ids).logits
        got = LlavaForConditionalGeneration.from_pretrained(root / "vlm-phi-bias")(input_ids=ids).logits
    assert (got[..., :300] - expected).norm() / expected.norm() < 1e-5


def test_fold_head_bias_is_exact_on_layer_norm_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    gain = 1 + 0.2 * torch.randn(16, generator=g, dtype=torch.float64)
    beta = 0.3 * torch.randn(16, generator=g, dtype=torch.float64)
    norm = torch.nn.LayerNorm(16, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(gain)
        norm.bias.copy_(beta)
        h = norm(torch.randn(9, 16, generator=g, dtype=torch.float64))
        folded = fold_head_bias(w, b, gain, beta)
        assert torch.allclose(h @ folded.T, h @ w.T + b, atol=1e-10)
    with pytest.raises(UserError, match="zero gain"):
        fold_head_bias(w, b, torch.zeros(16), beta)


def test_multimodal_chat_template(tiny_tokenizer_dir: Path) -> None:
    from jinja2.exceptions import TemplateError

    from seshu.chat import DEFAULT_CHAT_TEMPLATE

    template = multimodal_chat_template(DEFAULT_CHAT_TEMPLATE, "<image>")
    assert multimodal_chat_template(template, "<image>") == template
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    parts = [{"type": "text", "text": "What?"}, {"type": "image"}]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}, {"role": "assistant", "content": "A cat."}],
        chat_template=template, tokenize=False,
    )  # fmt: skip
    assert rendered == "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(TemplateError, match="not audio"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio"}]}], chat_template=template, tokenize=False
        )


# --------------------------------------------------------------------------------------------------
# The command line


def test_cli_builds_a_fresh_lm_from_a_preset(root: Path, clip_dir: Path, tiny_tokenizer_dir: Path) -> None:
    out = root / "cli-vlm"
    result = seshu("vlm", "build", "--vision", clip_dir, "--lm", "mamba:tiny", "--tokenizer", tiny_tokenizer_dir,
                   "--out", out, "--json")  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["lm_arch"], report["image_tokens"], report["projector"]) == ("mamba", PATCHES, "linear")
    card = (out / "README.md").read_text()
    assert "command: vlm build" in card and "LlavaForConditionalGeneration.from_pretrained" in card
    # Built again over its own earlier output: replaced, not refused.
    again = seshu("vlm", "build", "--vision", clip_dir, "--lm", "llama:tiny", "--tokenizer", tiny_tokenizer_dir,
                  "--out", out)  # fmt: skip
    assert again.code == 0 and "llama LM" in again.out
    assert LlavaForConditionalGeneration.from_pretrained(out).config.text_config.model_type == "llama"


def test_cli_builds_with_a_fresh_random_clip_preset(root: Path, tiny_tokenizer_dir: Path) -> None:
    out = root / "vlm-fresh-clip"
    result = seshu("vlm", "build", "--vision", "clip:tiny", "--lm", "llama:tiny", "--tokenizer", tiny_tokenizer_dir,
                   "--out", out, "--json")  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads(result.out)["image_tokens"] == TINY_VISION_PATCHES
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert {key: getattr(model.config.vision_config, key) for key in TINY_VISION} == TINY_VISION
    # Seeded with --seed (0): the very tower the tests' helper draws with torch.manual_seed(0).
    reference = CLIPVisionModel.from_pretrained(save_tiny_clip(root / "clip-seed-0")).state_dict()
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == reference.keys() and all(torch.equal(tower[k], reference[k]) for k in reference)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    inputs = processor(images=drawn_image(), text="<image>", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == TINY_VISION_PATCHES
    card = (out / "README.md").read_text()
    assert "random_vision_tower: true" in card and "CLIP vision tower with random weights (`clip:tiny`" in card


def test_clip_presets_and_an_existing_folder_of_that_name(
    root: Path, clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = load_vision_config("clip:small")
    assert (small.image_size, small.patch_size) == (224, 32)  # 49 positions per image
    seeded = [load_vision_tower("clip:tiny", seed=seed).model.state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])
    assert not torch.equal(seeded[0]["embeddings.patch_embedding.weight"],
                           seeded[2]["embeddings.patch_embedding.weight"])  # fmt: skip
    monkeypatch.chdir(clip_dir.parent)
    (clip_dir.parent / "clip:tiny").symlink_to(clip_dir)
    tower = load_vision_tower("clip:tiny")
    assert not tower.random and tower.config.num_hidden_layers == VISION["num_hidden_layers"]


def test_cli_bad_input_is_one_line(root: Path, clip_dir: Path, built: dict[str, tuple[BuiltVLM, Path]]) -> None:
    lm = str(root / "lm-llama")
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    cases = {
        "vision model folder not found": ("--vision", root / "nope", "--lm", lm),
        "not a CLIP": ("--vision", lm, "--lm", lm),
        "model directory not found": ("--vision", clip_dir, "--lm", root / "nope"),
        "'gpt2' model": ("--vision", clip_dir, "--lm", gpt2),
        "--tokenizer": ("--vision", clip_dir, "--lm", "llama:tiny"),
        "unknown preset": ("--vision", clip_dir, "--lm", "llama:huge", "--tokenizer", lm),
        "unknown CLIP preset 'huge'; choose one of: tiny, small": ("--vision", "clip:huge", "--lm", lm),
        "unknown projector": ("--vision", clip_dir, "--lm", lm, "--projector", "qformer"),
        "--feature-layer 9": ("--vision", clip_dir, "--lm", lm, "--feature-layer", 9),
    }
    for expected, args in cases.items():
        error = seshu("vlm", "build", *args, "--out", root / "bad").error
        assert expected in error, (expected, error)
    assert not (root / "bad").exists()
    assert "is the input" in seshu("vlm", "build", "--vision", clip_dir, "--lm", lm, "--out", lm).error
    assert "not a VLM" in seshu("vlm", "build", "--vision", clip_dir, "--lm", lm, "--out", root / "gpt2").error


# --------------------------------------------------------------------------------------------------
# Images


def test_load_image_gives_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 4), 128).save(path)
    image = load_image(path)
    assert (image.mode, image.size) == ("RGB", (5, 4))


def test_load_image_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    drawn = tmp_path / "drawn.png"
    drawn_image().save(drawn)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(drawn.read_bytes()[:60])
    with pytest.raises(UserError, match="image file not found"):
        load_image(tmp_path / "missing.png")
    for bad in (text, truncated):
        with pytest.raises(UserError, match="not a readable image"):
            load_image(bad)
