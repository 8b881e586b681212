"""Mixture of experts from dense experts: `seshu moe build` turns a base and N dense llama/mistral models into
one Mixtral model.

The attention, embeddings and norms come from the base (or, with `shared_weights: average`, from the mean of
the experts); each expert's SwiGLU MLP becomes one expert of every layer, unchanged; each layer's router
starts from gate vectors computed as `seshu.moe.router` describes. So when the router picks expert i
alone, the MoE block computes exactly expert i's dense MLP: the build checks that for every layer and expert
before it writes anything.

In transformers 5 a Mixtral layer holds its experts fused, `mlp.experts.gate_up_proj [E, 2I, H]` (each
expert's gate_proj rows, then its up_proj rows) and `mlp.experts.down_proj [E, H, I]`, with the router at
`mlp.gate.weight [E, H]`; `save_pretrained` writes the per-expert checkpoint layout (`w1`, `w2`, `w3`) that
every Mixtral loader reads.

The YAML and the checks of the inputs are in `seshu.moe.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seshu.errors import UserError, first_line
from seshu.hub.card import check_replaceable_output, describe_model, render_card, usage_snippet
from seshu.io import staged_dir
from seshu.models.loading import DTYPES, check_vocab_fits
from seshu.models.registry import count_parameters
from seshu.moe import router as moe_router
from seshu.moe.config import (
    MoEConfig,
    check_config,
    check_same_architecture,
    dtype_name,
    expert_names,
    mixtral_config,
    read_source_config,
)
from seshu.tokenizer import load_tokenizer

CARD_COMMAND = "moe build"
# The per-expert check compares two float32 computations of the same MLP; they agree to rounding (~1e-7).
EXPERT_CHECK_TOLERANCE = 1e-5
EXPERT_CHECK_TOKENS = 16
# Above this cosine two experts' gate rows send nearly the same tokens to both.
SIMILAR_GATES = 0.99


class MoEAssemblyError(RuntimeError):
    """The assembled MoE does not reproduce an expert's MLP: a bug, not bad input (exit 1)."""


@dataclass(frozen=True)
class BuildReport:
    out: Path | None  # None until written
    num_experts: int
    experts_per_token: int
    gate_mode: str
    dtype: str
    parameters: int
    active_parameters: int
    expert_check_error: float  # largest relative error of a forced-routing MoE block vs its dense expert MLP
    gate_max_cosine: list[float]  # per layer, the closest two experts' gate rows
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Tensor math (pure)


def fuse_expert_mlp(
    gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense SwiGLU MLP as one Mixtral expert: gate_up [2I, H] (gate rows first) and down [H, I]."""
    return torch.cat([gate_proj, up_proj], dim=0), down_proj


def is_expert_parameter(name: str) -> bool:
    """Whether a Mixtral parameter belongs to the experts or the router (else attention, embedding or norm)."""
    return ".mlp." in name


def expert_parameters(config: PretrainedConfig) -> int:
    """Parameters of one expert across all layers."""
    return int(config.num_hidden_layers * 3 * config.hidden_size * config.intermediate_size)


@torch.no_grad()
def check_expert(moe: MixtralForCausalLM, dense: PreTrainedModel, expert: int, seed: int = 0) -> float:
    """Largest relative error, over layers, of the MoE experts routed all to `expert` with weight 1 against the
    dense model's MLP, on seeded random hidden states."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for moe_layer, dense_layer in zip(moe.model.layers, dense.model.layers, strict=True):
        x = torch.randn(EXPERT_CHECK_TOKENS, moe.config.hidden_size, generator=generator)
        reference = dense_layer.mlp(x)
        index = torch.full((EXPERT_CHECK_TOKENS, 1), expert, dtype=torch.long)
        routed = moe_layer.mlp.experts(x, index, torch.ones(EXPERT_CHECK_TOKENS, 1))
        worst = max(worst, float((routed - reference).norm() / reference.norm().clamp(min=1e-30)))
    return worst


# --------------------------------------------------------------------------------------------------
# Assembly


def build_moe(
    config: MoEConfig, out: str | Path, source: str = "moe config", log: Callable[[str], None] | None = None
) -> BuildReport:
    """Assemble the MoE `config` describes and write it to `out` (model, tokenizer, card), all or nothing.

    Raises `UserError` for bad input (all of it but an incomplete checkpoint before any weights are loaded) and
    `MoEAssemblyError` if an expert's MLP does not survive the move; either way nothing is written.
    """
    out = Path(out)
    check_config(config, source)
    check_replaceable_output(
        out, [config.base_model, *(e.source_model for e in config.experts)], (CARD_COMMAND,), "a MoE Seshu built"
    )
    moe, tokenizer, report = assemble_moe(config, source, log)
    report = dataclasses.replace(report, out=out)
    if log:
        log(f"writing {out}")
    write_model(out, moe, tokenizer, _card(config, report))
    return report


def assemble_moe(
    config: MoEConfig, source: str = "moe config", log: Callable[[str], None] | None = None
) -> tuple[MixtralForCausalLM, PreTrainedTokenizerBase, BuildReport]:
    """The MoE in memory (eval mode, in the output dtype), the base's tokenizer and the build's figures."""
    say = log or (lambda message: None)
    check_config(config, source)
    base_config = read_source_config(config.base_model, "base_model")
    for i, expert in enumerate(config.experts):
        role = f"experts[{i}]"
        check_same_architecture(base_config, read_source_config(expert.source_model, role), role, expert.source_model)
    dtype = config.dtype or dtype_name(base_config)
    tokenizer = load_tokenizer(config.base_model)
    check_vocab_fits(tokenizer, base_config.vocab_size, config.base_model)

    say(f"base model {config.base_model}: gate vectors ({config.gate_mode})")
    base = load_dense(config.base_model, "base_model")
    gates = compute_gates(config, base, tokenizer)
    moe = MixtralForCausalLM(
        mixtral_config(base_config, len(config.experts), config.experts_per_token, config.router_aux_loss_coef)
    ).eval()
    shared = {name: p for name, p in moe.named_parameters() if not is_expert_parameter(name)}
    dense_params = dict(base.named_parameters())
    with torch.no_grad():
        for name, param in shared.items():
            if config.shared_weights == "base":
                param.copy_(dense_params[name])
            else:
                param.zero_()
    del base, dense_params

    worst = 0.0
    for e, expert in enumerate(config.experts):
        say(f"expert {e + 1}/{len(config.experts)}: {expert.source_model}")
        dense = load_dense(expert.source_model, f"experts[{e}]")
        with torch.no_grad():
            for moe_layer, dense_layer in zip(moe.model.layers, dense.model.layers, strict=True):
                mlp = dense_layer.mlp
                gate_up, down = fuse_expert_mlp(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
                moe_layer.mlp.experts.gate_up_proj[e].copy_(gate_up)
                moe_layer.mlp.experts.down_proj[e].copy_(down)
            if config.shared_weights == "average":
                dense_params = dict(dense.named_parameters())
                for name, param in shared.items():
                    param.add_(dense_params[name], alpha=1.0 / len(config.experts))
        worst = max(worst, check_expert(moe, dense, e, seed=config.seed))
        del dense
    if not worst <= EXPERT_CHECK_TOLERANCE:
        raise MoEAssemblyError(
            f"an expert's MLP inside the MoE is off from its dense MLP by {worst:.3g} (relative, tolerance "
            f"{EXPERT_CHECK_TOLERANCE:g}); nothing was written"
        )
    with torch.no_grad():
        for moe_layer, rows in zip(moe.model.layers, gates, strict=True):
            moe_layer.mlp.gate.weight.copy_(rows)
    moe.to(DTYPES[dtype])
    _copy_generation_config(moe, config.base_model)

    cosines = moe_router.max_gate_cosine(gates)
    parameters = count_parameters(moe)
    report = BuildReport(
        out=None,
        num_experts=len(config.experts),
        experts_per_token=config.experts_per_token,
        gate_mode=config.gate_mode,
        dtype=dtype,
        parameters=parameters,
        active_parameters=parameters
        - (len(config.experts) - config.experts_per_token) * expert_parameters(base_config),
        expert_check_error=worst,
        gate_max_cosine=[c for c, _, _ in cosines],
        warnings=_warnings(config, cosines),
    )
    return moe, tokenizer, report


def load_dense(ref: str, role: str) -> PreTrainedModel:
    """A dense input model in float32, refusing a checkpoint that lacks some of the weights its config needs
    (transformers would fill them with random values and only warn)."""
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            ref, dtype=torch.float32, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{role} {ref}: cannot load the model ({first_line(exc)})") from None
    model, info = loaded
    for kind in ("missing_keys", "mismatched_keys"):
        problems = sorted(str(k) for k in info.get(kind) or [])
        if problems:
            what = "lacks" if kind == "missing_keys" else "has a wrongly shaped"
            raise UserError(f"{role} {ref}: the checkpoint {what} {problems[0]}; it does not match its config")
    return model.eval()


def compute_gates(config: MoEConfig, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The router rows of every layer, [layers, experts, hidden], as `config.gate_mode` says."""
    layers, hidden = base.config.num_hidden_layers, base.config.hidden_size
    if config.gate_mode == "random":
        return moe_router.random_gates(layers, len(config.experts), hidden, config.seed)
    prompts = [
        (
            moe_router.encode_prompts(tokenizer, e.positive_prompts),
            moe_router.encode_prompts(tokenizer, e.negative_prompts),
        )
        for e in config.experts
    ]
    bos = tokenizer.bos_token_id
    if config.gate_mode == "cheap_embed":
        embed: Any = base.get_input_embeddings().weight
        return moe_router.cheap_embed_gates(embed.detach(), prompts, bos, layers)
    return moe_router.hidden_gates(base, prompts, bos)


def _warnings(config: MoEConfig, cosines: list[tuple[float, int, int]]) -> list[str]:
    found = []
    if len({e.source_model for e in config.experts}) == 1:
        found.append("every expert is the same model: the MoE computes what that one model does, at more cost")
    close = [(layer, c, i, j) for layer, (c, i, j) in enumerate(cosines) if c > SIMILAR_GATES]
    if close and config.gate_mode != "random":
        layer, c, i, j = max(close, key=lambda item: item[1])
        names = expert_names(config)
        found.append(
            f"in {len(close)} of {len(cosines)} layers two experts' router rows nearly coincide (worst: layer "
            f"{layer}, '{names[i]}' and '{names[j]}', cosine {c:.4f}), so the router can hardly tell them apart; "
            "give more distinct prompts or run `seshu moe train-router`"
        )
    return found


# --------------------------------------------------------------------------------------------------
# Output


def _copy_generation_config(model: PreTrainedModel, base: str) -> None:
    if (Path(base) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base)


def write_model(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, card: str) -> None:
    """Model (safetensors), config, generation config, tokenizer and card, all or nothing."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise UserError(f"{name} holds values that do not fit in {param.dtype}; choose dtype float32")
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")


def _card(config: MoEConfig, report: BuildReport) -> str:
    names = expert_names(config)
    refs = [config.base_model, *(e.source_model for e in config.experts)]
    inputs: list[dict[str, str]] = []
    for ref in dict.fromkeys(refs):
        inputs.extend(describe_model(ref))
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        **({} if Path(config.base_model).exists() else {"base_model": config.base_model}),
        "tags": ["seshu", "mixtral", "moe", "merge"],
        "seshu": {
            "command": CARD_COMMAND,
            "gate_mode": config.gate_mode,
            "experts_per_token": config.experts_per_token,
            "num_experts": report.num_experts,
            "shared_weights": config.shared_weights,
            "dtype": report.dtype,
            "parameters": report.parameters,
            "active_parameters": report.active_parameters,
            "experts": [
                {"name": n, "source_model": e.source_model} for n, e in zip(names, config.experts, strict=True)
            ],
            "expert_check_error": report.expert_check_error,
            "gate_max_cosine": report.gate_max_cosine,
            "config": config.model_dump(mode="json"),
            "inputs": inputs,
        },
    }
    rows = "\n".join(
        f"| {i} | {n} | `{e.source_model}` | {len(e.positive_prompts)} |"
        for i, (n, e) in enumerate(zip(names, config.experts, strict=True))
    )
    shared = "the base model" if config.shared_weights == "base" else "the mean of the experts"
    body = (
        f"A Mixtral mixture of {report.num_experts} experts ({report.parameters:,} parameters, "
        f"{report.active_parameters:,} active per token with {config.experts_per_token} expert(s) per token, "
        f"{report.dtype}), assembled with `seshu moe build` from the dense models below. Attention, embeddings "
        f"and norms come from {shared} (`{config.base_model}`); each expert is one dense model's MLP, unchanged; "
        f"the routers start from `{config.gate_mode}` gate vectors.\n\n"
        f"| expert | name | source | positive prompts |\n|---|---|---|---|\n{rows}\n\n"
        f"Check: routed alone, each expert reproduces its dense MLP to {report.expert_check_error:.2g} (relative).\n\n"
        f"{usage_snippet()}"
    )
    return render_card(f"MoE of {', '.join(names)}", metadata, body)
