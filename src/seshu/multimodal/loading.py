"""Loading a VLM made by `seshu vlm build` (a transformers LLaVA folder) with its processor, for training, folding
and generation alike; this module imports no trainer, so `seshu generate` on a VLM starts quickly."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor

from seshu.errors import UserError, first_line
from seshu.hub.ids import is_hub_id
from seshu.models.loading import check_model_dir, torch_dtype

VLM_MODEL_TYPE = "llava"


def is_vlm(model: str) -> bool:
    """Whether the local folder `model` holds a LLaVA model; a Hub id or a folder without a readable config is
    left to the text model's loader, which says what is wrong with it."""
    config = Path(model).expanduser() / "config.json"
    if is_hub_id(model) or not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("model_type") == VLM_MODEL_TYPE)
    except (OSError, ValueError):
        return False


def load_vlm(ref: str, *, dtype: str | None = "float32") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The VLM folder `ref` (from `seshu vlm build`; safetensors only) in `dtype` (None: as saved), with its
    processor; `UserError` for a folder that is not a LLaVA model."""
    weights_dtype = torch_dtype(dtype)
    check_model_dir(ref)
    model_type = AutoConfig.from_pretrained(ref).model_type
    if model_type != VLM_MODEL_TYPE:
        raise UserError(f"{ref}: a '{model_type}' model, not a VLM; make one with `seshu vlm build`")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(ref, dtype=weights_dtype, use_safetensors=True)
        processor = LlavaProcessor.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise UserError(f"{ref}: cannot load the VLM: {first_line(exc)}") from None
    return model, processor
