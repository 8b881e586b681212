"""Builders shared by the MoE tests: small random dense llama/mistral models and MoE configs over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from seshu.moe.config import MoEConfig

CORPUS = [
    "the cat sat on the mat and the dog ran in the park.",
    "नमस्ते दुनिया, आज मौसम बहुत अच्छा है और बच्चे खेल रहे हैं।",
    "12 + 7 = 19; 30 - 4 = 26; 6 * 8 = 48.",
] * 4
NAMES = ("alpha", "beta", "gamma")
ENGLISH = ["the cat", "a dog", "the sun", "my house", "the bird", "a small boat", "the old tree", "her red coat"]
HINDI = ["नमस्ते दुनिया", "आज मौसम", "बच्चे खेल", "पानी ठंडा", "मेरा घर", "नदी बड़ी है", "किताब अच्छी", "हम स्कूल"]
NUMBERS = ["12 + 7 = 19", "30 - 4 = 26", "6 * 8 = 48", "81 / 9 = 9", "5 + 5 = 10", "7 * 7 = 49", "64 - 8", "3 + 90"]
PROMPTS = {"alpha": ENGLISH, "beta": HINDI, "gamma": NUMBERS}
# Shape of the test models: big enough weights (initializer_range) that a wrong tensor shows in the outputs.
DENSE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    initializer_range=0.3,
)


def save_dense(out: Path, tokenizer_dir: Path, seed: int, config_class: type = LlamaConfig, **overrides: Any) -> Path:
    """A random dense model (norm weights randomised too, so a norm from the wrong model shows) and its tokenizer."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(vocab_size=len(tokenizer), **ids, **{**DENSE, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_family(tokenizer_dir: Path, root: Path) -> dict[str, Path]:
    """A base and the experts alpha, beta and gamma, each a differently seeded random llama."""
    return {name: save_dense(root / name, tokenizer_dir, seed) for seed, name in enumerate(("base", *NAMES))}


def config_for(family: dict[str, Path], **changes: Any) -> MoEConfig:
    raw: dict[str, Any] = {
        "base_model": str(family["base"]),
        "experts": [{"source_model": str(family[n]), "positive_prompts": PROMPTS[n][:3]} for n in NAMES],
        "dtype": "float32",
        **changes,
    }
    return MoEConfig.model_validate(raw)


def dense(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
