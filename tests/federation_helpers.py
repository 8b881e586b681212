"""Test-only builders for the federation's tests: tiny release folders and random LoRA adapters of them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from seshu.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
}  # fmt: skip
DEFAULT_TARGETS = ("q_proj", "v_proj", "down_proj")


def save_tiny_base(out: Path, seed: int = 0, **config: Any) -> Path:
    """A tiny LlamaForCausalLM (TINY_LLAMA with `config` over it), seeded, saved as a release folder (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config})).save_pretrained(str(out))
    return out


def save_lora_adapter(
    base_dir: Path,
    out: Path,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    targets: Sequence[str] = DEFAULT_TARGETS,
    b_std: float = 0.01,
    **settings: Any,
) -> Path:
    """A LoRA adapter of `base_dir` saved by peft, with seeded factors: A as peft initialises it and B (zero at
    initialisation, which would make every update zero) filled with randn * `b_std`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM", **settings)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    # peft would also save the whole embedding matrix of an adapted embedding (save_embedding_layers="auto"),
    # which is not a LoRA factor: these builders make plain LoRA adapters only.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


def edit_adapter_config(folder: Path, **changes: Any) -> None:
    """Change fields of a saved adapter's adapter_config.json (None removes a field)."""
    path = folder / ADAPTER_CONFIG
    raw = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")


def edit_adapter_tensor(folder: Path, fragment: str, value: float) -> str:
    """Set every value of the first adapter tensor whose name contains `fragment`; its name."""
    path = folder / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if fragment in n)
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def lora_delta(folder: Path, weight: str) -> torch.Tensor:
    """scale * B @ A of one base weight, by hand from the saved adapter (float32), for checking."""
    raw = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    module = weight.removesuffix(".weight")
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    return (b @ a) * (raw["lora_alpha"] / raw["r"])
