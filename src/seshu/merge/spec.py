"""What a merge method is: the parameters it takes (`Param`), their values for one tensor (`TensorParameters`),
the rows it reads (`Rows`, `Chunk`) and the method itself (`MergeMethod`), an entry of `methods.METHODS`.

A method is two functions over one tensor of every input: `statistics`, a first pass over the whole tensor for
what the combination needs to know in advance (a magnitude threshold, an angle), and `combine`, which merges one
chunk of rows given those statistics. Everything the config, the engine and the CLI need to know about a method
(its parameters and their checks, whether it needs a base, how many models it takes, which rows it reads) is in
its entry, so a new method is one entry and no code elsewhere names one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

Scalar = bool | int | float


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its name in the YAML, its default, and what values it takes."""

    name: str
    default: Scalar
    per_input: bool = False  # set per model (or for all of them in the global `parameters`), else globally only
    kind: Literal["number", "bool", "integer"] = "number"  # an integer is one plain value, never a gradient
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the range excludes `low`
    required: bool = False  # the config must set it (the default then only fills tensors no filter matches)
    help: str = ""  # what the value means, for the error when a required one is missing
    field: str | None = None  # the `TensorParameters` attribute it fills; None: `TensorParameters.extra[name]`

    def problem(self, value: Scalar) -> str | None:
        """Why `value` is not allowed here (None when it is)."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"parameter {self.name} must be true or false, got {value!r}"
        if self.kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
            return f"parameters.{self.name} must be an integer"
        if isinstance(value, bool):
            return f"parameter {self.name} must be a number, got {value!r}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"{self.name} must be in {'(' if self.low_open else '['}{low}, {high}], got {value}"
        return None

    def resolved(self, value: Scalar) -> Scalar:
        """A YAML value as the method reads it."""
        return bool(value) if self.kind == "bool" else int(value) if self.kind == "integer" else float(value)

    def defaulting(self, default: Scalar) -> Param:
        """This parameter with another default (methods differ in whether they normalize, say)."""
        return dataclasses.replace(self, default=default)


# The parameters mergekit's methods share; a method may define its own (they land in `TensorParameters.extra`).
WEIGHT = Param("weight", 1.0, per_input=True, field="weights")
DENSITY = Param("density", 1.0, per_input=True, low=0, high=1, low_open=True, field="densities")
GAMMA = Param("gamma", 0.01, per_input=True, low=0, high=1, field="gammas")
NORMALIZE = Param("normalize", False, kind="bool", field="normalize")
RESCALE = Param("rescale", False, kind="bool", field="rescale")
LAMBDA = Param("lambda", 1.0, field="lambda_")
T = Param("t", 0.5, low=0, high=1, required=True, help="0 gives base_model, 1 the other model", field="t")
SEED = Param("seed", 0, kind="integer", field="seed")  # every method takes it (random ones draw from it)


@dataclass(frozen=True)
class TensorParameters:
    """The parameters of one method for one tensor, resolved (gradients and filters applied)."""

    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    gammas: tuple[float, ...] = ()
    normalize: bool = False
    lambda_: float = 1.0
    rescale: bool = False
    t: float = 0.5
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # a method's own parameters, by name


class Rows(Protocol):
    """One tensor of every input, in row chunks, as a method reads it (see `MergeMethod.space`)."""

    name: str
    shape: tuple[int, ...]

    def chunks(self) -> int: ...

    def read(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]: ...


@dataclass(frozen=True)
class Chunk:
    """Chunk `index` of tensor `name`: the base's rows (None without a base) and each input's."""

    name: str
    index: int
    base: torch.Tensor | None
    inputs: list[torch.Tensor]


# Which rows `combine` sees and what it returns:
# - task_vectors: d_i = X_i - B (an adapter's delta as it is) in, the merged task vector out (added to B);
# - values: the inputs' own values X_i (B + delta for an adapter) in, merged values out;
# - as_given: whichever the inputs are (models' values, adapters' deltas), the same kind out. Only for a
#   weighted average (weights summing to one), which is the same merge of values and of task vectors; its
#   `check` must refuse the parameters for which it is not, when the inputs are task vectors.
Space = Literal["task_vectors", "values", "as_given"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: what it needs, which parameters it takes, and how it merges a tensor."""

    name: str
    summary: str
    combine: Callable[[Chunk, TensorParameters, Any], torch.Tensor]  # (chunk, parameters, statistics)
    space: Space = "task_vectors"
    statistics: Callable[[Rows, TensorParameters], Any] | None = None  # first pass over the whole tensor
    needs_base: bool = True  # the base is required, and an entry of `models` that is the base is not an input
    inputs: tuple[int, int | None] = (1, None)  # (least, most) inputs besides the base
    parameters: tuple[Param, ...] = (WEIGHT,)
    # Why these parameters cannot merge one tensor (None when they can); the bool: the inputs are task vectors.
    check: Callable[[TensorParameters, bool], str | None] | None = None
    # When these parameters make the merged task vector a weighted sum of the inputs' task vectors, sum(c_i d_i):
    # the c_i (else None). A merge of LoRA adapters then re-factors the merged delta straight from the stacked
    # factors (`lora.refactor_sum`) instead of building the dense delta and taking its SVD.
    task_vector_weights: Callable[[TensorParameters], tuple[float, ...] | None] | None = None

    def __post_init__(self) -> None:
        if self.space == "task_vectors" and not self.needs_base:
            raise ValueError(f"{self.name}: a method over task vectors needs a base")

    @property
    def accepted(self) -> tuple[Param, ...]:
        """Every parameter the method takes: its own and the seed."""
        return self.parameters if SEED in self.parameters else (*self.parameters, SEED)

    def parameter(self, name: str) -> Param | None:
        return next((p for p in self.accepted if p.name == name), None)
