"""The recipe of `seshu vlm pretrain-projector`: a VLM folder, image-caption records and the usual `train` and
`track` sections, loaded with `seshu.config.load_recipe`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from seshu import assets
from seshu.config import StrictModel, TrackSection, TrainSection, check_validation_fraction
from seshu.multimodal.vlm import IMAGE_TOKEN

# The user turn of a COCO caption (COCO records hold no question): one of the short-caption prompts LLaVA's
# pretraining data pairs with its captions.
DEFAULT_PROMPT = f"{IMAGE_TOKEN}\nGive a short caption of this image."

CaptionFormat = Literal["auto", "llava", "coco"]

# How a caption record becomes a training row: "chat" renders it with the VLM's chat template (the prompt as the
# user turn, the caption as the answer); "plain" is LLaVA-1.5's stage-1 layout (its `plain` conversation
# template): the image positions, then the caption and a newline, no template, roles or prompt.
CaptionTemplate = Literal["chat", "plain"]


def _resolve_packaged(value: str | None) -> str | None:
    """`seshu:NAME` -> the packaged file's path (`seshu.assets.resolve`), so a recipe can name bundled data."""
    return None if value is None else assets.resolve(value)


class VLMModelSection(StrictModel):
    # A folder written by `seshu vlm build` (or by an earlier projector pretraining).
    init_from: str


class CaptionSource(StrictModel):
    path: str
    format: CaptionFormat | None = None  # None: data.format
    image_folder: str | None = None  # None: data.image_folder

    _packaged = field_validator("path", "image_folder")(_resolve_packaged)


class CaptionDataSection(StrictModel):
    """Image-caption records: LLaVA's pretraining records (`image` plus `conversations`) or COCO captions JSON."""

    train: str | CaptionSource | list[str | CaptionSource]
    validation: float | str | CaptionSource | list[str | CaptionSource] = 0.05
    format: CaptionFormat = "auto"
    # The folder the records' image paths are relative to; None: the folder of the records file.
    image_folder: str | None = None
    # The user turn of COCO records, which carry only captions; it must hold `<image>` once.
    prompt: str = DEFAULT_PROMPT
    template: CaptionTemplate = "chat"
    max_records: int | None = Field(None, ge=1)  # of the training records

    _fraction_in_range = field_validator("validation")(check_validation_fraction)
    _packaged = field_validator("image_folder")(_resolve_packaged)

    @field_validator("prompt")
    @classmethod
    def _one_image(cls, value: str) -> str:
        if value.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"the prompt must hold {IMAGE_TOKEN} exactly once")
        return value

    def train_sources(self) -> list[CaptionSource]:
        return self._sources(self.train)

    def validation_sources(self) -> list[CaptionSource]:
        return [] if isinstance(self.validation, float) else self._sources(self.validation)

    def _sources(self, value: str | CaptionSource | list[str | CaptionSource]) -> list[CaptionSource]:
        items = value if isinstance(value, list) else [value]
        sources = [CaptionSource(path=item) if isinstance(item, str) else item for item in items]
        defaults = {"format": self.format, "image_folder": self.image_folder}
        return [s.model_copy(update={k: v for k, v in defaults.items() if getattr(s, k) is None}) for s in sources]


class ProjectorTrainSection(TrainSection):
    """`train` for projector pretraining: the same keys, with LLaVA's pretraining defaults (learning rate 1e-3,
    no weight decay) and room for a CLIP's 576 image positions plus a caption."""

    seq_len: int = Field(1024, ge=8)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # auto's speed-up is measured for pretraining only (see SFTTrainSection).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"


class VLMPretrainRecipe(StrictModel):
    model: VLMModelSection
    data: CaptionDataSection
    train: ProjectorTrainSection = Field(default_factory=ProjectorTrainSection)
    track: TrackSection = Field(default_factory=TrackSection)
    output_dir: str = "runs/vlm-projector"
