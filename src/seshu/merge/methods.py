"""Merge methods: pure tensor math over one tensor of every input, in a registry (`METHODS`).

Notation: base B, inputs X_i, task vectors d_i = X_i - B, weights w_i, densities p_i. Semantics follow mergekit
0.1.5, which is what merged models on the Hub were made with (the tests check them against it):

- linear: sum(w_i X_i) / sum(w_i) (normalize, default) or sum(w_i X_i).
- task_arithmetic: B + lambda * sum(w_i d_i) (normalize, default off, divides by sum(w_i)).
- ties: keep the max(1, floor(p_i n)) largest |d_i| of the flattened tensor; u_i = w_i * kept d_i; elected sign
  s = sign(sum u_i) with 0 going to +; m_i = [sign(u_i) == s] (zeros never agree); D = sum(m_i u_i) / sum(m_i w_i)
  (a zero divisor counts as 1) when normalize (default on), else sum(m_i u_i); out = B + lambda * D.
- dare_linear / dare_ties: a Bernoulli(p_i) keep-mask instead of the magnitude one and, with rescale (default on),
  the kept task vector scaled by ||d_i||_1 / ||kept d_i||_1 (the L1 norm is kept exactly, not 1/p); dare_ties
  then elects signs as ties does, with normalize off by default.
- breadcrumbs / breadcrumbs_ties: drop the gamma fraction of largest |d_i| as outliers and then the smallest, to
  keep floor(p_i n) (no sign election / with it, as ties).
- slerp: spherical interpolation between B (t = 0) and the one other input (t = 1), the angle taken between the
  two whole flattened tensors; nearly parallel tensors (|cos| > 0.9995) fall back to linear interpolation.

(peft's `merge_utils` computes ties and dare differently: signs elected on unweighted deltas, division by the
count of agreeing inputs, a 1/p rescale. Seshu does not mix the two.)

A method is an entry of `METHODS` (`seshu.merge.spec.MergeMethod`: its parameters, its needs, its `statistics`
and `combine` functions); the task-vector methods are one implementation with different rules
(`seshu.merge.task_arithmetic`), linear and slerp are in `seshu.merge.interpolation`.

Every method runs over a tensor in row chunks (`ChunkSource`), so that the engine can stream a tensor of any
size through bounded memory. Methods that need a whole-tensor statistic first (the magnitude threshold, the L1
norms of a DARE mask, the slerp angle) take it in a first pass over the chunks and combine in a second; the
chunking is a fixed function of the tensor's shape, so a method gives the same result whether the tensor is
streamed from disk or passed whole (`merge_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from seshu.merge.interpolation import linear, linear_check, linear_task_vector_weights, slerp, slerp_statistics
from seshu.merge.spec import NORMALIZE, WEIGHT, Chunk, MergeMethod, T, TensorParameters
from seshu.merge.task_arithmetic import MAGNITUDE, OUTLIERS, RANDOM, SIGN_ELECTION, task_arithmetic_method

# Elements per chunk: 2M float32 values are 8 MB, so a chunk of every input and the scratch of a method stay in
# the tens of MB whatever the tensor.
CHUNK_ELEMENTS = 1 << 21

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear", "weighted average of the inputs (a model soup)", linear, space="as_given", needs_base=False,
            parameters=(WEIGHT, NORMALIZE.defaulting(True)), check=linear_check,
            task_vector_weights=linear_task_vector_weights,
        ),
        task_arithmetic_method("task_arithmetic", "base + lambda * weighted sum of task vectors"),
        task_arithmetic_method(
            "ties", "magnitude-pruned task vectors, sign election, agreeing ones averaged", MAGNITUDE,
            SIGN_ELECTION, normalize=True,
        ),
        task_arithmetic_method("dare_linear", "randomly dropped, L1-rescaled task vectors, summed", RANDOM,
                               rescale=True),
        task_arithmetic_method(
            "dare_ties", "randomly dropped, L1-rescaled task vectors with sign election", RANDOM, SIGN_ELECTION,
            rescale=True,
        ),
        task_arithmetic_method(
            "breadcrumbs", "task vectors without their largest (gamma) and smallest entries, summed", OUTLIERS
        ),
        task_arithmetic_method("breadcrumbs_ties", "breadcrumbs with sign election", OUTLIERS, SIGN_ELECTION),
        MergeMethod(
            "slerp", "spherical interpolation from the base (t=0) to one other model (t=1)", slerp, space="values",
            statistics=slerp_statistics, inputs=(1, 1), parameters=(T,),
        ),
    )
}  # fmt: skip


class ChunkSource(Protocol):
    """One tensor of every input, in row chunks of a fixed layout, in the compute dtype.

    `read(i)` gives chunk i as (base rows or None, rows of each input). When `deltas` is true the input rows are
    already task vectors (the exact delta of a LoRA adapter, say); otherwise they are the inputs' own values.
    """

    name: str
    shape: tuple[int, ...]
    deltas: bool

    def chunks(self) -> int: ...

    def read(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]: ...


def chunk_rows(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of the 2-D view a tensor is chunked over: a vector (or scalar) is one row."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return int(shape[0]), math.prod(shape[1:])


def rows_per_chunk(shape: Sequence[int]) -> int:
    _, cols = chunk_rows(shape)
    return max(1, CHUNK_ELEMENTS // max(1, cols))


@dataclass
class InMemorySource:
    """Whole tensors as a `ChunkSource` (what `merge_tensors` and the tests use)."""

    name: str
    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    dtype: torch.dtype = torch.float32
    deltas: bool = False
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple((self.base if self.base is not None else self.inputs[0]).shape)

    def chunks(self) -> int:
        rows, _ = chunk_rows(self.shape)
        return max(1, -(-rows // rows_per_chunk(self.shape)))

    def read(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        rows, cols = chunk_rows(self.shape)
        step = rows_per_chunk(self.shape)
        sl = slice(index * step, min(rows, (index + 1) * step))

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, cols)[sl].to(self.dtype)

        return (None if self.base is None else cut(self.base)), [cut(t) for t in self.inputs]


class _MethodRows:
    """A source's rows in the method's space (`MergeMethod.space`), and its merged rows back as output rows."""

    def __init__(self, method: MergeMethod, source: ChunkSource) -> None:
        self.name, self.shape, self.source = source.name, source.shape, source
        self.to_deltas = method.space == "task_vectors" and not source.deltas
        self.to_values = method.space == "values" and source.deltas
        self.merged_deltas = method.space == "task_vectors" or (method.space == "as_given" and source.deltas)

    def chunks(self) -> int:
        return self.source.chunks()

    def read(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base, rows = self.source.read(index)
        if self.to_deltas or self.to_values:
            assert base is not None
            rows = [x - base for x in rows] if self.to_deltas else [base + d for d in rows]
        return base, rows

    def output(self, base: torch.Tensor | None, merged: torch.Tensor, relative: bool) -> torch.Tensor:
        """The merged rows, or (`relative`) the merged rows minus the base, from what the method returned."""
        if base is None or relative == self.merged_deltas:
            return merged
        return base + merged if self.merged_deltas else merged - base


def merge_chunks(
    method: MergeMethod, source: ChunkSource, params: TensorParameters, relative: bool = False
) -> Iterator[torch.Tensor]:
    """The merged tensor, chunk by chunk (rows of the 2-D view), in the compute dtype; with `relative`, the merged
    tensor minus the base (for task-vector methods the mixed task vector itself, never rounded through B)."""
    rows = _MethodRows(method, source)
    statistics = method.statistics(rows, params) if method.statistics is not None else None
    for c in range(source.chunks()):
        base, inputs = rows.read(c)
        merged = method.combine(Chunk(source.name, c, base, inputs), params, statistics)
        yield rows.output(base, merged, relative)


def merge_tensors(
    method: str,
    base: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
    params: TensorParameters,
    name: str = "tensor",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Merge whole tensors (the pure form of what the engine streams); the result in `dtype`, shaped as the input."""
    source = InMemorySource(name, base, list(inputs), dtype=dtype)
    return torch.cat(list(merge_chunks(METHODS[method], source, params))).reshape(source.shape)
