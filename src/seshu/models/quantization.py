"""Which layers 4-bit loading (QLoRA) must leave in 16/32 bits.

Two reasons: the architecture reads a layer's weight directly instead of calling it (`ArchSpec
.qlora_skip_modules`, e.g. Mamba's `dt_proj`), and, on a CPU, bitsandbytes' 4-bit kernels pack weights in
blocks of 32 output rows and assert on any other width in inference (evaluation and generation: training
itself runs). Every preset's MLP width is a multiple of 64, but some widths follow from the architecture:
Mamba's `x_proj` has dt_rank + 2 * state_size rows and Mamba-2's `in_proj` 2 * intermediate + 2 * groups *
state + heads. Such layers stay unquantized on a CPU; they are a few percent of a block's weights.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from seshu.models.registry import ARCHS

CPU_4BIT_BLOCK = 32


def cpu_4bit_unfit_modules(config: PretrainedConfig) -> list[str]:
    """The names (last component, as `llm_int8_skip_modules` matches them) of the linear layers whose output
    width bitsandbytes' CPU 4-bit kernels cannot pack, found on a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features % CPU_4BIT_BLOCK and name != "lm_head"
    }
    return sorted(names)


def four_bit_skip_modules(config: PretrainedConfig, device: str) -> list[str] | None:
    """`BitsAndBytesConfig.llm_int8_skip_modules` for loading a model of `config` in 4 bits on `device`: None
    keeps transformers' default (the output head only); a list replaces it, so it names the head too."""
    spec = ARCHS.get(config.model_type)
    skip = list(spec.qlora_skip_modules) if spec else []
    if device == "cpu":
        skip += [name for name in cpu_4bit_unfit_modules(config) if name not in skip]
    return [*skip, "lm_head"] if skip else None
