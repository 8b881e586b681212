"""Mixture-of-experts layers under mixed precision: the experts' matmuls in the autocast dtype, as a Linear's are.

transformers runs a MoE's experts through `torch._grouped_mm`, which autocast does not cover, so it casts the
tokens to the weights' dtype instead (`transformers.integrations.moe._grouped_mm`). Training keeps float32 master
weights, so under bf16 autocast the experts, most of a MoE's matmul work, stay in float32 while everything else
runs in bf16: a Mixtral-small step gained 1.09x from bf16 (1.43x with this), a Llama-small one 1.5x. It registers
an experts implementation that casts the expert weights to the autocast dtype for the call (the cast's backward
brings their gradients back to float32, as autocast does for a Linear) and is transformers' own grouped_mm
otherwise. The choice lives in the loaded model only: `config.json` does not record an experts implementation,
so a saved model stays plain transformers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

AUTOCAST_GROUPED_MM = "seshu_autocast_grouped_mm"

Model = TypeVar("Model", bound=torch.nn.Module)


class _CastWeights:
    """The experts module as the grouped_mm forward reads it, with each floating-point tensor it holds cast to
    `dtype`: its parameters, or what a parametrization computes in their place (peft's LoRA on the experts'
    parameters, `lora.target_parameters`, reads as the base weight plus the adapter's delta)."""

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype) -> None:
        self._experts = experts
        self._dtype = dtype

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._experts, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def autocast_grouped_mm_experts_forward(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    device = hidden_states.device.type
    if not torch.is_autocast_enabled(device):
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(device)
    cast = _CastWeights(experts, dtype)
    out = grouped_mm_experts_forward(cast, hidden_states.to(dtype), top_k_index, top_k_weights)  # type: ignore[arg-type]
    return out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(AUTOCAST_GROUPED_MM, autocast_grouped_mm_experts_forward)


def use_autocast_experts(model: Model) -> Model:
    """Run `model`'s experts in the autocast dtype under mixed precision (a no-op for a model without experts, or
    whose experts do not run through grouped_mm here, e.g. on a GPU the kernel does not support)."""
    if isinstance(model, PreTrainedModel) and model.config._experts_implementation == "grouped_mm":
        model.set_experts_implementation(AUTOCAST_GROUPED_MM)
    return model
