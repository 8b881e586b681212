"""`seshu vlm build`: a LLaVA-style vision-language model from a CLIP vision tower, a projector and any Seshu
language model, saved as transformers' own `LlavaForConditionalGeneration` with a `LlavaProcessor`, so
`LlavaForConditionalGeneration.from_pretrained`, `AutoProcessor.from_pretrained` and the image-text-to-text
pipeline load it without Seshu.

The processor is the vision model's image processor and the LM's tokenizer with `<image>` added (and, for an LM
without a chat template, Seshu's ChatML template and tokens, so the VLM is ready for visual instruction tuning
without growing its vocabulary again). New token rows start at the mean of the existing ones
(`add_mean_token_rows`). One `<image>` in a prompt expands to as many positions as the vision tower gives
features: (image size / patch size)^2 patches, plus CLIP's class token with `feature_select="full"`.

The language model is moved into the LLaVA model as it is, so its text-only logits must not move: the build
checks that on a few inputs before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from seshu.chat import ensure_chat_template
from seshu.errors import UserError
from seshu.hub.card import check_replaceable_output, describe_model, render_card, usage_snippet
from seshu.io import staged_dir
from seshu.merge.fold import DEFAULT_CHECK_TEXTS, TOLERANCES, check_inputs, compare_logits, model_logits
from seshu.models.chat_ready import add_mean_token_rows
from seshu.models.loading import DTYPES
from seshu.models.registry import count_parameters
from seshu.multimodal.chat_template import multimodal_chat_template
from seshu.multimodal.language import check_language_model, fit_for_llava, load_language_model
from seshu.multimodal.projector import ProjectorSpec, get_projector, init_projector
from seshu.multimodal.vision import (
    CLIP_EXTRA_TOKENS,
    FEATURE_SELECT,
    FeatureSelect,
    VisionTower,
    image_token_count,
    load_vision_config,
    load_vision_tower,
)

CARD_COMMAND = "vlm build"
IMAGE_TOKEN = "<image>"

# LLaVA's choice: the features of the vision tower's second-to-last layer. CLIP's last layer is trained only to
# line its class token up with a caption, so its patch features are the most specialised to that objective;
# the layer before keeps more local detail, which LLaVA found to answer visual questions better (its paper,
# section 5.2: +0.96% on ScienceQA over the last layer).
DEFAULT_FEATURE_LAYER = -2


class VLMAssemblyError(RuntimeError):
    """The assembled model does not compute what its language model did: a bug, not bad input (exit 1)."""


@dataclass(frozen=True)
class VLMReport:
    vision: str
    lm: str
    lm_arch: str
    projector: str
    feature_layer: int
    feature_select: str
    image_tokens: int  # `<image>` positions per image
    image_token_id: int
    tokens_added: list[str]
    parameters: int
    projector_parameters: int
    dtype: str
    text_logits_error: float  # text-only logits of the VLM vs the LM: 90th percentile relative error

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BuiltVLM:
    """What `build_vlm` wrote, still in memory: the model and processor as saved, and the figures."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    report: VLMReport


def build_vlm(
    vision: str,
    lm: str,
    out: str | Path,
    *,
    projector: str = "linear",
    feature_layer: int = DEFAULT_FEATURE_LAYER,
    feature_select: str = "default",
    tokenizer: str | None = None,
    dtype: str = "float32",
    context_length: int = 2048,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> BuiltVLM:
    """Write to `out` a `LlavaForConditionalGeneration` of the CLIP `vision` (folder or Hub id; a full CLIP
    gives its vision tower; `clip:PRESET` a fresh random one seeded with `seed`, for smoke runs), a new
    `projector` ("linear" or "mlp2x_gelu", seeded with `seed`) and the language
    model `lm` (a Seshu model folder, a Hub id, or `arch:preset` for a fresh one with the tokenizer folder
    `tokenizer`), with its `LlavaProcessor` and a model card.

    `feature_layer` picks the vision tower's hidden layer the LM sees (LLaVA's -2 by default: see
    `DEFAULT_FEATURE_LAYER`); `feature_select` is transformers' `vision_feature_select_strategy` ("default" drops
    CLIP's class token, "full" keeps it). `context_length` sizes a fresh LM only. The weights are saved in
    `dtype` (safetensors), cast after the text-logits check, which runs in float32. `out` must be new, empty or
    an earlier VLM of this command (checked before anything is loaded); it is replaced whole and only when
    everything is written. Raises `UserError` for bad input and `VLMAssemblyError` when the text-only logits
    stray from the LM's; either way nothing is written.
    """
    out = Path(out)
    spec = get_projector(projector)
    if feature_select not in FEATURE_SELECT:
        raise UserError(f"unknown feature selection '{feature_select}'; choose one of: {', '.join(FEATURE_SELECT)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    check_replaceable_output(out, [vision, lm, tokenizer or ""], (CARD_COMMAND,), "a VLM")
    check_language_model(lm, tokenizer)
    _check_feature_layer(feature_layer, int(load_vision_config(vision).num_hidden_layers))
    tower = load_vision_tower(vision, seed=seed, log=log)
    language, tok = load_language_model(lm, tokenizer=tokenizer, context_length=context_length, seed=seed)

    known = len(tok)
    image_token_id = _add_tokens(tok)
    if len(tok) > known:
        add_mean_token_rows(language, known, len(tok))
    tokens_added = [str(t) for t in tok.convert_ids_to_tokens(list(range(known, len(tok))))]
    probe = check_inputs(tok, list(DEFAULT_CHECK_TEXTS), known)
    reference = model_logits(language, probe)
    fit_for_llava(language)
    image_tokens = image_token_count(tower, feature_select)
    model = _assemble(tower, language, spec, feature_layer, feature_select, image_token_id, image_tokens, seed)
    diff = compare_logits(reference, model_logits(model, probe))
    if not diff.position_p90 <= TOLERANCES["float32"]:
        raise VLMAssemblyError(
            f"the VLM's text-only logits differ from {lm}'s by {diff.position_p90:.3g} (relative, 90th "
            "percentile of positions)"
        )
    if log:
        log(f"text-only logits match the LM's (max difference {diff.max_abs:.2g})")
    model.to(DTYPES[dtype])  # type: ignore[arg-type]  # transformers types .to() as PreTrainedModel-only
    processor = LlavaProcessor(
        image_processor=tower.image_processor,
        tokenizer=tok,
        patch_size=int(tower.config.patch_size),
        vision_feature_select_strategy=feature_select,
        num_additional_image_tokens=CLIP_EXTRA_TOKENS,
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
    )
    report = VLMReport(
        vision=vision,
        lm=lm,
        lm_arch=str(language.config.model_type),
        projector=spec.name,
        feature_layer=feature_layer,
        feature_select=feature_select,
        image_tokens=image_tokens,
        image_token_id=image_token_id,
        tokens_added=tokens_added,
        parameters=count_parameters(model),
        projector_parameters=count_parameters(model.model.multi_modal_projector),
        dtype=dtype,
        text_logits_error=diff.position_p90,
    )
    card = _card(report, tower, tokenizer)
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return BuiltVLM(model=model, processor=processor, report=report)


def _check_feature_layer(layer: int, layers: int) -> None:
    # hidden_states holds the embeddings and then each layer's output: layers + 1 entries.
    if not -(layers + 1) <= layer <= layers:
        raise UserError(
            f"--feature-layer {layer}: the vision tower has {layers} layers; choose from {-(layers + 1)} to {layers} "
            "(-1 is the last layer's output, 0 the patch embeddings)"
        )


def _add_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` (when not a single token already) and make the template chat- and image-ready; the id of
    `<image>`."""
    if len(tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) != 1:
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    ensure_chat_template(tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: each learns to read image parts
        tokenizer.chat_template = {k: multimodal_chat_template(v, IMAGE_TOKEN) for k, v in template.items()}
    else:
        tokenizer.chat_template = multimodal_chat_template(str(template), IMAGE_TOKEN)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(token_id, int)
    return token_id


def _assemble(
    tower: VisionTower,
    language: Any,
    spec: ProjectorSpec,
    feature_layer: int,
    feature_select: str,
    image_token_id: int,
    image_tokens: int,
    seed: int,
) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=language.config,
        image_token_index=image_token_id,
        image_seq_length=image_tokens,
        projector_hidden_act=spec.activation,
        vision_feature_select_strategy=cast(FeatureSelect, feature_select),
        vision_feature_layer=feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(language.config.tie_word_embeddings),
    )
    # The shell on the meta device (no memory, no random init), then the loaded parts moved in as they are:
    # the towers are not copied, so a build needs the memory of one model, not two.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower.model
    model.model.language_model = language.base_model
    model.lm_head = language.get_output_embeddings()
    projector = LlavaMultiModalProjector(config)
    init_projector(projector.linear_1, projector.linear_2, spec, seed)
    model.model.multi_modal_projector = projector
    model.generation_config = language.generation_config
    on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise VLMAssemblyError(f"the VLM has tensors with no values: {', '.join(on_meta[:3])}")
    model.eval()
    return model


def _card(report: VLMReport, tower: VisionTower, tokenizer: str | None) -> str:
    local_lm = Path(report.lm).exists() or ":" in report.lm
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        **({} if local_lm else {"base_model": report.lm}),
        "tags": ["seshu", "llava", report.lm_arch, str(tower.config.model_type), "vision-language"],
        "seshu": {
            "command": CARD_COMMAND,
            **report.to_dict(),
            "tokenizer": tokenizer,
            "image_processor": tower.processor_source,
            "random_vision_tower": tower.random,
            "inputs": {
                "vision": [] if tower.random else describe_model(report.vision),
                "lm": [] if ":" in report.lm and not Path(report.lm).exists() else describe_model(report.lm),
            },
        },
    }
    added = ", ".join(f"`{t}`" for t in report.tokens_added) or "no tokens"
    vision = (
        f"a new CLIP vision tower with random weights (`{report.vision}`, for smoke runs: it has learnt to see nothing)"
        if tower.random
        else f"the CLIP vision tower of `{report.vision}`"
    )
    body = (
        f"A LLaVA-style vision-language model made with `seshu vlm build`: {vision}, a new {report.projector} "
        f"projector ({report.projector_parameters:,} parameters, untrained) and the language model `{report.lm}` "
        f"({report.lm_arch}); {report.parameters:,} parameters in all, {report.dtype}. The LM sees layer "
        f"{report.feature_layer} of the vision tower; each `<image>` expands to {report.image_tokens} positions. "
        f"Added {added} to the tokenizer (new rows at the mean of the existing ones). The text-only logits match "
        f"the LM's (relative error {report.text_logits_error:.2g}).\n\n"
        f"{usage_snippet(vision=True)}"
    )
    return render_card(f"{Path(report.lm).name} + {Path(report.vision).name} (VLM)", metadata, body)
