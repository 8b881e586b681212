"""The vision tower of a VLM: a CLIP image encoder (its vision half only) and the image processor it was trained
with, loaded from a folder or a Hub id (or made fresh and random from a preset, `clip:tiny`, for smoke runs), plus
the image token arithmetic that the model and processor must share.

Only the vision half of a full CLIP checkpoint is kept (`CLIPVisionModel` reads the `vision_model` tensors and
skips the text tower and the contrastive projections), exactly as LLaVA does: the language model replaces CLIP's
text tower, and LLaVA feeds the LM hidden states, not CLIP's joint embedding space.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
)

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

# `clip:PRESET`: neither a Hub id (no ':') nor, unless it exists, a path.
_FRESH = re.compile(r"clip:([a-z0-9_]+)")

# Fresh CLIP vision towers for `--vision clip:PRESET`: random weights, so a VLM made with one sees nothing; they
# let a whole pipeline (build, projector pretraining, instruction tuning) run on a CPU with no download.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # 32x32 images in 8x8 patches: 16 image positions, 24k parameters; the bundled shapes are drawn at 32x32.
    "tiny": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2),
    # CLIP ViT-B/32's geometry (224x224 images in 32x32 patches: 49 positions) at a third of its width and a third
    # of its depth: 4.0M parameters, for photos at their usual processing size.
    "small": dict(image_size=224, patch_size=32, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4),
}  # fmt: skip


@dataclass
class VisionTower:
    model: CLIPVisionModel
    image_processor: Any  # transformers' image processors share no public base class worth naming here
    processor_source: str  # where the image processor came from: the checkpoint, or CLIP's defaults
    random: bool = False  # a fresh tower from a preset: its weights are random, not trained

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


def load_vision_tower(ref: str, *, seed: int = 0, log: Callable[[str], None] | None = None) -> VisionTower:
    """The CLIP vision encoder at `ref` (a folder or a Hub id) in float32, with its image processor; or, for
    `clip:PRESET` (see `CLIP_PRESETS`) when no such folder exists, a fresh one with random weights seeded with
    `seed` and CLIP's image processor sized to it.

    A checkpoint without an image processor (a vision tower saved on its own) gets CLIP's: resize the short side
    to the tower's image size, centre-crop to a square, CLIP's mean and standard deviation. Raises `UserError`
    for a missing folder, an unknown preset, a model that is not a CLIP, weights missing from the checkpoint, or
    an image processor whose crop size is not the tower's image size (the patch count would not match the model).
    """
    preset = _fresh_preset(ref)
    if preset is not None:
        return _fresh_tower(preset, seed)
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
    """The config of the CLIP vision tower at `ref` (the vision half of a full CLIP's, or a `clip:PRESET`'s), read
    without the weights; `UserError` for a missing folder, an unknown preset or a model that is not a CLIP."""
    preset = _fresh_preset(ref)
    if preset is not None:
        return _preset_config(preset)
    config = _load_config(ref)
    if config.model_type not in CLIP_TYPES:
        raise UserError(
            f"{ref}: a '{config.model_type}' model, not a CLIP; --vision takes a CLIP checkpoint or its vision tower"
        )
    return config.vision_config if config.model_type == "clip" else config


def _fresh_preset(ref: str) -> str | None:
    """The preset name of a `clip:PRESET` reference, or None for a folder or a Hub id (an existing folder of that
    name wins over the pattern)."""
    match = _FRESH.fullmatch(ref)
    if match is None or Path(ref).exists():
        return None
    return match.group(1)


def _preset_config(preset: str) -> CLIPVisionConfig:
    if preset not in CLIP_PRESETS:
        raise UserError(f"unknown CLIP preset '{preset}'; choose one of: {', '.join(CLIP_PRESETS)}")
    return CLIPVisionConfig(**CLIP_PRESETS[preset])


def _fresh_tower(preset: str, seed: int) -> VisionTower:
    config = _preset_config(preset)
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's global random state
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    model.eval()
    processor = _clip_image_processor(CLIP_PRESETS[preset]["image_size"])
    return VisionTower(model=model, image_processor=processor, processor_source="CLIP defaults", random=True)


def _clip_image_processor(size: int) -> CLIPImageProcessorPil:
    """CLIP's image processing for `size`x`size` images: resize the short side, centre-crop, CLIP's mean/std."""
    # The PIL variant: it needs no torchvision, and its bicubic resize is PIL's, which CLIP was trained with.
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


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
    return _clip_image_processor(size), "CLIP defaults"


def _check_crop(ref: str, tower: VisionTower) -> None:
    crop: Any = getattr(tower.image_processor, "crop_size", None) or {}
    size = int(tower.config.image_size)
    height, width = crop.get("height"), crop.get("width")
    if (height, width) != (size, size):
        raise UserError(
            f"{ref}: the image processor crops to {height}x{width} but the vision tower takes {size}x{size} images"
        )
