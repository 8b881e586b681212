"""Loading trained models and their tokenizers from a local directory or an HF Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from seshu.errors import UserError, first_line
from seshu.hub.ids import is_hub_id
from seshu.models.fast_paths import use_fast_paths
from seshu.tokenizer import load_tokenizer

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: str | None) -> torch.dtype | str:
    """The torch dtype named `dtype` (a key of `DTYPES`), or "auto" (as saved) for None; `UserError` otherwise."""
    if dtype is None:
        return "auto"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(path: str) -> None:
    """A local model folder must exist, hold a config and safetensors weights; Hub ids pass through."""
    if is_hub_id(path):
        return  # let huggingface_hub resolve it
    local = Path(path).expanduser()
    if not local.is_dir():
        raise UserError(f"{path}: model directory not found")
    if not (local / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    if not any(local.glob("*.safetensors")):
        pickles = [p.name for p in local.glob("*.bin")]
        extra = f" (only pickle files: {', '.join(pickles)}; Seshu loads safetensors only)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{extra}")


def check_vocab_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids run past the model's embedding table would index out of range mid-run."""
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}; "
            "use the tokenizer the model was trained with"
        )


def embedding_rows(model: PreTrainedModel) -> int:
    """How many token ids the model's input embedding table holds."""
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0])


def load_causal_lm(
    path: str, *, dtype: str | None = None, device: str | None = None, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, safetensors only, in eval mode."""
    weights_dtype = torch_dtype(dtype)
    check_model_dir(path)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model: {first_line(exc)}") from None
    check_vocab_fits(tokenizer, embedding_rows(model), path)
    use_fast_paths(model)  # a Mamba's chunked scan, a MoE's experts under autocast (no-ops otherwise)
    if device:
        model = model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to() as dtype-only
    model.eval()
    return model, tokenizer


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
