"""Loading a VLM made by `seshu vlm build` (a transformers LLaVA folder) with its processor, for training and for
generation alike; this module imports no trainer, so `seshu generate` on a VLM starts quickly."""

from __future__ import annotations

import torch
from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor

from seshu.errors import UserError, first_line
from seshu.models.loading import check_model_dir


def load_vlm(ref: str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The VLM folder `ref` (from `seshu vlm build`) in float32, with its processor; `UserError` for a folder that
    is not a LLaVA model."""
    check_model_dir(ref)
    model_type = AutoConfig.from_pretrained(ref).model_type
    if model_type != "llava":
        raise UserError(f"{ref}: a '{model_type}' model, not a VLM; make one with `seshu vlm build`")
    try:
        model = LlavaForConditionalGeneration.from_pretrained(ref, dtype=torch.float32, use_safetensors=True)
        processor = LlavaProcessor.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise UserError(f"{ref}: cannot load the VLM: {first_line(exc)}") from None
    return model, processor
