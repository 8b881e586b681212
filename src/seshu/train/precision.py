"""What `train.precision` means on this machine: `auto` is bf16 mixed precision where the hardware computes bf16
natively, float32 elsewhere.

Measured on 2 cores with AVX512-BF16 (`bench/pretrain_throughput.py`): bf16 autocast takes a Llama-small training
step from 0.83 s to 0.56 s, and a Mixtral-small one from 1.08 s to 0.75 s with its experts in bf16 too
(`seshu.models.experts`). Where the hardware lacks bf16 dot products, bf16 matmuls are converted in software and
that gain is not there to take, so `auto` keeps float32; so it does on a GPU without bf16, since fp16 needs loss
scaling, which a user should choose.
Master weights and the optimizer stay float32 either way (autocast casts per matmul).
"""

from __future__ import annotations

from typing import Literal

import torch

from seshu.train.distributed import on_cpu

Precision = Literal["fp32", "bf16", "fp16"]

# torch.cpu.get_capabilities() keys for the x86 instructions that compute bf16 dot products.
_CPU_BF16 = ("avx512_bf16", "amx_bf16")


def native_bf16(cpu: bool) -> bool:
    """Whether the device training runs on (the CPU, or the current GPU) computes bf16 natively."""
    if not cpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities()
    return any(bool(capabilities.get(key)) for key in _CPU_BF16)


def resolve_precision(precision: str) -> Precision:
    """The precision a run with `train.precision: precision` trains in here."""
    if precision == "auto":
        return "bf16" if native_bf16(on_cpu()) else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}")
    return precision  # type: ignore[return-value]  # narrowed by the check above


def describe_precision(precision: str) -> str:
    """One phrase for the run log and the card: what ran, and why when `auto` chose it."""
    resolved = resolve_precision(precision)
    what = "float32" if resolved == "fp32" else f"{resolved} mixed precision"
    if precision != "auto":
        return what
    device = "this CPU" if on_cpu() else "this GPU"
    reason = "computes bf16 natively" if resolved == "bf16" else "has no native bf16"
    return f"{what} (auto: {device} {reason})"
