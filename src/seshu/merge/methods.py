"""Merge methods: pure tensor math over one tensor of every input, in a registry.

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

Every method runs over a tensor in row chunks (`ChunkSource`), so that the engine can stream a tensor of any
size through bounded memory. Methods that need a whole-tensor statistic first (the magnitude threshold, the L1
norms of a DARE mask, the slerp angle) take it in a first pass over the chunks (`seshu.merge.ranking` for the
magnitudes) and combine in a second; the
chunking is a fixed function of the tensor's shape, so a method gives the same result whether the tensor is
streamed from disk or passed whole (`merge_tensors`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from seshu.merge.ranking import RankCut, cut_mask, magnitude_bits, rank_cut

# Elements per chunk: 2M float32 values are 8 MB, so a chunk of every input and the scratch of a method stay in
# the tens of MB whatever the tensor.
CHUNK_ELEMENTS = 1 << 21
# Cosine above which slerp interpolates linearly (the angle is too small for sin(theta) to be trusted).
SLERP_DOT_THRESHOLD = 0.9995
# A tensor (or its kept part) whose L1 norm is below this is not rescaled (mergekit's eps).
RESCALE_EPS = 1e-7

Sparsify = Literal["magnitude", "random", "outliers"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it needs and which parameters it takes, with their defaults."""

    name: str
    summary: str
    uses_base: bool  # the base is required and the inputs' task vectors are merged
    sparsify: Sparsify | None = None
    sign_election: bool = False
    default_normalize: bool = False
    default_rescale: bool = False
    inputs: tuple[int, int | None] = (1, None)  # (least, most) inputs besides the base
    input_parameters: tuple[str, ...] = ("weight",)
    global_parameters: tuple[str, ...] = ()


_TASK = ("normalize", "lambda", "rescale")
METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "linear", "weighted average of the inputs (a model soup)", uses_base=False, default_normalize=True,
            global_parameters=("normalize",),
        ),
        MergeMethod(
            "task_arithmetic", "base + lambda * weighted sum of task vectors", uses_base=True,
            input_parameters=("weight", "density"), global_parameters=_TASK,  # density is ignored, as in mergekit
        ),
        MergeMethod(
            "ties", "magnitude-pruned task vectors, sign election, agreeing ones averaged", uses_base=True,
            sparsify="magnitude", sign_election=True, default_normalize=True,
            input_parameters=("weight", "density"), global_parameters=_TASK,
        ),
        MergeMethod(
            "dare_linear", "randomly dropped, L1-rescaled task vectors, summed", uses_base=True, sparsify="random",
            default_rescale=True, input_parameters=("weight", "density"), global_parameters=_TASK,
        ),
        MergeMethod(
            "dare_ties", "randomly dropped, L1-rescaled task vectors with sign election", uses_base=True,
            sparsify="random", sign_election=True, default_rescale=True, input_parameters=("weight", "density"),
            global_parameters=_TASK,
        ),
        MergeMethod(
            "breadcrumbs", "task vectors without their largest (gamma) and smallest entries, summed", uses_base=True,
            sparsify="outliers", input_parameters=("weight", "density", "gamma"), global_parameters=_TASK,
        ),
        MergeMethod(
            "breadcrumbs_ties", "breadcrumbs with sign election", uses_base=True, sparsify="outliers",
            sign_election=True, input_parameters=("weight", "density", "gamma"), global_parameters=_TASK,
        ),
        MergeMethod(
            "slerp", "spherical interpolation from the base (t=0) to one other model (t=1)", uses_base=True,
            inputs=(1, 1), input_parameters=(), global_parameters=("t",),
        ),
    )
}  # fmt: skip
INPUT_DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": 0.01}


@dataclass(frozen=True)
class TensorParameters:
    """The parameters of one method for one tensor, resolved (gradients and filters applied)."""

    weights: tuple[float, ...]
    densities: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False
    t: float = 0.5
    seed: int = 0


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


# --------------------------------------------------------------------------------------------------
# Whole-tensor statistics (first pass)


def _task_vectors(
    method: MergeMethod, source: ChunkSource, index: int
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base, inputs = source.read(index)
    if method.uses_base and not source.deltas:
        assert base is not None
        inputs = [x - base for x in inputs]
    return base, inputs


@dataclass
class _Statistics:
    cuts: list[RankCut | None] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)  # rescale factor per input
    slerp: tuple[float, float] | None = None  # (coefficient of the base, of the other input)


def _keep_counts(method: MergeMethod, params: TensorParameters, n: int, i: int) -> tuple[int, int] | None:
    """(skip, keep) of input i's ranked entries, or None when nothing is pruned."""
    density = params.densities[i]
    if density >= 1:
        return None
    if method.sparsify == "magnitude":
        return 0, max(1, int(density * n))
    keep = int(density * n)
    top = int(params.gammas[i] * n)
    return min(top, n - keep), keep  # fewer outliers dropped when needed to keep the density


def _statistics(method: MergeMethod, source: ChunkSource, params: TensorParameters) -> _Statistics:
    stats = _Statistics()
    n = math.prod(source.shape)
    count = len(params.weights)
    if method.sparsify in ("magnitude", "outliers"):
        for i in range(count):
            counts = _keep_counts(method, params, n, i)
            stats.cuts.append(None if counts is None else _cut(method, source, i, *counts))
    if method.sparsify is not None and params.rescale:
        before, after = [0.0] * count, [0.0] * count
        counters = [[0, 0] for _ in range(count)]
        for c in range(source.chunks()):
            for i, d in enumerate(_task_vectors(method, source, c)[1]):
                kept = _sparsified(method, params, stats, source, c, i, d, rescaled=False, tie_counters=counters)
                before[i] += float(d.abs().sum(dtype=torch.float64))
                after[i] += float(kept.abs().sum(dtype=torch.float64))
        pairs = zip(before, after, strict=True)
        stats.scales = [b / a if b >= RESCALE_EPS and a >= RESCALE_EPS else 1.0 for b, a in pairs]
    if method.name == "slerp":
        dot = norm_a = norm_b = 0.0
        for c in range(source.chunks()):
            a, b = _slerp_pair(source, c)
            a, b = a.double(), b.double()
            dot += float((a * b).sum())
            norm_a += float((a * a).sum())
            norm_b += float((b * b).sum())
        stats.slerp = slerp_coefficients(dot, math.sqrt(norm_a), math.sqrt(norm_b), params.t)
    return stats


def _slerp_pair(source: ChunkSource, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    base, (other,) = source.read(chunk)
    assert base is not None
    return base, (base + other if source.deltas else other)


def _cut(method: MergeMethod, source: ChunkSource, which: int, skip: int, keep: int) -> RankCut:
    def bits_of(chunk: int) -> torch.Tensor:
        return magnitude_bits(_task_vectors(method, source, chunk)[1][which])

    return rank_cut(bits_of, source.chunks(), skip, keep)


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b, t) = c_a a + c_b b, from a.b and the norms of the whole tensors."""
    cos = max(-1.0, min(1.0, dot / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


# --------------------------------------------------------------------------------------------------
# Combining (second pass)


def _chunk_seed(seed: int, name: str, which: int, chunk: int) -> int:
    key = f"{seed}\0{name}\0{which}\0{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _sparsified(
    method: MergeMethod,
    params: TensorParameters,
    stats: _Statistics,
    source: ChunkSource,
    chunk: int,
    which: int,
    delta: torch.Tensor,
    rescaled: bool = True,
    tie_counters: list[list[int]] | None = None,
) -> torch.Tensor:
    """Input `which`'s task vector rows of chunk `chunk` after pruning (and rescaling when `rescaled`)."""
    if method.sparsify is None or params.densities[which] >= 1:
        return delta
    if method.sparsify == "random":
        # numpy's PCG64 draws float32 twice as fast as torch's CPU generator, and DARE draws every mask twice.
        rng = np.random.Generator(np.random.PCG64(_chunk_seed(params.seed, source.name, which, chunk)))
        keep = torch.from_numpy(rng.random(tuple(delta.shape), dtype=np.float32) < params.densities[which])
    else:
        cut = stats.cuts[which]
        assert cut is not None
        keep = cut_mask(magnitude_bits(delta), cut, None if tie_counters is None else tie_counters[which])
    kept = delta * keep
    if rescaled and stats.scales and stats.scales[which] != 1.0:
        kept = kept * stats.scales[which]
    return kept


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum(w_i x_i), over sum(w_i) when `normalize` (folded into the weights: one pass over the data fewer)."""
    scale = 1.0 / sum(weights) if normalize else 1.0
    out = tensors[0] * (weights[0] * scale)
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(x, alpha=w * scale)
    return out


def elect(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES sign election over weighted task vectors u_i = w_i d_i."""
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    total = torch.zeros_like(weighted[0])
    for u in weighted:
        total += u
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for u, w in zip(weighted, weights, strict=True):
        agree = torch.sign(u) == sign
        mixed += u * agree
        divisor += w * agree
    if normalize:
        mixed /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def merge_chunks(
    method: MergeMethod, source: ChunkSource, params: TensorParameters, relative: bool = False
) -> Iterator[torch.Tensor]:
    """The merged tensor, chunk by chunk (rows of the 2-D view), in the compute dtype; with `relative`, the merged
    tensor minus the base (for task-vector methods the mixed task vector itself, never rounded through B)."""
    stats = _statistics(method, source, params)
    tie_counters = [[0, 0] for _ in params.weights]
    for c in range(source.chunks()):
        if method.name == "slerp":
            assert stats.slerp is not None
            a, b = _slerp_pair(source, c)
            out = a * stats.slerp[0] + b * stats.slerp[1]
            yield out - a if relative else out
            continue
        if not method.uses_base:
            base, inputs = source.read(c)
            merged = linear_combination(inputs, params.weights, params.normalize)
            if base is None or (source.deltas and relative):
                yield merged
            elif source.deltas:
                # Adapter task vectors are averaged as deltas: B + sum(w d)/sum(w) is the soup of B + d_i, exactly.
                yield base + merged
            else:
                yield merged - base if relative else merged
            continue
        base, deltas = _task_vectors(method, source, c)
        assert base is not None
        pruned = [
            _sparsified(method, params, stats, source, c, i, d, tie_counters=tie_counters) for i, d in enumerate(deltas)
        ]
        if method.sign_election:
            mixed = elect(pruned, params.weights, params.normalize)
        else:
            mixed = linear_combination(pruned, params.weights, False)
            if params.normalize:
                mixed /= sum(params.weights)
        if params.lambda_ != 1:
            mixed *= params.lambda_
        yield mixed if relative else base + mixed


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
