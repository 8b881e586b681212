"""Projector kinds: how a vision feature becomes an LM input embedding, as one registry entry each.

transformers' LLaVA projector is always linear_1 -> activation -> linear_2 (`LlavaMultiModalProjector`), with
the activation named in the config (`projector_hidden_act`) and looked up in transformers' `ACT2FN`. Each kind
here is an activation name plus how the two layers start, so every kind saves and loads as plain LLaVA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seshu.errors import UserError


@dataclass(frozen=True)
class ProjectorSpec:
    name: str
    activation: str  # a key of transformers' ACT2FN
    # linear_2 starts as the identity (weight I, bias 0), so the projector starts as linear_1 alone.
    identity_second_layer: bool
    summary: str


PROJECTORS: dict[str, ProjectorSpec] = {
    # The seed's single linear layer (TinyCLIP 640 -> Phi-2 2560), exactly: ACT2FN's "linear" returns its input
    # unchanged and I x + 0 is x to the last bit (each output sums one product by 1 and products by 0), so
    # linear_2(act(linear_1(x))) == linear_1(x). Trained further, the two layers stay one affine map.
    "linear": ProjectorSpec("linear", "linear", True, "one linear layer (the seed's): W x + b"),
    # LLaVA-1.5's projector: two linear layers with a GELU between.
    "mlp2x_gelu": ProjectorSpec("mlp2x_gelu", "gelu", False, "two linear layers with a GELU between (LLaVA-1.5)"),
}


def get_projector(name: str) -> ProjectorSpec:
    try:
        return PROJECTORS[name]
    except KeyError:
        raise UserError(f"unknown projector '{name}'; choose one of: {', '.join(PROJECTORS)}") from None


@torch.no_grad()
def init_projector(linear_1: nn.Linear, linear_2: nn.Linear, spec: ProjectorSpec, seed: int) -> None:
    """Seeded start weights for a projector of kind `spec`: PyTorch's default `nn.Linear` initialisation, as
    LLaVA's own projector has, and the identity for a second layer that must not change the first's output."""
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's global random state
        torch.manual_seed(seed)
        linear_1.reset_parameters()
        linear_2.reset_parameters()
    if spec.identity_second_layer:
        linear_2.weight.copy_(torch.eye(linear_2.out_features, linear_2.in_features))
        if linear_2.bias is not None:
            linear_2.bias.zero_()
