"""Reading and applying a PEFT adapter folder the careful way: it is untrusted input.

The federation receives adapters from strangers, and every Seshu command that takes one (`adapters fold`, `merge`,
`generate`/`chat --adapter`, `eval perplexity|generate --adapter`) reads it here: files within a size limit,
safetensors only, a config that peft understands field by field, finite values, and (in `apply_adapter`) every
tensor matched by name and shape against what the config makes of the base, so that an adapter for another base
fails with the tensor's name before anything is computed or written. `load_with_adapter` is the whole path from
two folders to a model in eval mode, a text model or a VLM (`seshu vlm build`'s LLaVA, with its processor);
`load_adapter` applies an adapter to a model already loaded.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from seshu.errors import UserError, first_line

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import LlavaProcessor, PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Largest files read, checked before reading. A LoRA adapter of rank 64 on every projection of a 7B model is
# ~0.6 GB in float32, so 4 GiB leaves room for big bases and high ranks while refusing a file that would fill
# memory; a config is a few hundred bytes of JSON. The federation passes its policy's own, smaller limit.
MAX_WEIGHTS_BYTES = 4 << 30
MAX_CONFIG_BYTES = 1 << 20
# Task types that wrap a causal LM the way `seshu sft` trains it; others (classification heads) do not apply here.
_CAUSAL_TASK_TYPES = (None, "CAUSAL_LM")
# The parts of transformers' LLaVA: an adapter trained on a VLM names its tensors under them (LoRA on the LM under
# `language_model`, a trained projector under `multi_modal_projector`), one trained on a text model never does.
# peft records the base's class only for adapters without a task type, so the names are what tells the two apart.
_VLM_PARTS = frozenset({"language_model", "multi_modal_projector", "vision_tower"})
# What `LlavaProcessor.save_pretrained` writes besides the tokenizer (the second is the older layout's).
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_adapter_dir(path: str | Path) -> bool:
    """True for a local folder that holds a PEFT adapter config (a model folder has config.json instead)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter folder: its parsed config (raw and as peft's config) and its tensors."""

    path: Path
    raw_config: dict[str, Any]
    config: PeftConfig
    tensors: dict[str, torch.Tensor]


def read_adapter(path: str | Path, *, max_bytes: int | None = None) -> AdapterFiles:
    """The config and tensors of a PEFT adapter folder, checked before any model is touched.

    Refuses a folder without adapter_model.safetensors (pickle weights can run code when loaded), files larger
    than `max_bytes` (the weights; default `MAX_WEIGHTS_BYTES`) or `MAX_CONFIG_BYTES` (the config) before
    reading them, a config that is not JSON or has fields this peft does not know (they could change what the
    adapter computes), adapters that are not weight deltas (prompt learning), and tensors that are empty, not
    floating point or not finite.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: adapter directory not found")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        extra = f" (only {', '.join(pickles)}: pickle files can run code, so Seshu loads safetensors only)"
        raise UserError(f"{path}: no {ADAPTER_WEIGHTS}{extra if pickles else ''}")
    # Both sizes first: a config within its limit is no reason to start on weights that are over theirs.
    _check_size(config_path, MAX_CONFIG_BYTES)
    _check_size(weights, MAX_WEIGHTS_BYTES if max_bytes is None else max_bytes)
    raw = _read_config_json(config_path)
    config = _peft_config(raw, config_path)
    tensors = _read_tensors(weights)
    return AdapterFiles(path=path, raw_config=raw, config=config, tensors=tensors)


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{path}: is {size:,} bytes, over the limit of {limit:,} bytes; it was not read")


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _peft_config(raw: dict[str, Any], where: Path) -> PeftConfig:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # seconds to import: only when an adapter is read

    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UserError(f"{where}: peft_type {peft_type!r} is not an adapter type peft knows")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    # peft drops unknown fields with a warning; a field from a newer peft may change the adapter's math, so a
    # fold that ignored it would write a model that is not what was trained.
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"{where}: field '{unknown[0]}' is unknown to {config_class.__name__} in this peft; upgrade peft "
            "to the version that saved the adapter"
        )
    try:
        config = config_class.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: not a valid {peft_type} config: {first_line(exc)}") from None
    if config.is_prompt_learning:
        raise UserError(f"{where}: a {peft_type} adapter adds prompt tokens, not weights, so it cannot be folded")
    task_type = None if config.task_type is None else str(getattr(config.task_type, "value", config.task_type))
    if task_type not in _CAUSAL_TASK_TYPES:
        raise UserError(f"{where}: task_type {task_type} is not a causal language model adapter")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise UserError(f"{path}: tensor {name} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {name} holds NaN or infinite values")
    return tensors


def check_adapter_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor the adapter's config implies for this base (`expected`, name -> shape) must be in the file
    (`found`) with the same shape. Names only in the file are left to peft, which knows older layouts."""
    for name, shape in expected.items():
        if name not in found:
            raise UserError(f"{where}: has no tensor {name}, which its config asks for; the file is incomplete")
        if found[name] != shape:
            raise UserError(
                f"{where}: tensor {name} has shape {list(found[name])} but the base model needs {list(shape)}; "
                "the adapter was trained on another base model"
            )


# --------------------------------------------------------------------------------------------------
# Applying an adapter to its base


def apply_adapter(model: PreTrainedModel, files: AdapterFiles, base: str) -> PeftModel:
    """`model` (the base `base`, a folder or Hub id, named in errors) with the checked adapter `files` applied,
    unmerged (the forward pass it was trained with), in eval mode, after matching every tensor against the base.

    peft wraps `model`'s own modules in place: to use the bare base again, `unload()` the result."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # seconds to import

    where = str(files.path)
    mapping = files.raw_config.get("auto_mapping")
    trained_on = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if trained_on and trained_on != type(model).__name__:
        raise UserError(
            f"{where}: the adapter was trained on a {trained_on}, but {base} is a {type(model).__name__}; "
            "give the base model it was trained on"
        )
    try:
        with warnings.catch_warnings():
            # The adapter's recorded base path rarely matches this machine's; cards keep it as `trained_on`.
            warnings.filterwarnings("ignore", message=r".*base_model_name_or_path.*was renamed")
            peft_model = get_peft_model(model, files.config)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        # e.g. "Target modules {'c_attn'} not found in the base model": the adapter is for another architecture;
        # IndexError: trainable_token_indices beyond the base's vocabulary.
        raise UserError(f"{where}: does not fit {base}: {first_line(exc)}") from None
    # save_embedding_layers=False: "auto" would ask the Hub whether the vocabulary was resized.
    expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    check_adapter_tensors(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in files.tensors.items()}, where
    )
    try:
        # peft's annotation says a bare namedtuple; it is torch's _IncompatibleKeys.
        result: Any = set_peft_model_state_dict(peft_model, files.tensors)
    except RuntimeError as exc:  # shape mismatches in tensors peft placed itself
        raise UserError(f"{where}: does not fit {base}: {first_line(exc)}") from None
    if result.unexpected_keys:
        extra = sorted(set(files.tensors) - set(expected)) or list(result.unexpected_keys)
        raise UserError(f"{where}: tensor {extra[0]} belongs to no module of {base}; the adapter is for another base")
    peft_model.eval()
    return peft_model


def load_adapter(model: PreTrainedModel, path: str | Path, base: str, *, max_bytes: int | None = None) -> PeftModel:
    """The adapter folder `path`, read and checked (`read_adapter`), applied to the loaded base `model` (named
    `base` in errors) by `apply_adapter`: unmerged, in eval mode."""
    return apply_adapter(model, read_adapter(path, max_bytes=max_bytes), base)


def _trained_on_vlm(files: AdapterFiles) -> bool:
    """Whether the adapter's tensors are named after a LLaVA model's parts (see `_VLM_PARTS`)."""
    return any(not _VLM_PARTS.isdisjoint(name.split(".")) for name in files.tensors)


def check_adapter_kind(files: AdapterFiles, vlm: bool, base: str) -> None:
    """An adapter trained on a VLM needs a VLM base (`vlm`), one trained on a text model a text model: the other
    way round no tensor name would match, and the error would not say why."""
    if _trained_on_vlm(files) == vlm:
        return
    trained, given = ("a text model", "a VLM") if vlm else ("a VLM", "a text model")
    raise UserError(
        f"{files.path}: the adapter was trained on {trained}, but {base} is {given}; "
        "give the base model it was trained on"
    )


@dataclass(frozen=True)
class LoadedAdapter:
    """A base model with an adapter applied, the tokenizer to use with it, and the adapter's checked files; for
    a VLM base also its processor (whose tokenizer `tokenizer` is), None for a text model."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    files: AdapterFiles
    processor: LlavaProcessor | None = None


def load_with_adapter(
    base: str,
    adapter: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = None,
    max_bytes: int | None = None,
) -> LoadedAdapter:
    """The model `base` (folder or Hub id; `dtype`, `device` as `load_causal_lm` takes them; a VLM folder from
    `seshu vlm build` loads as LLaVA with its processor) with the adapter folder `adapter` applied by
    `apply_adapter`.

    The adapter is read and checked before the model loads, so a bad adapter, or one trained on a VLM given a
    text model or the reverse, fails in a second. An adapter folder that ships its own tokenizer (for a VLM: its
    own processor) wins over the base's, because fine-tuning may have changed its chat template; it must still
    fit the base's embeddings.
    """
    # Imported here: `seshu merge` reads adapters too, and merging needs neither transformers nor peft.
    from seshu.models.loading import check_vocab_fits, embedding_rows
    from seshu.multimodal.loading import is_vlm
    from seshu.tokenizer import load_tokenizer

    files = read_adapter(adapter, max_bytes=max_bytes)
    vlm = is_vlm(base)
    check_adapter_kind(files, vlm, base)
    model, tokenizer, processor = _load_base(base, vlm, dtype, device)
    peft_model = apply_adapter(model, files, base)
    if processor is not None and any((files.path / name).is_file() for name in _PROCESSOR_FILES):
        processor = _load_processor(files.path)
        tokenizer = processor.tokenizer
        check_vocab_fits(tokenizer, embedding_rows(model), str(files.path))
    elif processor is None and (files.path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(files.path))
        check_vocab_fits(tokenizer, embedding_rows(model), str(files.path))
    return LoadedAdapter(model=peft_model, tokenizer=tokenizer, files=files, processor=processor)


def _load_base(
    base: str, vlm: bool, dtype: str | None, device: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LlavaProcessor | None]:
    """The base model in eval mode with its tokenizer, and its processor when it is a VLM (`vlm`)."""
    from seshu.models.loading import load_causal_lm
    from seshu.multimodal.loading import load_vlm

    if not vlm:
        return (*load_causal_lm(base, dtype=dtype, device=device), None)
    model, processor = load_vlm(base, dtype=dtype)
    if device:
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to() as dtype-only
    return model.eval(), processor.tokenizer, processor


def _load_processor(path: Path) -> LlavaProcessor:
    from transformers import LlavaProcessor

    try:
        return LlavaProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the processor the adapter ships: {first_line(exc)}") from None
