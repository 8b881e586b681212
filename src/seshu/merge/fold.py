"""Fold a PEFT adapter into its base model: one standalone model that loads with plain `AutoModelForCausalLM`, or
for a VLM (`seshu vlm build`'s LLaVA) with `LlavaForConditionalGeneration` and `AutoProcessor`.

`fold_adapter` is `seshu adapters fold`. It loads the base in float32, applies the adapter unmerged (the forward
pass it was trained with), takes reference logits on a few fixed inputs, merges, casts to the output dtype and
takes the logits again from the weights as they will be saved. The fold is written only when the two agree
within the dtype's tolerance; the figures go into the model card. A VLM is also checked on an input with an
image's positions, so that what the adapter does to the projector (trained whole, as `modules_to_save`) and to
the LM reading the image is checked too.

The adapter is read, checked and applied by `seshu.merge.adapters.load_with_adapter` (it is untrusted input), which
matches every tensor by name and shape against what the config makes of the base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from seshu.chat import encode_prompt
from seshu.errors import UserError, first_line
from seshu.hub.card import check_replaceable_output, describe_inputs, render_card, usage_snippet
from seshu.io import sha256_file, staged_dir
from seshu.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFiles, load_with_adapter
from seshu.models.loading import DTYPES, embedding_rows
from seshu.models.registry import count_parameters

CARD_COMMAND = "adapters fold"

# Largest accepted error of the folded logits, per output dtype: the 90th percentile over positions of
# ||folded - reference|| / ||reference|| (each position's logit vector). A percentile rather than the whole-tensor
# figure because of mixture-of-experts models: rounding the router's weights flips the top-k choice of the odd
# token whose experts nearly tie, and that token's logits jump (by 20-60% on a tiny random Mixtral in bfloat16,
# for 3 positions of 200), which is what the model would do at that dtype anyway, not a fault of the fold. A fold
# that lost or mangled the adapter is off at nearly every position, which the percentile still sees.
# Storing a weight rounds it by at most half a unit in the last place: 2^-24 relative in float32, 2^-11 in float16
# (10 mantissa bits), 2^-8 in bfloat16 (7 bits). Independent rounding errors add up roughly with the square root
# of the number of matmuls they pass through; measured on random llama models (2 to 12 layers, LoRA on five
# projections), the folded logits were off by 3e-7-1e-6 in float32, 4e-4-9e-4 in float16 and 3e-3-6e-3 in
# bfloat16. The tolerances leave ~10x headroom for deeper, trained models, and stay well below what a fold that
# lost or mangled the adapter produces (a trained adapter moves the logits by tens of percent).
TOLERANCES: dict[str, float] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

# Short texts in a few scripts (the inputs a user's model meets), plus one seeded random sequence that reaches
# token ids the texts never do.
DEFAULT_CHECK_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "नमस्ते दुनिया, आज मौसम बहुत अच्छा है।",
    "def add(a, b):\n    return a + b\n",
)
RANDOM_CHECK_TOKENS = 32
# The adapter's config fields the card records: what it changes and how.
_CARD_SETTINGS = (
    "peft_type", "r", "lora_alpha", "target_modules", "target_parameters", "modules_to_save", "use_dora", "use_rslora"
)  # fmt: skip

# One input of the check: token ids, or the model's keyword inputs (input_ids of shape [1, n], and for a VLM the
# pixel_values of its image).
CheckInput = list[int] | Mapping[str, torch.Tensor]


class FoldMismatchError(RuntimeError):
    """The folded model does not reproduce base + adapter: a failure of the fold, not of the input (exit 1)."""


@dataclass(frozen=True)
class LogitCheck:
    """How far the folded model's logits are from base + unmerged adapter (float32) on the check inputs."""

    inputs: int
    tokens: int
    images: int  # inputs that go through a VLM's vision tower and projector
    max_abs_diff: float
    relative_error: float  # ||folded - reference|| / ||reference|| over all positions and the vocabulary
    position_error_p90: float  # the verdict: 90th percentile of the per-position relative errors (`grouped_p90`)
    tolerance: float
    adapter_effect: float  # the same percentile between base and base + adapter: how much the adapter does

    @property
    def passed(self) -> bool:
        return self.position_error_p90 <= self.tolerance  # False for NaN too

    @property
    def adapter_within_rounding(self) -> bool:
        """True when the dtype's rounding is comparable to the adapter's own effect, so folding at this dtype
        blurs much of what was trained (float32 keeps it)."""
        return self.position_error_p90 > 0.5 * self.adapter_effect

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FoldReport:
    out: Path
    dtype: str
    parameters: int
    check: LogitCheck


# --------------------------------------------------------------------------------------------------
# The logits check


def check_inputs(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    vocab_size: int,
    seed: int = 0,
    reserved: Sequence[int] = (),
) -> list[list[int]]:
    """Token ids of `texts` (each as a document starts: [bos] text), plus one seeded random sequence of ids below
    `vocab_size` that are not `reserved` (a VLM's image token, which needs an image's pixels)."""
    inputs = [encode_prompt(tokenizer, text) for text in texts]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(vocab_size)
    allowed = ids[~torch.isin(ids, torch.tensor(list(reserved), dtype=torch.long))]
    inputs.append(allowed[torch.randint(0, len(allowed), (RANDOM_CHECK_TOKENS,), generator=generator)].tolist())
    return inputs


def image_check_input(config: PretrainedConfig, ids: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A LLaVA input through the vision tower and projector: the image token `image_seq_length` times (one image,
    as the processor expands `<image>`), then `ids`, with seeded pixel values. Their size is the vision tower's
    `image_size`, which is what the processor resizes to; normalised pixels are roughly standard normal."""
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    image = [int(config.image_token_id)] * int(config.image_seq_length)
    return {"input_ids": torch.tensor([image + ids]), "pixel_values": pixels}


def _input_tokens(item: CheckInput) -> int:
    return int(item["input_ids"].shape[-1]) if isinstance(item, Mapping) else len(item)


def _has_image(item: CheckInput) -> bool:
    return isinstance(item, Mapping) and "pixel_values" in item


@torch.inference_mode()
def model_logits(model: Any, inputs: Sequence[CheckInput]) -> list[torch.Tensor]:
    """float32 logits of each input, one sequence at a time (no padding: Mamba has no attention mask)."""
    device = next(model.parameters()).device
    logits = []
    for item in inputs:
        kwargs = item if isinstance(item, Mapping) else {"input_ids": torch.tensor([item])}
        out = model(**{name: value.to(device) for name, value in kwargs.items()}, use_cache=False)
        logits.append(out.logits[0].float().cpu())
    return logits


@dataclass(frozen=True)
class LogitDiff:
    max_abs: float  # max |candidate - reference|
    relative: float  # ||candidate - reference|| / ||reference||, all positions together
    position_p90: float  # 90th percentile over positions of the same ratio per position


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> LogitDiff:
    """How far `candidate` logits are from `reference` ones (lists of [positions, vocab] tensors), in float64."""
    ref = torch.cat([t.reshape(-1, t.shape[-1]) for t in reference]).double()
    diff = torch.cat([t.reshape(-1, t.shape[-1]) for t in candidate]).double() - ref
    per_position = _ratio(diff.norm(dim=-1), ref.norm(dim=-1))
    return LogitDiff(
        max_abs=float(diff.abs().max()),
        relative=float(_ratio(diff.norm(), ref.norm())),
        position_p90=float(torch.quantile(per_position, 0.9)),
    )


def grouped_p90(reference: list[torch.Tensor], candidate: list[torch.Tensor], inputs: Sequence[CheckInput]) -> float:
    """`compare_logits`' 90th percentile over the positions of the inputs without an image, and apart over those
    with one: the larger. A projector folded wrong moves only the positions that read an image, and among the
    positions of all inputs those may be fewer than a tenth."""
    groups = [[n for n, item in enumerate(inputs) if _has_image(item) is image] for image in (False, True)]
    p90s = [compare_logits([reference[n] for n in g], [candidate[n] for n in g]).position_p90 for g in groups if g]
    return float(torch.tensor(p90s).max())  # NaN if either is: a verdict that fails


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 is agreement (all-zero logits on both sides); anything else over 0 is infinitely far.
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))


# --------------------------------------------------------------------------------------------------
# Folding


def fold_adapter(
    base: str,
    adapter: str,
    out: Path,
    dtype: str = "bfloat16",
    check_prompts: list[str] | None = None,
) -> FoldReport:
    """Fold the adapter folder `adapter` into the model `base` (folder or Hub id) and write the result to `out`.

    The output holds safetensors weights in `dtype`, config, generation config, the tokenizer (the adapter's when
    it ships one, since fine-tuning may have changed its chat template, else the base's) and a model card. A VLM
    base gives a LLaVA folder with the processor (again the adapter's when it ships one).
    Raises `UserError` for bad input and `FoldMismatchError` when the folded logits stray beyond
    `TOLERANCES[dtype]`; either way nothing is written.
    """
    if dtype not in TOLERANCES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of: {', '.join(TOLERANCES)}")
    out = Path(out)
    check_replaceable_output(out, [base, adapter], (CARD_COMMAND,), "a folded model")
    # float32 for the fold itself: merging into a 16-bit base would round W + BA twice.
    loaded = load_with_adapter(base, adapter, dtype="float32", device="cpu")
    peft_model, files, vlm = loaded.model, loaded.files, loaded.processor is not None
    base_model = cast(PreTrainedModel, peft_model.get_base_model())
    inputs = _fold_check_inputs(base_model, loaded.tokenizer, list(check_prompts or DEFAULT_CHECK_TEXTS), vlm)
    reference = model_logits(peft_model, inputs)
    with peft_model.disable_adapter():
        base_logits = model_logits(peft_model, inputs)
    try:
        # safe_merge: peft checks each merged weight for NaN before it replaces the original.
        folded = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise FoldMismatchError(f"folding {adapter} into {base} failed: {first_line(exc)}") from None
    folded.eval()

    target = DTYPES[dtype]
    if target != torch.float32:
        # Compare the weights as they will be saved, upcast and run in float32: the check then measures the fold
        # and the storage rounding, not the 16-bit kernels of whatever device later runs the model.
        folded.to(target)
        _check_finite_weights(folded, dtype)
        folded.to(torch.float32)
    candidate = model_logits(folded, inputs)
    diff = compare_logits(reference, candidate)
    check = LogitCheck(
        inputs=len(inputs),
        tokens=sum(map(_input_tokens, inputs)),
        images=sum(map(_has_image, inputs)),
        max_abs_diff=diff.max_abs,
        relative_error=diff.relative,
        position_error_p90=grouped_p90(reference, candidate, inputs),
        tolerance=TOLERANCES[dtype],
        adapter_effect=grouped_p90(base_logits, reference, inputs),
    )
    if not check.passed:
        raise FoldMismatchError(
            f"the folded model does not reproduce {base} + {adapter}: its logits are off by "
            f"{check.position_error_p90:.3g} (relative, 90th percentile of positions), above the {dtype} tolerance "
            f"{check.tolerance:g}; nothing was written"
        )
    folded.to(target)  # exact: every value came from `target` in the first place

    parameters = count_parameters(folded)
    card = _card(base, files, dtype, folded, check, parameters, vision=vlm)
    with staged_dir(out) as tmp:
        folded.save_pretrained(str(tmp))
        (loaded.processor or loaded.tokenizer).save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return FoldReport(out=out, dtype=dtype, parameters=parameters, check=check)


def _fold_check_inputs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], vlm: bool
) -> list[CheckInput]:
    """`check_inputs`, and for a VLM (`vlm`) one more: an image, then the first text."""
    if not vlm:
        return [*check_inputs(tokenizer, texts, embedding_rows(model))]
    ids = check_inputs(tokenizer, texts, embedding_rows(model), reserved=[model.config.image_token_id])
    return [*ids, image_check_input(model.config, ids[0])]


def _check_finite_weights(model: PreTrainedModel, dtype: str) -> None:
    # float16 tops out at 65504: a larger folded weight becomes inf and the model would be silently broken.
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise FoldMismatchError(
                f"folded weight {name} does not fit in {dtype} (it overflows to infinity); fold to bfloat16 or float32"
            )


def _card(
    base: str,
    files: AdapterFiles,
    dtype: str,
    model: PreTrainedModel,
    check: LogitCheck,
    parameters: int,
    *,
    vision: bool,
) -> str:
    raw = files.raw_config
    settings = {key: raw[key] for key in _CARD_SETTINGS if raw.get(key) is not None}
    adapter_files = [files.path / ADAPTER_WEIGHTS, files.path / ADAPTER_CONFIG]
    local_base = Path(base).exists()
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        # The Hub's base_model field takes a Hub id; a local folder is recorded under `seshu` only.
        **({} if local_base else {"base_model": base}),
        "tags": ["seshu", model.config.model_type, "folded-adapter"],
        "seshu": {
            "command": CARD_COMMAND,
            "dtype": dtype,
            "parameters": parameters,
            "base": base,
            "adapter": {
                "path": str(files.path),
                "sha256": {p.name: sha256_file(p) for p in adapter_files},
                "trained_on": raw.get("base_model_name_or_path"),
                **settings,
            },
            "check": check.to_dict(),
            "inputs": describe_inputs([base, *map(str, adapter_files)]),
        },
    }
    images = f", {check.images} with an image" if check.images else ""
    body = (
        f"`{base}` with the adapter `{files.path}` folded into its weights ({parameters:,} parameters, {dtype}), "
        "made with `seshu adapters fold`.\n\n"
        f"Check: on {check.inputs} inputs ({check.tokens} tokens{images}) the folded model's logits differ from the "
        f"base model with the unmerged adapter (float32) by at most {check.max_abs_diff:.3g} "
        f"(relative error {check.relative_error:.3g} overall, {check.position_error_p90:.3g} at the 90th percentile "
        f"of positions; tolerance for {dtype}: {check.tolerance:g}). The adapter itself moves the logits by "
        f"{check.adapter_effect:.3g} (relative, 90th percentile).\n\n"
        f"{usage_snippet(vision=vision)}"
    )
    return render_card(f"{Path(base).name} + {files.path.name}", metadata, body)
