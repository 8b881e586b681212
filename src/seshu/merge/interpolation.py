"""Merges of the inputs themselves: a weighted average (linear) and spherical interpolation (slerp)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from seshu.merge.spec import Chunk, Rows, TensorParameters

# Cosine above which slerp interpolates linearly (the angle is too small for sin(theta) to be trusted).
SLERP_DOT_THRESHOLD = 0.9995


def combination_weights(weights: Sequence[float], normalize: bool) -> tuple[float, ...]:
    """The coefficients of sum(w_i x_i), over sum(w_i) when `normalize`."""
    scale = 1.0 / sum(weights) if normalize else 1.0
    return tuple(w * scale for w in weights)


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum(w_i x_i), over sum(w_i) when `normalize` (folded into the weights: one pass over the data fewer)."""
    coefficients = combination_weights(weights, normalize)
    out = tensors[0] * coefficients[0]
    for x, c in zip(tensors[1:], coefficients[1:], strict=True):
        out.add_(x, alpha=c)
    return out


def nonzero_weight_sum(params: TensorParameters, deltas: bool) -> str | None:
    """The check of a method that divides by the sum of the weights when it normalizes."""
    if params.normalize and abs(sum(params.weights)) < 1e-8:
        return (
            "the weights sum to zero, so normalize would divide by zero; change the weights or set "
            "parameters.normalize: false"
        )
    return None


def linear_check(params: TensorParameters, deltas: bool) -> str | None:
    # Unnormalized, sum(w_i (B + d_i)) carries sum(w_i) B: a merge of adapters would then scale the base itself.
    if deltas and not params.normalize:
        return "linear without normalize would scale the base model itself; merge adapters normalized"
    return nonzero_weight_sum(params, deltas)


def linear(chunk: Chunk, params: TensorParameters, statistics: None) -> torch.Tensor:
    return linear_combination(chunk.inputs, params.weights, params.normalize)


def linear_task_vector_weights(params: TensorParameters) -> tuple[float, ...] | None:
    # Normalized, sum(w_i X_i) / sum(w_i) - B = sum(w_i d_i) / sum(w_i); unnormalized, the B term does not cancel.
    return combination_weights(params.weights, True) if params.normalize else None


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b, t) = c_a a + c_b b, from a.b and the norms of the whole tensors."""
    cos = max(-1.0, min(1.0, dot / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_statistics(rows: Rows, params: TensorParameters) -> tuple[float, float]:
    """The coefficients of the base and the other input, from the angle between the two whole tensors."""
    dot = norm_a = norm_b = 0.0
    for c in range(rows.chunks()):
        base, (other,) = rows.read(c)
        assert base is not None
        a, b = base.double(), other.double()
        dot += float((a * b).sum())
        norm_a += float((a * a).sum())
        norm_b += float((b * b).sum())
    return slerp_coefficients(dot, math.sqrt(norm_a), math.sqrt(norm_b), params.t)


def slerp(chunk: Chunk, params: TensorParameters, coefficients: tuple[float, float]) -> torch.Tensor:
    assert chunk.base is not None
    return chunk.base * coefficients[0] + chunk.inputs[0] * coefficients[1]
