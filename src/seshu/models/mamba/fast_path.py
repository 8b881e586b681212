"""Which selective scan trains a Mamba model, and the switch that puts Seshu's chunked scan into one.

transformers' `MambaMixer` picks its scan from a module-level function (mambapy's parallel scan on a CPU, or
mamba-ssm's fused kernel where it imports), so a model cannot be given another scan through its config or a
constructor argument. `use_fast_scan` therefore changes the class of each mixer in place to a subclass whose
full-sequence pass without a cache runs `seshu.models.mamba.scan.selective_scan`. Nothing else changes: the
parameters, their names and the config stay transformers' own, so `save_pretrained` writes a plain Mamba that
`AutoModelForCausalLM.from_pretrained` loads without Seshu (and computes the same numbers with mambapy).

Left to transformers, unchanged:
- anything with a cache: generation's prefill and its O(1)-per-token cached step;
- CUDA tensors when mamba-ssm and causal-conv1d import: transformers then runs their fused kernels;
- Mamba-2, whose transformers code already has a chunked SSD scan in PyTorch (its decay is one scalar per head,
  so the intra-chunk work is matmuls) and the kernels' path; `scan_path` only names what runs there.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, TypeVar

import torch
from torch import nn
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.models.mamba.modeling_mamba import MambaMixer, apply_mask_to_padding_states, causal_conv1d_fn
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
from transformers.utils.import_utils import is_mambapy_available

from seshu.models.mamba.scan import selective_scan

# What transformers imports to run Mamba's CUDA kernels (its `use_kernel_func_from_hub_with_fallback` imports
# these very packages), as pip names them.
KERNEL_PACKAGES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}

PATH_KERNELS = "CUDA kernels (mamba-ssm, causal-conv1d)"
PATH_SESHU = "Seshu's chunked scan (PyTorch)"
PATH_MAMBAPY = "mambapy's parallel scan (PyTorch)"
PATH_SEQUENTIAL = "transformers' sequential scan (PyTorch)"
PATH_SSD = "transformers' chunked SSD scan (PyTorch)"

Model = TypeVar("Model", bound=nn.Module)


@functools.cache
def kernels_installed() -> bool:
    """Whether mamba-ssm and causal-conv1d import here, as transformers imports them to pick its kernels."""
    try:
        for module in KERNEL_PACKAGES:
            importlib.import_module(module)
    except Exception:  # an install that fails to import (e.g. built for another CUDA) is no install
        return False
    return True


class FastScanMambaMixer(MambaMixer):
    """transformers' `MambaMixer`, with Seshu's chunked scan on full sequences without a cache, off the kernels."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if cache is not None or (hidden_states.is_cuda and kernels_installed()):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return self._chunked_forward(hidden_states, attention_mask, **kwargs)

    @force_accelerate_hooks(["conv1d", "dt_proj"])  # as transformers' forward: both weights are read directly
    def _chunked_forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> torch.Tensor:
        """transformers' full-sequence, no-cache pass step for step, its scan call replaced by Seshu's."""
        dtype = hidden_states.dtype
        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        x = causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation, **kwargs)
        x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        y = selective_scan(
            x.transpose(1, 2),
            self.dt_proj.weight @ time_step.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D.float(),
            z=gate,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        out: torch.Tensor = self.out_proj(y.transpose(1, 2).to(dtype))
        return out


def use_fast_scan(model: Model) -> Model:
    """Give every transformers `MambaMixer` in `model` Seshu's chunked scan (in place; returns `model`). Models
    without one (Mamba-2, attention models) are returned untouched, so callers need not check the arch."""
    for module in model.modules():
        if type(module) is MambaMixer:
            module.__class__ = FastScanMambaMixer
    return model


def scan_path(model: nn.Module, device: torch.device | str) -> str | None:
    """The scan that trains `model`'s state-space layers on `device`, in words for the run log and the card;
    None for a model without any."""
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer | Mamba2Mixer)]
    if not mixers:
        return None
    if torch.device(device).type == "cuda" and kernels_installed():
        return PATH_KERNELS
    mixer = mixers[0]
    if isinstance(mixer, Mamba2Mixer):
        return PATH_SSD
    if isinstance(mixer, FastScanMambaMixer):
        return PATH_SESHU
    return PATH_MAMBAPY if mixer.use_mambapy and is_mambapy_available() else PATH_SEQUENTIAL
