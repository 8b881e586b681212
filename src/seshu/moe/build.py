"""Mixture of experts from dense experts: `seshu moe build` turns a base and N dense llama/mistral models into
one Mixtral model.

The attention, embeddings and norms come from the base (or, with `shared_weights: average`, from the mean of
the experts); each expert's SwiGLU MLP becomes one expert of every layer, unchanged; each layer's router
starts from gate vectors computed as `seshu.moe.router` describes. So when the router picks expert i
alone, the MoE block computes exactly expert i's dense MLP: the build checks that for every layer and expert
with transformers' own Mixtral expert module, and a failed check leaves nothing behind.

The build streams, as `seshu merge` does: the output is written tensor by tensor (`seshu.merge.checkpoint`'s
`ShardedWriter`) from tensors read one at a time from the inputs' safetensors files, and the `hidden` gate
vectors come from a forward of the base that holds one layer at a time (`seshu.moe.layerwise`). No model is
ever whole in memory: the peak is a few times the largest tensor (Baraat's 1.1B experts: the 262 MB embedding
table), where assembling a `MixtralForCausalLM` in float32 held ~18 GB.

The output is the published Mixtral checkpoint layout, which every Mixtral on the Hub uses and transformers'
`save_pretrained` writes: per layer `block_sparse_moe.gate.weight [E, H]` and per expert `w1` (gate_proj), `w2`
(down_proj) and `w3` (up_proj). transformers 5 fuses them on loading into `mlp.experts.gate_up_proj [E, 2I, H]`
(each expert's gate_proj rows, then its up_proj rows) and `mlp.experts.down_proj [E, H, I]`.

The YAML and the checks of the inputs are in `seshu.moe.config`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from seshu.errors import UserError
from seshu.hub.card import check_replaceable_output, describe_model, render_card, usage_snippet
from seshu.io import staged_dir
from seshu.merge.checkpoint import Checkpoint, PlannedTensor, ShardedWriter
from seshu.merge.engine import resolve_reference
from seshu.merge.methods import chunk_rows
from seshu.models.loading import DTYPES, check_vocab_fits
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
from seshu.moe.layerwise import mlp_inputs_by_layer
from seshu.tokenizer import load_tokenizer

CARD_COMMAND = "moe build"
# The per-expert check compares two float32 computations of the same MLP; they agree to rounding (~1e-7).
EXPERT_CHECK_TOLERANCE = 1e-5
EXPERT_CHECK_TOKENS = 16
# Above this cosine two experts' gate rows send nearly the same tokens to both.
SIMILAR_GATES = 0.99
# transformers' default `save_pretrained` shard size, so that the files are the ones it would write.
SHARD_BYTES = 50 * 10**9
# The Mixtral checkpoint layout (see the module docstring): a dense layer's MLP weight, the MoE block's router and
# its experts' weights, each expert weight with the dense projection it is.
DENSE_MLP = "model.layers.{layer}.mlp.{projection}.weight"
ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"
EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{weight}.weight"
EXPERT_WEIGHTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


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


def expert_parameters(config: PretrainedConfig) -> int:
    """Parameters of one expert across all layers."""
    return int(config.num_hidden_layers * 3 * config.hidden_size * config.intermediate_size)


@torch.no_grad()
def check_expert(dense_mlp: torch.nn.Module, experts: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative error of a Mixtral experts module holding one expert, every token routed to it with weight 1,
    against the dense MLP it was made from, on the hidden states `x` [tokens, hidden]."""
    reference = dense_mlp(x)
    tokens = x.shape[0]
    routed = experts(x, torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1))
    return float((routed - reference).norm() / reference.norm().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------------
# Assembly


def build_moe(
    config: MoEConfig, out: str | Path, source: str = "moe config", log: Callable[[str], None] | None = None
) -> BuildReport:
    """Assemble the MoE `config` describes and write it to `out` (model, tokenizer, card), all or nothing.

    Raises `UserError` for bad input (all of it before any tensor is written) and `MoEAssemblyError` if an
    expert's MLP does not survive the move; either way nothing is written.
    """
    say = log or (lambda message: None)
    out = Path(out)
    check_config(config, source)
    check_replaceable_output(
        out, [config.base_model, *(e.source_model for e in config.experts)], (CARD_COMMAND,), "a MoE Seshu built"
    )
    base_config = read_source_config(config.base_model, "base_model")
    for i, expert in enumerate(config.experts):
        role = f"experts[{i}]"
        check_same_architecture(base_config, read_source_config(expert.source_model, role), role, expert.source_model)
    dtype = config.dtype or dtype_name(base_config)
    tokenizer = load_tokenizer(config.base_model)
    check_vocab_fits(tokenizer, base_config.vocab_size, config.base_model)
    inputs = _Inputs.open(config, base_config)
    try:
        say(f"base model {config.base_model}: gate vectors ({config.gate_mode})")
        gates = compute_gates(config, base_config, inputs.base, tokenizer)
        say(f"writing {out}, one tensor at a time")
        return _write(config, base_config, _Assembly(config, base_config, inputs, gates), dtype, tokenizer, out)
    finally:
        inputs.close()


def _write(
    config: MoEConfig,
    base_config: PretrainedConfig,
    assembly: _Assembly,
    dtype: str,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
) -> BuildReport:
    plan = [PlannedTensor(name, DTYPES[dtype], shape) for group in assembly.groups for name, shape in group.tensors]
    with staged_dir(out) as tmp:
        writer = ShardedWriter(tmp, plan, SHARD_BYTES)
        for group in assembly.groups:
            for (name, _), value in zip(group.tensors, group.make(), strict=True):
                tensor = value.to(DTYPES[dtype])
                if not bool(torch.isfinite(tensor).all()):
                    raise UserError(f"{name} holds values that do not fit in {dtype}; choose dtype float32")
                writer.write(name, tensor)
        writer.finish()
        cosines = moe_router.max_gate_cosine(assembly.gates)
        parameters = sum(math.prod(p.shape) for p in plan)
        report = BuildReport(
            out=out,
            num_experts=len(config.experts),
            experts_per_token=config.experts_per_token,
            gate_mode=config.gate_mode,
            dtype=dtype,
            parameters=parameters,
            active_parameters=parameters
            - (len(config.experts) - config.experts_per_token) * expert_parameters(base_config),
            expert_check_error=assembly.worst,
            gate_max_cosine=[c for c, _, _ in cosines],
            warnings=_warnings(config, cosines),
        )
        moe_config = mixtral_config(
            base_config, len(config.experts), config.experts_per_token, config.router_aux_loss_coef
        )
        moe_config.dtype = DTYPES[dtype]
        moe_config.save_pretrained(str(tmp))
        _generation_config(config.base_model, moe_config).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_card(config, report), encoding="utf-8")
    return report


@dataclass
class _Inputs:
    """The input checkpoints, opened for reading a tensor at a time, each checked to hold every tensor its
    config needs with its shape (transformers would fill a missing one with random values and only warn)."""

    base: Checkpoint
    experts: list[Checkpoint]
    shapes: dict[str, tuple[int, ...]]  # every tensor of a dense model of the base's config

    @classmethod
    def open(cls, config: MoEConfig, base_config: PretrainedConfig) -> _Inputs:
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(base_config)
        shapes = {name: tuple(p.shape) for name, p in dense.named_parameters()}  # a tied lm_head is not one
        opened: dict[str, Checkpoint] = {}
        roles = [f"experts[{i}]" for i in range(len(config.experts))]
        refs = [config.base_model, *(e.source_model for e in config.experts)]
        for ref, role in zip(refs, ["base_model", *roles], strict=True):
            if ref not in opened:
                opened[ref] = _checked_checkpoint(ref, role, shapes)
        return cls(opened[config.base_model], [opened[e.source_model] for e in config.experts], shapes)

    def close(self) -> None:
        for checkpoint in (self.base, *self.experts):
            checkpoint.close()


def _checked_checkpoint(ref: str, role: str, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    checkpoint = Checkpoint(resolve_reference(ref))
    for name, shape in shapes.items():
        info = checkpoint.tensors.get(name)
        if info is None or info.shape != shape:
            what = "lacks" if info is None else "has a wrongly shaped"
            checkpoint.close()
            raise UserError(f"{role} {ref}: the checkpoint {what} {name}; it does not match its config")
    return checkpoint


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One whole tensor of a checkpoint, in float32 (the dtype the build computes in)."""
    info = checkpoint.tensors[name]
    return checkpoint.read_rows(name, 0, chunk_rows(info.shape)[0]).reshape(info.shape).float()


@dataclass(frozen=True)
class _Group:
    """Output tensors made together: their names and shapes, and the function that gives their float32 values."""

    tensors: list[tuple[str, tuple[int, ...]]]
    make: Callable[[], list[torch.Tensor]]


class _Assembly:
    """The MoE's tensors in writing order (`groups`), each made when its turn comes, and the per-expert check, run
    on each expert's MLP of each layer as it is read (`worst`: the largest error so far)."""

    def __init__(self, config: MoEConfig, base_config: PretrainedConfig, inputs: _Inputs, gates: torch.Tensor):
        self.config, self.inputs, self.gates = config, inputs, gates
        self.worst = 0.0
        # Modules of the right classes and sizes on the meta device; the check loads one expert's weights into
        # copies of them. The Mixtral experts module holds a single expert, so the check's memory is one MLP.
        single = mixtral_config(base_config, 1, 1, 0.0)
        single.num_hidden_layers = 1
        with torch.device("meta"):
            self._dense_mlp = AutoModelForCausalLM.from_config(base_config).model.layers[0].mlp
            self._experts = MixtralForCausalLM(single).model.layers[0].mlp.experts
        generator = torch.Generator().manual_seed(config.seed)
        layers = range(base_config.num_hidden_layers)
        self._x = [torch.randn(EXPERT_CHECK_TOKENS, base_config.hidden_size, generator=generator) for _ in layers]
        self.groups = [
            _Group([(name, shape)], partial(self._shared, name))
            for name, shape in inputs.shapes.items()
            if ".mlp." not in name  # attention, embeddings, norms (and an untied lm_head)
        ]
        for layer in layers:
            self.groups.append(
                _Group([(ROUTER.format(layer=layer), tuple(gates[layer].shape))], partial(self._router, layer))
            )
            for e in range(len(config.experts)):
                names = [
                    (
                        EXPERT.format(layer=layer, expert=e, weight=w),
                        inputs.shapes[DENSE_MLP.format(layer=layer, projection=p)],
                    )
                    for w, p in EXPERT_WEIGHTS.items()
                ]
                self.groups.append(_Group(names, partial(self._expert, layer, e)))

    def _router(self, layer: int) -> list[torch.Tensor]:
        return [self.gates[layer]]

    def _shared(self, name: str) -> list[torch.Tensor]:
        """The base's tensor, or the mean of the experts' (summed in expert order, as a running sum)."""
        if self.config.shared_weights == "base":
            return [read_tensor(self.inputs.base, name)]
        mean = torch.zeros(self.inputs.shapes[name])
        for expert in self.inputs.experts:
            mean.add_(read_tensor(expert, name), alpha=1.0 / len(self.inputs.experts))
        return [mean]

    def _expert(self, layer: int, expert: int) -> list[torch.Tensor]:
        """Expert `expert`'s MLP of `layer` as w1, w2, w3, checked against the dense MLP it comes from."""
        checkpoint = self.inputs.experts[expert]
        dense = {
            p: read_tensor(checkpoint, DENSE_MLP.format(layer=layer, projection=p)) for p in EXPERT_WEIGHTS.values()
        }
        mlp = copy.deepcopy(self._dense_mlp)
        mlp.load_state_dict({f"{p}.weight": t for p, t in dense.items()}, assign=True)
        gate_up, down = fuse_expert_mlp(dense["gate_proj"], dense["up_proj"], dense["down_proj"])
        experts = copy.deepcopy(self._experts)
        experts.load_state_dict({"gate_up_proj": gate_up[None], "down_proj": down[None]}, assign=True)
        error = check_expert(mlp, experts, self._x[layer])
        if not error <= EXPERT_CHECK_TOLERANCE:
            raise MoEAssemblyError(
                f"expert {expert}'s MLP of layer {layer} inside the MoE is off from its dense MLP by {error:.3g} "
                f"(relative, tolerance {EXPERT_CHECK_TOLERANCE:g}); nothing was written"
            )
        self.worst = max(self.worst, error)
        return [dense[p] for p in EXPERT_WEIGHTS.values()]


def compute_gates(
    config: MoEConfig, base_config: PretrainedConfig, base: Checkpoint, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """The router rows of every layer, [layers, experts, hidden], as `config.gate_mode` says."""
    layers, hidden = base_config.num_hidden_layers, base_config.hidden_size
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
        embed = read_tensor(base, "model.embed_tokens.weight")
        return moe_router.cheap_embed_gates(embed, prompts, bos, layers)
    return moe_router.hidden_gates(partial(mlp_inputs_by_layer, base_config, partial(read_tensor, base)), prompts, bos)


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


def _generation_config(base: str, moe_config: MixtralConfig) -> GenerationConfig:
    """The base's generation config, else the one transformers derives from the model config (what
    `save_pretrained` of the model would write)."""
    if (Path(base) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(base)
    return GenerationConfig.from_model_config(moe_config)


def write_model(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, card: str) -> None:
    """A model in memory (`seshu moe train-router`'s): safetensors, config, generation config, tokenizer and card,
    all or nothing."""
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
