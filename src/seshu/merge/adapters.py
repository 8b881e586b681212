"""Reading a PEFT adapter folder the careful way: it is untrusted input.

The federation receives adapters from strangers, and `seshu adapters fold` and `seshu merge` read them: safetensors
only, a config that peft understands field by field, finite values, and (in `check_adapter_tensors`) every tensor
matched by name and shape against what the config makes of the base, so that an adapter for another base fails
with the tensor's name before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from seshu.errors import UserError

if TYPE_CHECKING:
    from peft import PeftConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Task types that wrap a causal LM the way `seshu sft` trains it; others (classification heads) do not apply here.
_CAUSAL_TASK_TYPES = (None, "CAUSAL_LM")


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


def read_adapter(path: str | Path) -> AdapterFiles:
    """The config and tensors of a PEFT adapter folder, checked before any model is touched.

    Refuses a folder without adapter_model.safetensors (pickle weights can run code when loaded), a config that
    is not JSON or has fields this peft does not know (they could change what the adapter computes), adapters
    that are not weight deltas (prompt learning), and tensors that are empty, not floating point or not finite.
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
    raw = _read_config_json(config_path)
    config = _peft_config(raw, config_path)
    tensors = _read_tensors(weights)
    return AdapterFiles(path=path, raw_config=raw, config=config, tensors=tensors)


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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
