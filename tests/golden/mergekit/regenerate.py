"""Rebuild the mergekit golden outputs that tests/test_merge_golden.py compares `seshu merge` against.

    python -m venv --system-site-packages /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit==0.1.5
    python tests/golden/mergekit/regenerate.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

(`pip install --dry-run mergekit==0.1.5` in such a venv adds only mergekit, immutables and sentencepiece: it
keeps this environment's torch and transformers.) Writes, next to this script:

- inputs/base, inputs/one, inputs/two: seeded tiny llamas (hidden 8, 2 layers; config.json, model.safetensors);
- <case>.yaml: one merge config per case (paths relative to this folder);
- <case>.safetensors: mergekit's merged tensors for that config.

Only deterministic merges are here: DARE draws its mask from torch's generator in mergekit and from a seeded
per-chunk numpy one in Seshu, so its cases keep density 1 (the rescale and sign-election rules without a draw).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
LLAMA = {
    "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "max_position_embeddings": 32, "tie_word_embeddings": False,
}  # fmt: skip
BASE, ONE, TWO = "inputs/base", "inputs/one", "inputs/two"
RANKED = [
    {"model": ONE, "parameters": {"weight": 0.6, "density": 0.4}},
    {"model": TWO, "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.5}], "density": 0.7}},
]
CASES: dict[str, dict[str, Any]] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": BASE, "parameters": {"weight": [0.2, 0.5]}},
            {"model": ONE, "parameters": {"weight": 0.3}},
            {"model": TWO, "parameters": {"weight": 0.7}},
        ],
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": [{"model": ONE, "parameters": {"weight": 0.5}}, {"model": TWO, "parameters": {"weight": 0.25}}],
        "parameters": {"normalize": False},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": [{"model": ONE, "parameters": {"weight": [0.3, 1.0]}}, {"model": TWO, "parameters": {"weight": 0.7}}],
        "parameters": {"lambda": 0.9},
    },
    "task_arithmetic_normalized": {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": [{"model": ONE, "parameters": {"weight": 0.3}}, {"model": TWO, "parameters": {"weight": 0.9}}],
        "parameters": {"normalize": True},
    },
    "ties": {"merge_method": "ties", "base_model": BASE, "models": RANKED},
    "ties_unnormalized": {
        "merge_method": "ties",
        "base_model": BASE,
        "models": RANKED,
        "parameters": {"normalize": False, "lambda": 1.5},
    },
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": BASE,
        "models": [{"model": ONE, "parameters": {"weight": 0.6}}, {"model": TWO, "parameters": {"weight": 0.5}}],
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": BASE,
        "models": [{"model": ONE, "parameters": {"weight": 0.6}}, {"model": TWO, "parameters": {"weight": 0.5}}],
        "parameters": {"normalize": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": BASE,
        "models": [
            {"model": ONE, "parameters": {"weight": 0.6, "density": 0.4, "gamma": 0.05}},
            {"model": TWO, "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.1}},
        ],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": BASE,
        "models": [
            {"model": ONE, "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.1}},
            {"model": TWO, "parameters": {"weight": 0.8, "density": 0.6, "gamma": 0.05}},
        ],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": BASE,
        "models": [{"model": BASE}, {"model": ONE}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
    },
}


def build_inputs(seed: int = 0) -> None:
    """A seeded random llama and two variants of it (base + seeded noise), every tensor drawn here."""
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        base = {name: p.clone() for name, p in model.named_parameters()}
        for folder in (BASE, ONE, TWO):
            if folder != BASE:
                for name, param in model.named_parameters():
                    param.copy_(base[name] + torch.randn(param.shape, generator=generator) * 0.1)
            shutil.rmtree(HERE / folder, ignore_errors=True)
            model.save_pretrained(str(HERE / folder))
            (HERE / folder / "generation_config.json").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit's mergekit-yaml")
    args = parser.parse_args()
    if not args.mergekit:
        parser.error("mergekit-yaml not found; pass --mergekit PATH")
    build_inputs()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, case in CASES.items():
        config = {**case, "dtype": "float32"}
        (HERE / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        with tempfile.TemporaryDirectory() as tmp:
            # mergekit takes a relative path for a Hub id, so it gets this config with absolute ones.
            absolute = yaml.safe_dump(config).replace("inputs/", f"{HERE}/inputs/")
            (Path(tmp) / "config.yaml").write_text(absolute, encoding="utf-8")
            command = [args.mergekit, str(Path(tmp) / "config.yaml"), str(Path(tmp) / "out"), "--no-copy-tokenizer"]
            subprocess.run(command, env=env, check=True, capture_output=True)
            shutil.copy(Path(tmp) / "out" / "model.safetensors", HERE / f"{name}.safetensors")
        print(f"{name}: {(HERE / f'{name}.safetensors').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
