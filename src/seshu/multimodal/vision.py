"""The vision tower of a VLM: a CLIP image encoder (its vision half only) and the image processor it was trained
with, loaded from a folder or a Hub id, plus the image token arithmetic that the model and processor must share.

Only the vision half of a full CLIP checkpoint is kept (`CLIPVisionModel` reads the `vision_model` tensors and
skips the text tower and the contrastive projections), exactly as LLaVA does: the language model replaces CLIP's
text tower, and LLaVA feeds the LM hidden states, not CLIP's joint embedding space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import AutoConfig, AutoImageProcessor, CLIPImageProcessorPil, CLIPVisionModel, PretrainedConfig

from seshu.errors import UserError, first_line
from seshu.hub.ids import is_hub_id

# The model types a vision tower may come from: a full CLIP checkpoint or a vision-only one.
CLIP_TYPES = ("clip", "clip_vision_model")

# CLIP prepends one class (CLS) token to its patch tokens; LLaVA's "default" strategy drops it.
CLIP_EXTRA_TOKENS = 1

# transformers' names for which vision tokens reach the LM: "default" drops the CLS token (LLaVA-1.5), "full"
# keeps it.
FeatureSelect = Literal["default", "full"]
FEATURE_SELECT: tuple[str, ...] = get_args(FeatureSelect)


@dataclass
class VisionTower:
    model: CLIPVisionModel
    image_processor: Any  # transformers' image processors share no public base class worth naming here
    processor_source: str  # where the image processor came from: the checkpoint, or CLIP's defaults

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def patches(self) -> int:
        """How many patch tokens one image becomes (the CLS token not counted)."""
        side = int(self.config.image_size) // int(self.config.patch_size)
        return side * side


def image_token_count(tower: VisionTower, feature_select: str) -> int:
    """How many `<image>` positions one image fills in the LM's input: the patches, plus CLS when kept."""
    return tower.patches() + (CLIP_EXTRA_TOKENS if feature_select == "full" else 0)


def load_vision_tower(ref: str, *, log: Callable[[str], None] | None = None) -> VisionTower:
    """The CLIP vision encoder at `ref` (a folder or a Hub id) in float32, with its image processor.

    A checkpoint without an image processor (a vision tower saved on its own) gets CLIP's: resize the short side
    to the tower's image size, centre-crop to a square, CLIP's mean and standard deviation. Raises `UserError`
    for a missing folder, a model that is not a CLIP, weights missing from the checkpoint, or an image processor
    whose crop size is not the tower's image size (the patch count would not match the model).
    """
    load_vision_config(ref)
    try:
        loaded: Any = CLIPVisionModel.from_pretrained(
            ref, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"{ref}: cannot load the CLIP vision tower: {first_line(exc)}") from None
    model, info = loaded
    if info["missing_keys"]:
        # transformers would fill them at random and only warn: a silently untrained tower.
        missing = sorted(info["missing_keys"])
        raise UserError(f"{ref}: the checkpoint lacks {len(missing)} vision tensors (first: {missing[0]})")
    model.eval()
    processor, source = _image_processor(ref, model.config, log)
    tower = VisionTower(model=model, image_processor=processor, processor_source=source)
    _check_crop(ref, tower)
    return tower


def load_vision_config(ref: str) -> PretrainedConfig:
    """The config of the CLIP vision tower at `ref` (the vision half of a full CLIP's), read without the weights;
    `UserError` for a missing folder or a model that is not a CLIP."""
    config = _load_config(ref)
    if config.model_type not in CLIP_TYPES:
        raise UserError(
            f"{ref}: a '{config.model_type}' model, not a CLIP; --vision takes a CLIP checkpoint or its vision tower"
        )
    return config.vision_config if config.model_type == "clip" else config


def _load_config(ref: str) -> PretrainedConfig:
    local = Path(ref).expanduser()
    if not is_hub_id(ref):
        if not local.is_dir():
            raise UserError(f"{ref}: vision model folder not found")
        if not (local / "config.json").is_file():
            raise UserError(f"{ref}: not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{ref}: cannot read the vision model's config: {first_line(exc)}") from None


def _image_processor(ref: str, config: PretrainedConfig, log: Callable[[str], None] | None) -> tuple[Any, str]:
    local = Path(ref).expanduser()
    if is_hub_id(ref) or (local / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(ref), ref
        except (OSError, ValueError) as exc:
            if not is_hub_id(ref):
                raise UserError(f"{ref}: cannot load its image processor: {first_line(exc)}") from None
    size = int(config.image_size)
    if log:
        log(f"{ref} has no image processor: using CLIP's (resize and centre-crop to {size}x{size}, CLIP's mean/std)")
    # The PIL variant: it needs no torchvision, and its bicubic resize is PIL's, which CLIP was trained with.
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor, "CLIP defaults"


def _check_crop(ref: str, tower: VisionTower) -> None:
    crop: Any = getattr(tower.image_processor, "crop_size", None) or {}
    size = int(tower.config.image_size)
    height, width = crop.get("height"), crop.get("width")
    if (height, width) != (size, size):
        raise UserError(
            f"{ref}: the image processor crops to {height}x{width} but the vision tower takes {size}x{size} images"
        )
