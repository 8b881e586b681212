"""`seshu vlm train`: the whole LLaVA path in one recipe, as the seed system ran it: build the VLM (a CLIP tower, a
projector, a language model), pretrain its projector on image-caption pairs, tune it on visual instructions
(LoRA or QLoRA on the LM, the projector whole), and fold the adapter into a standalone VLM.

Each stage is the command of its own (`seshu vlm build`, `seshu vlm pretrain-projector`, `seshu sft`, `seshu
adapters fold`) run on a recipe made from this one's sections, into a folder of its own under `output_dir`:
`vlm/`, `projector/`, `instruct/` and `chat/`. With `--resume`, a stage whose result is published is skipped and
an interrupted one resumes from its last checkpoint, so a long run can stop anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from seshu.config import (
    InstructionDataSection,
    ModelSection,
    SFTRecipe,
    SFTSection,
    SFTTrainSection,
    StrictModel,
    TrackSection,
    VLMSection,
    dump_recipe,
)
from seshu.errors import UserError
from seshu.io import write_text_atomic
from seshu.multimodal.config import CaptionDataSection, ProjectorTrainSection, VLMModelSection, VLMPretrainRecipe
from seshu.train.common import silent

STAGES = ("vlm", "projector", "instruct", "chat")  # the stage folders, in order


class BuildSection(StrictModel):
    """`seshu vlm build`'s options."""

    vision: str  # a CLIP folder or Hub id
    lm: str  # a Seshu model folder, a Hub id, or arch:preset (then `tokenizer` too)
    tokenizer: str | None = None
    projector: Literal["linear", "mlp2x_gelu"] = "linear"
    feature_layer: int = -2
    feature_select: Literal["default", "full"] = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    context_length: int = Field(2048, ge=8)  # of a fresh LM only
    seed: int = 0


class ProjectorStage(StrictModel):
    """Projector pretraining: the `data` and `train` sections of `seshu vlm pretrain-projector`."""

    data: CaptionDataSection
    train: ProjectorTrainSection = Field(default_factory=ProjectorTrainSection)


class InstructStage(StrictModel):
    """Visual instruction tuning: the `data`, `train`, `sft` and `vlm` sections of `seshu sft` on a VLM."""

    data: InstructionDataSection
    train: SFTTrainSection = Field(default_factory=SFTTrainSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    vlm: VLMSection = Field(default_factory=VLMSection)


class FoldStage(StrictModel):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class VLMRecipe(StrictModel):
    build: BuildSection
    projector: ProjectorStage | None = None  # None: the projector stays as built (or as instruct trains it)
    instruct: InstructStage | None = None
    fold: FoldStage | None = None  # the instruct stage's adapter folded into chat/
    track: TrackSection = Field(default_factory=TrackSection)
    output_dir: str = "runs/vlm"


@dataclass
class PipelineResult:
    output_dir: Path
    final: Path  # the last stage's result: the VLM to talk to (or the adapter, when not folded)
    metrics: dict[str, dict[str, float]]  # validation metrics of each training stage


def _done(folder: Path) -> bool:
    """Whether a stage published its result (a model or an adapter folder with its card)."""
    return (folder / "README.md").is_file() and (
        (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    )


def _check_output(out: Path, resume: bool) -> None:
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a folder")
    if any((out / stage).exists() for stage in STAGES):
        raise UserError(f"{out}: already holds a VLM run; pass --resume to continue it or choose another --out")


def _check_stages(recipe: VLMRecipe) -> None:
    if recipe.fold is not None and (recipe.instruct is None or recipe.instruct.sft.method == "full"):
        raise UserError("fold: folds the instruct stage's adapter; it needs an instruct stage with lora or qlora")


def run(recipe: VLMRecipe, *, resume: bool = False, log: Callable[[str], None] = silent) -> PipelineResult:
    """Run the recipe's stages in order into `recipe.output_dir`; with `resume`, skip the finished ones and resume
    an interrupted one. Each stage's progress goes to `log`."""
    from seshu.merge.fold import fold_adapter
    from seshu.multimodal import pretrain_projector, sft
    from seshu.multimodal.vlm import build_vlm

    out = Path(recipe.output_dir)
    _check_output(out, resume)
    _check_stages(recipe)
    folders = {stage: out / stage for stage in STAGES}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", dump_recipe(recipe))
    metrics: dict[str, dict[str, float]] = {}

    def stage(name: str, what: str) -> bool:
        """Whether stage `name` must run (logging which it is); a finished one is skipped on resume."""
        if resume and _done(folders[name]):
            log(f"{name}: {what} done earlier ({folders[name]})")
            return False
        log(f"{name}: {what}")
        return True

    build = recipe.build
    if stage("vlm", f"building from {build.vision} and {build.lm}"):
        build_vlm(
            build.vision,
            build.lm,
            folders["vlm"],
            projector=build.projector,
            feature_layer=build.feature_layer,
            feature_select=build.feature_select,
            tokenizer=build.tokenizer,
            dtype=build.dtype,
            context_length=build.context_length,
            seed=build.seed,
            log=log,
        )
    current = folders["vlm"]
    if recipe.projector is not None:
        if stage("projector", "pretraining the projector on image-caption pairs"):
            stage1 = VLMPretrainRecipe(
                model=VLMModelSection(init_from=str(current)),
                data=recipe.projector.data,
                train=recipe.projector.train,
                track=recipe.track,
                output_dir=str(folders["projector"]),
            )
            done = pretrain_projector.run(stage1, resume=resume and folders["projector"].exists(), log=log)
            metrics["projector"] = done.metrics
        current = folders["projector"]
    if recipe.instruct is not None:
        instruct = recipe.instruct
        if stage("instruct", f"visual instruction tuning ({instruct.sft.method})"):
            stage2 = SFTRecipe(
                model=ModelSection(init_from=str(current)),
                data=instruct.data,
                train=instruct.train,
                sft=instruct.sft,
                vlm=instruct.vlm,
                track=recipe.track,
                output_dir=str(folders["instruct"]),
            )
            tuned = sft.run(stage2, resume=resume and folders["instruct"].exists(), log=log)
            metrics["instruct"] = tuned.metrics
        if recipe.fold is None:
            return PipelineResult(out, folders["instruct"], metrics)
        if stage("chat", f"folding the adapter into a standalone VLM ({recipe.fold.dtype})"):
            fold_adapter(str(current), str(folders["instruct"]), folders["chat"], dtype=recipe.fold.dtype)
        current = folders["chat"]
    return PipelineResult(out, current, metrics)
