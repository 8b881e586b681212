"""Merge methods against hand-computed values, and chunked against whole-tensor results."""

from __future__ import annotations

import math

import pytest
import torch

from seshu.merge import methods
from seshu.merge.interpolation import slerp_coefficients
from seshu.merge.methods import merge_tensors
from seshu.merge.spec import TensorParameters

B = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
X1 = torch.tensor([[2.0, 2.0, 1.0, 4.5]])  # d1 = [1, 0, -2, 0.5]
X2 = torch.tensor([[0.0, 3.0, 4.0, 4.0]])  # d2 = [-1, 1, 1, 0]


def test_linear_is_the_weighted_average_and_plain_sum_without_normalize() -> None:
    out = merge_tensors("linear", None, [X1, X2], TensorParameters(weights=(1.0, 3.0), normalize=True))
    assert torch.allclose(out, (X1 + 3 * X2) / 4)
    out = merge_tensors("linear", None, [X1, X2], TensorParameters(weights=(1.0, 3.0), normalize=False))
    assert torch.allclose(out, X1 + 3 * X2)


def test_task_arithmetic_adds_weighted_task_vectors_times_lambda() -> None:
    params = TensorParameters(weights=(0.5, 2.0), densities=(0.1, 0.1), lambda_=0.5)  # density is ignored
    out = merge_tensors("task_arithmetic", B, [X1, X2], params)
    d1, d2 = X1 - B, X2 - B
    assert torch.allclose(out, B + 0.5 * (0.5 * d1 + 2.0 * d2))
    normalized = merge_tensors("task_arithmetic", B, [X1, X2], TensorParameters(weights=(0.5, 2.0), normalize=True))
    assert torch.allclose(normalized, B + (0.5 * d1 + 2.0 * d2) / 2.5)


def test_ties_by_hand() -> None:
    # density 0.5 of 4 entries keeps 2 per input: d1 keeps [1, 0, -2, 0] (|-2|, |1|), d2 keeps the first two
    # largest |d2| = 1, 1, 1 in flattened order: [-1, 1, 0, 0].
    params = TensorParameters(weights=(1.0, 2.0), densities=(0.5, 0.5), normalize=True)
    out = merge_tensors("ties", B, [X1, X2], params)
    # u1 = [1, 0, -2, 0], u2 = [-2, 2, 0, 0]; sum = [-1, 2, -2, 0] -> signs [-, +, -, + (0 goes to +)].
    # entry 0: only u2 agrees (-2, weight 2) -> -1; entry 1: u2 (2/2) -> 1; entry 2: u1 (-2/1) -> -2; entry 3: none -> 0
    assert torch.allclose(out, B + torch.tensor([[-1.0, 1.0, -2.0, 0.0]]))
    plain = merge_tensors("ties", B, [X1, X2], TensorParameters(weights=(1.0, 2.0), densities=(0.5, 0.5)))
    assert torch.allclose(plain, B + torch.tensor([[-2.0, 2.0, -2.0, 0.0]]))


def test_ties_keeps_at_least_one_entry_and_density_one_keeps_all() -> None:
    tiny = merge_tensors("ties", B, [X1], TensorParameters(weights=(1.0,), densities=(0.01,), normalize=True))
    assert torch.allclose(tiny, B + torch.tensor([[0.0, 0.0, -2.0, 0.0]]))
    full = merge_tensors("ties", B, [X1], TensorParameters(weights=(1.0,), densities=(1.0,), normalize=True))
    assert torch.allclose(full, X1)


def test_dare_keeps_about_density_and_preserves_the_l1_norm_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 50, generator=generator)
    model = base + torch.randn(200, 50, generator=generator)
    params = TensorParameters(weights=(1.0,), densities=(0.3,), rescale=True, seed=7)
    delta = merge_tensors("dare_linear", base, [model], params) - base
    kept = (delta != 0).float().mean().item()
    assert 0.27 < kept < 0.33
    assert math.isclose(delta.abs().sum().item(), (model - base).abs().sum().item(), rel_tol=1e-5)
    again = merge_tensors("dare_linear", base, [model], params) - base
    assert torch.equal(delta, again)  # seeded
    other_seed = merge_tensors("dare_linear", base, [model], TensorParameters(weights=(1.0,), densities=(0.3,), seed=8))
    assert not torch.equal(other_seed - base, delta)
    unscaled = merge_tensors("dare_linear", base, [model], TensorParameters(weights=(1.0,), densities=(0.3,), seed=7))
    kept_entries = (unscaled - base) != 0
    assert torch.allclose((unscaled - base)[kept_entries], (model - base)[kept_entries], atol=1e-6)


def test_dare_ties_elects_signs_over_rescaled_vectors() -> None:
    params = TensorParameters(weights=(1.0, 1.0), densities=(1.0, 1.0), rescale=True)
    out = merge_tensors("dare_ties", B, [X1, X2], params)  # density 1: no drop, so it is ties without pruning
    # u = d1 + d2 = [0, 1, -1, 0.5]: signs [+, +, -, +]; entry 0: d1 agrees (1) -> 1; 1: d2 -> 1; 2: d1 -> -2; 3: 0.5
    assert torch.allclose(out, B + torch.tensor([[1.0, 1.0, -2.0, 0.5]]))


def test_breadcrumbs_drops_the_largest_outliers_then_the_smallest() -> None:
    d = torch.arange(1.0, 11.0).reshape(1, 10)  # magnitudes 1..10
    params = TensorParameters(weights=(1.0,), densities=(0.5,), gammas=(0.2,))
    out = merge_tensors("breadcrumbs", torch.zeros(1, 10), [d], params)
    # keep 5, drop the top 2 (10, 9): keeps 8, 7, 6, 5, 4
    assert torch.equal(out, torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8, 0, 0]], dtype=torch.float32))


def test_slerp_ends_and_midpoint_on_orthogonal_vectors() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(merge_tensors("slerp", a, [b], TensorParameters(weights=(), t=0.0)), a)
    assert torch.allclose(merge_tensors("slerp", a, [b], TensorParameters(weights=(), t=1.0)), b)
    mid = merge_tensors("slerp", a, [b], TensorParameters(weights=(), t=0.5))
    assert torch.allclose(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    assert slerp_coefficients(1.0, 1.0, 1.0, 0.25) == (0.75, 0.25)  # parallel: linear interpolation


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "dare_ties"])
def test_streaming_in_small_chunks_gives_the_whole_tensor_result(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(37, 23, generator=generator)
    inputs = [base + torch.randn(37, 23, generator=generator) * 0.1 for _ in range(3)]
    # Repeated magnitudes exercise the tie handling across chunk borders.
    inputs[0][5:9] = base[5:9] + 0.25
    if method == "slerp":
        inputs = inputs[:1]
    params = TensorParameters(
        weights=(1.0,) * len(inputs), densities=(0.4,) * len(inputs), gammas=(0.05,) * len(inputs), normalize=True
    )
    whole = merge_tensors(method, base, inputs, params)
    monkeypatch.setattr(methods, "CHUNK_ELEMENTS", 50)  # 2 rows per chunk
    chunked = merge_tensors(method, base, inputs, params)
    if method == "dare_ties":  # its masks are drawn per chunk, so only the statistics can be compared
        assert abs((chunked != base).float().mean() - (whole != base).float().mean()) < 0.1
    else:
        assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)


def test_magnitude_ties_keep_exactly_floor_p_n_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.zeros(10, 10)
    model = torch.ones(10, 10)  # every |d| ties
    monkeypatch.setattr(methods, "CHUNK_ELEMENTS", 30)
    params = TensorParameters(weights=(1.0,), densities=(0.37,), normalize=True)
    out = merge_tensors("ties", base, [model], params)
    assert int((out != 0).sum()) == 37
    assert torch.equal(out.flatten()[:37], torch.ones(37))  # ties go by flattened order


def test_integer_parameters_keep_to_their_range() -> None:
    from seshu.merge.spec import Param

    k = Param("k", 1, kind="integer", low=1, high=8)
    assert k.problem(3) is None
    assert k.problem(0) == "k must be in [1, 8], got 0" and k.problem(9) is not None
    assert k.problem(2.5) == "parameters.k must be an integer" and k.problem(True) is not None
    assert k.resolved(3) == 3 and isinstance(k.resolved(3), int)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.5])
def test_declared_task_vector_weights_are_what_the_method_merges(name: str, normalize: bool, density: float) -> None:
    """Where a method says its merge is sum(c_i d_i) (which lets adapters re-factor from their factors), it is."""
    method = methods.METHODS[name]
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=generator)
    inputs = [base + torch.randn(6, 5, generator=generator) for _ in range(method.inputs[1] or 3)]
    count = len(inputs)
    params = TensorParameters(
        weights=(0.5, 2.0, 0.25)[:count], densities=(density,) * count, gammas=(0.1,) * count, normalize=normalize,
        lambda_=0.7, t=0.3,
    )  # fmt: skip
    weights = method.task_vector_weights(params) if method.task_vector_weights else None
    declared = {"linear": normalize, "task_arithmetic": True, "dare_linear": density == 1, "breadcrumbs": density == 1}
    assert (weights is not None) == declared.get(name, False)
    if weights is not None:
        merged = merge_tensors(name, None if name == "linear" else base, inputs, params, dtype=torch.float64)
        expected = sum(c * (x.double() - base.double()) for c, x in zip(weights, inputs, strict=True))
        assert torch.allclose(merged - base.double(), expected, atol=1e-12)
