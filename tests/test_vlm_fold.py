"""`seshu adapters fold` on a VLM: an adapter from visual instruction tuning (LoRA on the LM, the projector trained
whole as `modules_to_save`, the chat tokens' rows trained, the processor shipped along) folds into a LLaVA folder
that plain transformers loads, whose logits equal base + adapter on text and on an image; the loader applies it
unmerged with the adapter's processor; adapters for the other kind of model, or with a projector of another
shape, are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import draw_shape, save_tiny_clip, save_tiny_model, seshu
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from seshu.hub.card import read_card_metadata, usage_snippet
from seshu.merge.adapters import ADAPTER_WEIGHTS, load_with_adapter
from seshu.merge.fold import FoldMismatchError, fold_adapter
from seshu.multimodal.vlm import build_vlm

CORPUS = ["the cat sat on the mat.", "a red square and a blue circle.", "what is in the picture?"] * 8
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NOT_THE_LM = ".*(vision_tower|multi_modal_projector).*"
PROJECTOR_WEIGHT = "base_model.model.model.multi_modal_projector.linear_1.weight"
TUNED = "{# tuned #}"  # marks the adapter's chat template, so the output shows whose processor it holds
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vlm-fold")


@pytest.fixture(scope="module")
def lm(root: Path) -> Path:
    return save_tiny_model(root / "lm", CORPUS, arch="llama")


@pytest.fixture(scope="module")
def vlm(root: Path, lm: Path) -> Path:
    build_vlm(str(save_tiny_clip(root / "clip")), str(lm), root / "vlm")
    return root / "vlm"


def perturb(model: torch.nn.Module) -> None:
    """LoRA starts as a no-op (B = 0) and the trained copies start as the base's: seeded noise on both makes the
    adapter move the logits, through the LM and through the projector."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("lora_B", "modules_to_save", "trainable_tokens_delta")):
                param.add_(torch.randn_like(param) * 0.5)


@pytest.fixture(scope="module")
def adapter(root: Path, vlm: Path) -> Path:
    """What visual instruction tuning saves: LoRA on the LM alone, the projector as `modules_to_save`, the chat
    tokens' rows, and the processor with a chat template of its own."""
    processor = LlavaProcessor.from_pretrained(vlm)
    chat_ids = processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=LM_TARGETS, exclude_modules=NOT_THE_LM, task_type="CAUSAL_LM",
        modules_to_save=["multi_modal_projector"], trainable_token_indices=chat_ids,
    )  # fmt: skip
    peft_model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(vlm), config)
    perturb(peft_model)
    out = root / "adapter"
    peft_model.save_pretrained(out)
    processor.chat_template = processor.tokenizer.chat_template = processor.chat_template + TUNED
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folded(root: Path, vlm: Path, adapter: Path) -> tuple[Path, dict]:
    out = root / "folded"
    outcome = seshu("adapters", "fold", "--base", vlm, "--adapter", adapter, "--out", out, "--dtype", "float32",
                    "--json")  # fmt: skip
    assert outcome.code == 0, outcome.err
    return out, json.loads(outcome.out)


def image_inputs(processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """A chat turn with an image, as `seshu generate --image` lays it out."""
    messages = [{"role": "user", "content": "<image>\nwhat is in the picture?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=prompt, images=[draw_shape("red", "square", 0)], return_tensors="pt"))


def text_inputs(processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    return dict(processor(text="<|im_start|>user\nthe cat sat<|im_end|>", return_tensors="pt"))


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_fold_equals_base_plus_adapter_on_text_and_on_an_image(
    vlm: Path, adapter: Path, folded: tuple[Path, dict]
) -> None:
    out, report = folded
    processor = LlavaProcessor.from_pretrained(vlm)
    base = LlavaForConditionalGeneration.from_pretrained(vlm)
    reference = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(vlm), str(adapter))
    plain = LlavaForConditionalGeneration.from_pretrained(out)
    for inputs in (text_inputs(processor), image_inputs(processor)):
        expected = logits(reference, inputs)
        torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-4, rtol=1e-4)
        assert (logits(base, inputs) - expected).abs().max() > 0.1  # the adapter matters on both inputs
    # The trained projector is the one folded in, and the check ran an image through it.
    trained = load_file(str(adapter / ADAPTER_WEIGHTS))[PROJECTOR_WEIGHT]
    torch.testing.assert_close(plain.model.multi_modal_projector.linear_1.weight, trained)
    assert report["images"] == 1 and report["max_abs_diff"] < 1e-4 and report["adapter_effect"] > 0.01


def test_the_fold_is_a_plain_llava_folder_that_generates(adapter: Path, folded: tuple[Path, dict]) -> None:
    out, _ = folded
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith(PICKLES)] and "adapter_config.json" not in names
    assert not any("lora" in key or "modules_to_save" in key for key in load_file(str(out / "model.safetensors")))
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor) and processor.chat_template.endswith(TUNED)  # the adapter's
    model = LlavaForConditionalGeneration.from_pretrained(out)
    inputs = image_inputs(processor)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = read_card_metadata(out / "README.md")
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["seshu"]["adapter"]["modules_to_save"]
    assert usage_snippet(vision=True) in card and "1 with an image" in card


def test_the_loader_applies_the_adapter_unmerged_with_its_processor(
    vlm: Path, adapter: Path, folded: tuple[Path, dict]
) -> None:
    loaded = load_with_adapter(str(vlm), adapter, device="cpu")
    assert loaded.processor is not None and loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.processor.chat_template.endswith(TUNED)
    inputs = image_inputs(loaded.processor)
    plain = LlavaForConditionalGeneration.from_pretrained(folded[0])
    unmerged = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(unmerged, plain.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_bfloat16_fold_of_a_vlm_passes_its_check(root: Path, vlm: Path, adapter: Path) -> None:
    outcome = seshu("adapters", "fold", "--base", vlm, "--adapter", adapter, "--out", root / "bf16", "--json")
    assert outcome.code == 0, outcome.err
    report = json.loads(outcome.out)
    assert report["dtype"] == "bfloat16" and report["images"] == 1
    assert report["position_error_p90"] <= report["tolerance"]
    weights = load_file(str(root / "bf16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_the_check_catches_a_projector_left_out_of_the_fold(
    root: Path, vlm: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text inputs never reach the projector; with many of them the image input's positions are under a tenth of
    all, so only judging those apart sees a fold that kept the base's projector."""
    base_projector = LlavaForConditionalGeneration.from_pretrained(vlm).model.multi_modal_projector.state_dict()
    merge = LoraModel.merge_and_unload

    def keep_base_projector(self: LoraModel, *args: object, **kwargs: object) -> torch.nn.Module:
        model = merge(self, *args, **kwargs)
        model.model.multi_modal_projector.load_state_dict(base_projector)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", keep_base_projector)
    texts = [f"the cat sat on mat number {n}." for n in range(40)]
    with pytest.raises(FoldMismatchError, match="does not reproduce"):
        fold_adapter(str(vlm), str(adapter), root / "lost", dtype="float32", check_prompts=texts)
    assert not (root / "lost").exists()


# --- errors ---------------------------------------------------------------------------------------------------


def test_a_text_model_adapter_on_a_vlm_and_the_reverse_are_one_line(
    root: Path, lm: Path, vlm: Path, adapter: Path
) -> None:
    text_adapter = root / "text-adapter"
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(lm), config).save_pretrained(text_adapter)
    out = root / "never"
    error = seshu("adapters", "fold", "--base", vlm, "--adapter", text_adapter, "--out", out).error
    assert "trained on a text model" in error and f"{vlm} is a VLM" in error
    error = seshu("adapters", "fold", "--base", lm, "--adapter", adapter, "--out", out).error
    assert "trained on a VLM" in error and f"{lm} is a text model" in error
    assert not out.exists()


def test_a_projector_of_another_shape_is_one_line(root: Path, vlm: Path, adapter: Path) -> None:
    bad = root / "bad-projector"
    shutil.copytree(adapter, bad)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    rows, columns = tensors[PROJECTOR_WEIGHT].shape
    tensors[PROJECTOR_WEIGHT] = torch.zeros(rows, columns * 2)  # a projector for a wider vision tower
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    out = root / "never"
    error = seshu("adapters", "fold", "--base", vlm, "--adapter", bad, "--out", out).error
    assert PROJECTOR_WEIGHT in error and f"[{rows}, {columns * 2}]" in error and f"[{rows}, {columns}]" in error
    assert not out.exists()
