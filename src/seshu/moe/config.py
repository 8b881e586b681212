"""What `seshu moe build` builds: the MoE YAML, the checks that the base and the experts can become one Mixtral
(llama or mistral family, no bias terms, one shape), and the Mixtral config they make.

The YAML keys follow mergekit-moe's (`base_model`, `gate_mode`, `dtype`, `experts_per_token`, `experts` with
`source_model`, `positive_prompts`, `negative_prompts`); `shared_weights`, `router_aux_loss_coef`, `seed` and
an expert's `name` are Seshu's own. mergekit's `shared_experts`, `noise_scale` and `residual_scale` are not
supported (unknown keys are errors), nor its `uniform_random` gate mode.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from transformers import AutoConfig, MixtralConfig, PretrainedConfig

from seshu.config import StrictModel, apply_overrides, read_yaml, validate
from seshu.errors import UserError, first_line
from seshu.models.loading import DTYPES, check_model_dir

FAMILIES = ("llama", "mistral")
# Fields that fix the shape or the arithmetic of a layer: the base and every expert must agree on all of them.
ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
)
# What the Mixtral config takes from the base config. rope_parameters matters most: Mixtral's default rope theta
# is 1e6, Llama's 1e4, and a model run with the wrong one is garbage past the first few positions.
COPIED_FIELDS = (
    *ARCH_FIELDS,
    "max_position_embeddings",
    "initializer_range",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class ExpertSpec(StrictModel):
    source_model: str
    # How `seshu moe train-router` data and the card name this expert; default: the source folder's name.
    name: str | None = None
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)


class MoEConfig(StrictModel):
    base_model: str
    experts: list[ExpertSpec]
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    # Output weights; default: the base model's dtype.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    experts_per_token: int = 2
    # Attention, embeddings and norms: the base model's, or the mean of the experts'.
    shared_weights: Literal["base", "average"] = "base"
    # Weight of the load-balancing loss in any later training of the MoE (see docs/guide.md); 0 switches it off.
    router_aux_loss_coef: float = Field(0.001, ge=0)
    # mergekit's output architecture key: only Mixtral here.
    architecture: str | None = None
    seed: int = 0  # for gate_mode random


def load_moe_config(path: str | Path, overrides: list[str] | None = None) -> MoEConfig:
    """Read, override (`--set key=value`) and validate a MoE YAML file."""
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    config: MoEConfig = validate(MoEConfig, raw, str(path))
    check_config(config, str(path))
    return config


def expert_names(config: MoEConfig) -> list[str]:
    return [e.name or Path(e.source_model.rstrip("/")).name for e in config.experts]


def check_config(config: MoEConfig, source: str) -> None:
    """What pydantic cannot say: counts, names and prompts that make a working router."""
    n = len(config.experts)
    if n < 2:
        raise UserError(f"{source}: 'experts' lists {n} model(s); a mixture needs at least two")
    if not 1 <= config.experts_per_token <= n:
        raise UserError(
            f"{source}: experts_per_token is {config.experts_per_token}, but with {n} experts it must be 1 to {n}"
        )
    if config.architecture is not None and not config.architecture.lower().startswith("mixtral"):
        raise UserError(f"{source}: architecture '{config.architecture}' is not supported; Seshu builds Mixtral")
    names = expert_names(config)
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(
                f"{source}: experts[{names.index(name)}] and experts[{i}] are both named '{name}'; give each a "
                "distinct 'name'"
            )
    for i, expert in enumerate(config.experts):
        for key in ("positive_prompts", "negative_prompts"):
            for j, prompt in enumerate(getattr(expert, key)):
                if not prompt.strip():
                    raise UserError(f"{source}: experts[{i}].{key}[{j}] is blank")
    if config.gate_mode == "random":
        return
    for i, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise UserError(
                f"{source}: experts[{i}] ({expert.source_model}) has no positive_prompts, which gate_mode "
                f"'{config.gate_mode}' needs; give a few prompts of what it should handle, or use gate_mode random"
            )
    prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in config.experts}
    if len(prompts) == 1:
        raise UserError(
            f"{source}: every expert has the same prompts, so every router row would be the same; give each "
            "expert prompts of what it should handle"
        )


# --------------------------------------------------------------------------------------------------
# Model configs


def read_source_config(ref: str, role: str) -> PretrainedConfig:
    """The config of one input model, refusing what cannot become part of a Mixtral."""
    check_model_dir(ref)
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{role} {ref}: cannot read its config ({first_line(exc)})") from None
    if config.model_type not in FAMILIES:
        raise UserError(
            f"{role} {ref} is a '{config.model_type}' model; MoE assembly takes llama or mistral models, whose "
            "attention, norms and SwiGLU MLP are Mixtral's"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UserError(
                f"{role} {ref} has {flag}: true; Mixtral's layers have no bias terms, so it cannot become one"
            )
    return config


def check_same_architecture(base: PretrainedConfig, other: PretrainedConfig, role: str, ref: str) -> None:
    if other.model_type != base.model_type:
        raise UserError(
            f"{role} {ref} is a {other.model_type} model but base_model is a {base.model_type} model; every "
            "expert must have the base model's architecture"
        )
    for name in ARCH_FIELDS:
        mine, theirs = getattr(other, name, None), getattr(base, name, None)
        if mine != theirs:
            raise UserError(
                f"{role} {ref}: {name} is {mine!r} but base_model's is {theirs!r}; every expert must have the "
                "base model's architecture"
            )


def mixtral_config(
    base: PretrainedConfig, num_experts: int, experts_per_token: int, router_aux_loss_coef: float
) -> MixtralConfig:
    """The Mixtral config of the assembled model: the base's shape, position encoding and token ids.

    `output_router_logits` is on whenever the aux loss is, because transformers adds the load-balancing loss
    to the training loss only when the router logits are returned.
    """
    fields: dict[str, Any] = {name: copy.deepcopy(getattr(base, name, None)) for name in COPIED_FIELDS}
    return MixtralConfig(
        **fields,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        router_aux_loss_coef=router_aux_loss_coef,
        output_router_logits=router_aux_loss_coef > 0,
        router_jitter_noise=0.0,
        architectures=["MixtralForCausalLM"],
    )


def dtype_name(config: PretrainedConfig) -> str:
    dtype = getattr(config, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"
