"""Recipes: pydantic models of the YAML files that drive every command, loading and `--set` overrides.

A recipe is validated as a whole before anything runs, unknown keys are errors, and each error names the
dotted key and the file it came from. `inherit: other.yaml` lets a tiny variant state only what differs from
the real-scale recipe instead of copying it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seshu import assets
from seshu.errors import UserError, first_line


class StrictModel(BaseModel):
    """The base of every config section: unknown keys are errors, and `model_*` field names are allowed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(StrictModel):
    arch: str = "llama"
    preset: str = "tiny"
    init_from: str | None = None
    # Any field of the architecture's transformers config, applied on top of the preset.
    overrides: dict[str, Any] = Field(default_factory=dict)


class TokenizerTraining(StrictModel):
    vocab_size: int = Field(8000, ge=64)
    kind: Literal["bpe", "unigram"] = "bpe"
    # Exponent of language-balanced sampling: 1.0 keeps the corpus' own mix, 0.0 gives every script the
    # same share, 0.3 is the usual middle ground for many languages.
    balance_alpha: float | None = Field(None, ge=0.0, le=1.0)
    max_docs: int | None = Field(None, ge=1)


class TokenizerSection(StrictModel):
    path: str | None = None
    train: TokenizerTraining = Field(default_factory=TokenizerTraining)


# How a `.txt` file is cut into documents (see `seshu.data.sources.read_documents`).
TextUnit = Literal["auto", "line", "paragraph", "file"]


class SourceEntry(StrictModel):
    path: str
    weight: float = Field(1.0, gt=0)
    text_field: str | None = None
    text_unit: TextUnit | None = None
    name: str | None = None  # HF dataset configuration
    split: str = "train"

    @field_validator("path")
    @classmethod
    def _resolve_packaged(cls, value: str) -> str:
        return assets.resolve(value)


class CleanSection(StrictModel):
    normalize: bool = True
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = Field(0.85, gt=0, le=1)
    # De-duplication remembers this many recent documents, so memory stays bounded on any corpus size.
    dedup_window: int = Field(1_000_000, ge=1)
    scripts: list[str] | None = None


def check_validation_fraction(value: Any) -> Any:
    """A `validation` value: a held-out fraction must lie strictly between 0 and 1 (sources pass as they are)."""
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError("a validation fraction must be between 0 and 1")
    return value


class _SplitSources(StrictModel):
    """Training sources and a validation split: a held-out fraction of them, or sources of its own."""

    train: str | SourceEntry | list[str | SourceEntry]
    validation: float | str | SourceEntry | list[str | SourceEntry] = 0.05

    _fraction_in_range = field_validator("validation")(check_validation_fraction)

    def _text_field(self) -> str:
        return "text"

    def _text_unit(self) -> TextUnit:
        return "auto"

    def train_sources(self) -> list[SourceEntry]:
        return _entries(self.train, self._text_field(), self._text_unit())

    def validation_sources(self) -> list[SourceEntry]:
        if isinstance(self.validation, float):
            return []
        return _entries(self.validation, self._text_field(), self._text_unit())


class DataSection(_SplitSources):
    text_field: str = "text"
    text_unit: TextUnit = "auto"
    streaming: bool = False
    mix_stop: Literal["first_exhausted", "all_exhausted"] = "all_exhausted"
    clean: CleanSection = Field(default_factory=CleanSection)
    max_eval_blocks: int = Field(256, ge=1)

    def _text_field(self) -> str:
        return self.text_field

    def _text_unit(self) -> TextUnit:
        return self.text_unit


def _entries(
    value: str | SourceEntry | list[str | SourceEntry], text_field: str, text_unit: TextUnit
) -> list[SourceEntry]:
    items = value if isinstance(value, list) else [value]
    entries = [SourceEntry(path=item) if isinstance(item, str) else item for item in items]
    defaults = {"text_field": text_field, "text_unit": text_unit}
    return [e.model_copy(update={k: v for k, v in defaults.items() if getattr(e, k) is None}) for e in entries]


class TrainSection(StrictModel):
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(1000, ge=1)
    lr: float = Field(3e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 mixed precision where the hardware computes bf16 natively, float32 elsewhere (seshu.train.precision).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    compile: bool = False
    eval_every: int = Field(100, ge=1)
    save_every: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0


class TrackSection(StrictModel):
    report_to: Literal["none", "tensorboard", "mlflow"] = "none"
    experiment: str = "seshu"
    # For mlflow: a tracking URI; by default a local store inside the run directory.
    tracking_uri: str | None = None


class LoraSection(StrictModel):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, gt=0)
    # None: 0.05, or 0 when fused expert parameters are targeted (peft applies no dropout to those).
    dropout: float | None = Field(None, ge=0, lt=1)
    # Defaults come from the model registry (per architecture); set these to target other modules.
    target_modules: list[str] | None = None
    target_parameters: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False


class PretrainRecipe(StrictModel):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    track: TrackSection = Field(default_factory=TrackSection)
    # Continued pretraining of `model.init_from` through LoRA adapters instead of all weights.
    lora: LoraSection | None = None
    output_dir: str = "runs/pretrain"


class InstructionDataSection(_SplitSources):
    """Instruction records for fine-tuning (see `seshu.data.instructions` for the formats)."""

    format: str = "auto"
    on_error: Literal["raise", "skip"] = "raise"
    max_records: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _no_text_unit(self) -> InstructionDataSection:
        # Instruction data is records; a text unit cuts plain text, so here it would silently do nothing.
        values = [self.train, self.validation]
        entries = [e for v in values for e in (v if isinstance(v, list) else [v]) if isinstance(e, SourceEntry)]
        if any(e.text_unit is not None for e in entries):
            raise ValueError("text_unit applies to plain-text pretraining sources, not to instruction records")
        return self


class SFTSection(StrictModel):
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    # Several short conversations per sequence, each attending only to itself (where the trainer supports it).
    packing: bool = False


class SFTTrainSection(TrainSection):
    """`train` for fine-tuning: the same keys, with the defaults LoRA fine-tuning usually wants."""

    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    # auto's speed-up is measured for pretraining. Under bf16 LoRA also loads the frozen base in bf16, a change in
    # what trains that needs its own measurement first; `precision: auto` is there to choose.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"


class VLMSection(StrictModel):
    """How `seshu sft` tunes a VLM (`model.init_from` from `seshu vlm build`) on records with images and audio."""

    # LLaVA's stage 2 trains the projector fully beside the LM's adapters; "freeze" keeps the pretrained one.
    projector: Literal["train", "freeze"] = "train"
    # The folder the records' image and audio paths are relative to; None: the folder of each records file.
    media_folder: str | None = None
    # The Whisper that transcribes `<audio>` (a folder or Hub id); None: the tiny.en of `seshu[speech]`.
    whisper: str | None = None
    # How much of each recording is heard: the seed system's first 10 seconds.
    audio_seconds: float = Field(10.0, gt=0)

    @field_validator("media_folder")
    @classmethod
    def _resolve_packaged(cls, value: str | None) -> str | None:
        return None if value is None else assets.resolve(value)


class SFTRecipe(StrictModel):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: InstructionDataSection
    train: SFTTrainSection = Field(default_factory=SFTTrainSection)
    track: TrackSection = Field(default_factory=TrackSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    # For a VLM base only; its defaults apply when it is left out.
    vlm: VLMSection | None = None
    output_dir: str = "runs/sft"


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file, following `inherit:` chains (paths relative to the including file)."""
    return _read_yaml(path, seen=())


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'inherit' forms a cycle")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise UserError(f"{path}{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, not {type(raw).__name__}")
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    base = _read_yaml(path.parent / str(parent), (*seen, path))
    return deep_merge(base, raw)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` laid over `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML, so `3e-4`, `true` and `[a, b]` work.

    The value replaces what the key held (`--set model.overrides={}` clears the overrides); the mappings on
    the way to it are copied, never modified in place.
    """
    result = dict(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {assignment!r}: expected key=value, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = result
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return result


def validate(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    """`raw` as an instance of `model`, or a UserError naming the first bad key."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise UserError(f"{source}: unknown key '{key}'") from None
        if err["type"] == "missing":
            raise UserError(f"{source}: missing required key '{key}'") from None
        raise UserError(f"{source}: '{key}': {err['msg']}") from None


def load_recipe(model: type[BaseModel], path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read, override and validate a recipe file."""
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    return validate(model, raw, str(path))


class Dumpable(Protocol):
    """A recipe as `dump_recipe` takes it: any validated config model."""

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


def dump_recipe(recipe: Dumpable) -> str:
    """The recipe as YAML, every default spelled out (written into run directories and model cards)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
