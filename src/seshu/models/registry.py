"""Architectures Seshu can build from scratch: name -> transformers config class, size presets, LoRA targets.

Every model is a stock transformers model built from its config, so a trained directory loads with plain
`AutoModelForCausalLM.from_pretrained`. Adding an architecture is one `ArchSpec` entry below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    MixtralConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from seshu.errors import UserError
from seshu.models.fast_paths import use_fast_paths


@dataclass(frozen=True)
class ArchSpec:
    name: str
    config_class: type[PretrainedConfig]
    # preset name -> config fields; the vocabulary and special-token ids come from the tokenizer.
    presets: dict[str, dict[str, Any]]
    # Fields every model of this arch gets, whatever the preset.
    fixed: dict[str, Any] = field(default_factory=dict)
    # Default LoRA targets (module names, and fused 3-D parameters that are not nn.Linear).
    lora_modules: tuple[str, ...] = ()
    lora_parameters: tuple[str, ...] = ()
    # Whether samples packed into one row stay apart (attention masks by position ids); a state-space model
    # carries its state from one packed sample into the next.
    packs_apart: bool = True
    # Linear layers QLoRA must leave unquantized: the model reads their weights directly, not through a call.
    qlora_skip_modules: tuple[str, ...] = ()
    # Name of the config field holding the context length (state-space models have none).
    context_field: str | None = "max_position_embeddings"


_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Presets aim at: tiny ~1M parameters (tests), small 5-10M (a CPU can pretrain it), base ~100M, 1b ~1B, with
# an 8k-32k vocabulary. Attention heads are 64 wide at small and up, the usual sweet spot for SDPA kernels.
# Every MLP width is a multiple of 64, as in real models: matmul kernels run best on such widths, and
# bitsandbytes' CPU 4-bit inference kernel takes nothing else.
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        name="llama",
        config_class=LlamaConfig,
        presets={
            "tiny": dict(
                hidden_size=64,
                intermediate_size=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
            "small": dict(
                hidden_size=256,
                intermediate_size=704,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            ),
            "base": dict(
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                tie_word_embeddings=False,
            ),
            "1b": dict(
                hidden_size=2048,
                intermediate_size=8192,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                tie_word_embeddings=True,
            ),
        },
        lora_modules=(*_ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj"),
    ),
    "mixtral": ArchSpec(
        name="mixtral",
        config_class=MixtralConfig,
        # Experts are half as wide as the llama preset's MLP: with top-2 routing the active parameters match.
        presets={
            "tiny": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                tie_word_embeddings=True,
            ),
            "small": dict(
                hidden_size=256,
                intermediate_size=384,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=8,
                num_experts_per_tok=2,
                tie_word_embeddings=True,
            ),
            "base": dict(
                hidden_size=768,
                intermediate_size=1024,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                num_local_experts=8,
                num_experts_per_tok=2,
                tie_word_embeddings=False,
            ),
            "1b": dict(
                hidden_size=2048,
                intermediate_size=4096,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                num_local_experts=8,
                num_experts_per_tok=2,
                tie_word_embeddings=True,
            ),
        },
        # The router's load-balancing loss is part of the training loss only when router logits are returned.
        fixed=dict(output_router_logits=True, router_aux_loss_coef=0.01),
        lora_modules=_ATTENTION_TARGETS,
        # transformers 5 fuses each layer's experts into 3-D parameters, which are not nn.Linear modules.
        lora_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    "mamba": ArchSpec(
        name="mamba",
        config_class=MambaConfig,
        presets={
            "tiny": dict(hidden_size=64, num_hidden_layers=2, state_size=16),
            "small": dict(hidden_size=256, num_hidden_layers=8, state_size=16),
            "base": dict(hidden_size=768, num_hidden_layers=24, state_size=16),
            "1b": dict(hidden_size=2048, num_hidden_layers=48, state_size=16),
        },
        # Seshu trains and evaluates with its own chunked scan (`build_model`, `load_causal_lm`: see
        # seshu.models.mamba); this flag is for the saved model loaded without Seshu, where mambapy's parallel
        # scan is ~19x faster than transformers' sequential one on a CPU. The CUDA kernels, where installed, win.
        fixed=dict(use_mambapy=True, tie_word_embeddings=True),
        # peft refuses out_proj and conv1d, and a LoRA on dt_proj is skipped by the CPU forward pass yet folded
        # by merge_and_unload, so only in_proj and x_proj train and fold faithfully.
        lora_modules=("in_proj", "x_proj"),
        qlora_skip_modules=("dt_proj",),  # its forward computes `dt_proj.weight @ x`
        packs_apart=False,
        context_field=None,
    ),
    "mamba2": ArchSpec(
        name="mamba2",
        config_class=Mamba2Config,
        presets={
            "tiny": dict(
                hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16, n_groups=1, chunk_size=64
            ),
            "small": dict(
                hidden_size=256, num_hidden_layers=8, num_heads=8, head_dim=64, state_size=64, n_groups=1, chunk_size=64
            ),
            "base": dict(
                hidden_size=768,
                num_hidden_layers=24,
                num_heads=24,
                head_dim=64,
                state_size=128,
                n_groups=1,
                chunk_size=256,
            ),
            "1b": dict(
                hidden_size=2048,
                num_hidden_layers=48,
                num_heads=64,
                head_dim=64,
                state_size=128,
                n_groups=1,
                chunk_size=256,
            ),
        },
        fixed=dict(tie_word_embeddings=True, expand=2),
        lora_modules=("in_proj",),
        packs_apart=False,
        context_field=None,
    ),
    "phi": ArchSpec(
        name="phi",
        config_class=PhiConfig,
        presets={
            "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
            "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
            "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32),
        },
        # Phi-2's choices: rotary embeddings on part of each head, no key/value grouping. Phi-2 rotates 32 of its
        # 80 head dimensions (0.4); on the 64-wide heads here 0.4 would mean 25.6, which transformers' Phi floors
        # to an odd 25 and cannot rotate, so half of each head (32 dimensions, as in Phi-2) rotates.
        fixed=dict(partial_rotary_factor=0.5, tie_word_embeddings=False),
        lora_modules=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    ),
}


# Config fields that hold the context length, in the order transformers' architectures use them.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def model_context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position encoding was built for, or None if it has no limit (a
    state-space model such as Mamba). A composite model (a VLM) has it in its language model's sub-config."""
    config = config.get_text_config()
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise UserError(f"unknown model arch '{name}'; choose one of: {', '.join(ARCHS)}") from None


def get_preset_arch(arch: str, preset: str) -> ArchSpec:
    """The spec of `arch`, after checking it has `preset`."""
    spec = get_arch(arch)
    if preset not in spec.presets:
        raise UserError(f"unknown preset '{preset}' for arch '{arch}'; choose one of: {', '.join(spec.presets)}")
    return spec


def check_overrides(spec: ArchSpec, overrides: dict[str, Any] | None) -> None:
    """Configs accept any keyword silently, so a typo would be ignored: compare with the class's own fields."""
    unknown = sorted(set(overrides or {}) - set(spec.config_class().to_dict()))
    if unknown:
        raise UserError(f"model.overrides: '{unknown[0]}' is not a field of {spec.config_class.__name__}")


def build_config(
    arch: str,
    preset: str,
    *,
    vocab_size: int,
    context_length: int,
    special_token_ids: dict[str, int | None],
    overrides: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """A fresh config for `arch` at `preset` size, sized to the tokenizer and context length."""
    spec = get_preset_arch(arch, preset)
    fields: dict[str, Any] = {**spec.presets[preset], **spec.fixed, "vocab_size": vocab_size}
    fields.update({f"{k}_token_id": v for k, v in special_token_ids.items() if v is not None})
    if spec.context_field:
        fields[spec.context_field] = context_length
    fields.update(overrides or {})
    check_overrides(spec, overrides)
    try:
        config = spec.config_class(**fields)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model.overrides for arch '{arch}' are not valid: {exc}") from None
    return config


def build_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM for `config` (seeded, so runs are reproducible)."""
    import torch

    torch.manual_seed(seed)
    # Seshu's chunked selective scan for Mamba, its experts under autocast for a MoE; still a plain transformers model.
    return use_fast_paths(AutoModelForCausalLM.from_config(config))


def arch_of(config: PretrainedConfig) -> ArchSpec | None:
    """The registered arch of a loaded model's config, if Seshu knows it."""
    return ARCHS.get(config.model_type)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
