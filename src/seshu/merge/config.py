"""The `seshu merge` YAML, close to mergekit's, and how its parameters resolve for one tensor.

    merge_method: ties
    base_model: runs/base                  # a folder or a Hub id
    models:
      - model: runs/expert-a               # a model folder, or a LoRA adapter folder of base_model
        parameters: {weight: 0.6, density: 0.5}
      - model: runs/expert-b
        parameters: {weight: [0.2, 0.8], density: 0.5}   # a list is a gradient over layer depth
    parameters: {normalize: true, lambda: 1.0, seed: 0}
    dtype: float32                         # working precision (16-bit dtypes are merged in float32)
    out_dtype: bfloat16                    # written dtype (default: dtype, else the inputs' own)
    tokenizer_source: base                 # base, or one of the inputs
    output: {kind: model, shard_size: 2GB} # or {kind: adapter, rank: 16} when every input is an adapter

A parameter is a number (or bool), a list of numbers (interpolated over the layers: layer i of N sits at
t = i / (N - 1), tensors outside the layers at t = 0, as mergekit does), or a list of `{filter, value}` entries
whose first match on the tensor name (substring; no filter or `*` matches all) gives the value.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from seshu.config import StrictModel
from seshu.errors import UserError
from seshu.merge.methods import METHODS
from seshu.merge.spec import MergeMethod, Param, Scalar, TensorParameters

Gradient = Scalar | list[Scalar]


class Conditional(StrictModel):
    filter: str | None = None
    value: Gradient


Setting = Gradient | Conditional | list[Conditional]


class InputModel(StrictModel):
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)


class OutputSection(StrictModel):
    kind: Literal["model", "adapter"] = "model"
    rank: int | None = Field(default=None, ge=1, description="rank of a re-factored adapter (kind: adapter)")
    shard_size: str | int = "2GB"


class MergeConfig(StrictModel):
    merge_method: str
    models: list[InputModel] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    out_dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    tokenizer_source: str | None = None
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        method = METHODS.get(self.merge_method)
        if method is None:
            raise ValueError(f"unknown merge_method '{self.merge_method}'; choose one of: {', '.join(METHODS)}")
        if method.needs_base and not self.base_model:
            why = " (it merges the inputs' differences from it)" if method.space == "task_vectors" else ""
            raise ValueError(f"{method.name} needs a base_model{why}")
        least, most = method.inputs
        count = len(self.inputs())
        if count < least or (most is not None and count > most):
            wanted = f"exactly {least}" if least == most else f"at least {least}"
            raise ValueError(f"{method.name} takes {wanted} model(s) besides base_model, got {count}")
        for key, value in self.parameters.items():
            param = method.parameter(key)
            if param is None:
                takes = ", ".join(p.name for p in method.accepted)
                raise ValueError(f"{method.name} has no parameter '{key}' (it takes: {takes})")
            _check_setting(param, value)
        for entry in self.models:
            for key, value in entry.parameters.items():
                param = method.parameter(key)
                if param is None or not param.per_input:
                    takes = ", ".join(p.name for p in method.accepted if p.per_input) or "none"
                    raise ValueError(f"{entry.model}: {method.name} takes no model parameter '{key}' (takes: {takes})")
                _check_setting(param, value)
        for param in method.accepted:
            given = param.name in self.parameters or (
                param.per_input and all(param.name in m.parameters for m in self.inputs())
            )
            if param.required and not given:
                raise ValueError(f"{method.name} needs parameters.{param.name} ({param.help})")
        if self.output.kind == "adapter" and self.output.rank is None:
            raise ValueError("output.kind adapter needs output.rank (the rank of the re-factored adapter)")
        return self

    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def inputs(self) -> list[InputModel]:
        """The merged inputs: for methods on a base, `models` without an entry that is the base itself."""
        if not self.method().needs_base:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]


def _values(setting: Setting) -> list[Scalar]:
    if isinstance(setting, Conditional):
        return _values(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    return [setting]


def _check_setting(param: Param, setting: Setting) -> None:
    if param.kind == "integer":  # one plain value: no gradient, no filters
        problem = param.problem(setting) if isinstance(setting, int) else f"parameters.{param.name} must be an integer"
        if problem:
            raise ValueError(problem)
        return
    for value in _values(setting):
        problem = param.problem(value)
        if problem:
            raise ValueError(problem)


def evaluate(setting: Setting, tensor: str, t: float) -> Scalar | None:
    """The value of one setting for `tensor` at depth `t` (None when no filter matches)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, Conditional) for c in setting):
        for cond in setting:
            assert isinstance(cond, Conditional)
            if cond.filter in (None, "*") or cond.filter in tensor:
                return evaluate(cond.value, tensor, t)
        return None
    if isinstance(setting, list):
        values = [v for v in setting if not isinstance(v, Conditional)]
        if not values:
            return None
        if any(isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        position = t * (len(values) - 1)
        low = int(position)
        high = min(len(values) - 1, low + 1)
        return (1 - (position - low)) * values[low] + (position - low) * values[high]
    assert not isinstance(setting, Conditional)
    return setting


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def depth(tensor: str, layers: int) -> float:
    """Where a tensor sits for gradients: layer i of N at i / (N - 1) (1 when N is 1), others at 0."""
    match = LAYER_INDEX.search(tensor)
    if match is None:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def tensor_parameters(config: MergeConfig, tensor: str, layers: int, deltas: bool = False) -> TensorParameters:
    """Every parameter of the method for one tensor (`deltas`: the inputs are task vectors, as adapters are).
    Raises UserError for parameters the method cannot merge this tensor with (a zero divisor, say)."""
    method = config.method()
    t = depth(tensor, layers)

    def global_value(param: Param) -> Scalar:
        value = evaluate(config.parameters[param.name], tensor, t) if param.name in config.parameters else None
        return param.default if value is None else value

    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for param in method.accepted:
        value: Any
        if param.per_input:
            own = [evaluate(m.parameters[param.name], tensor, t) if param.name in m.parameters else None
                   for m in config.inputs()]  # fmt: skip
            value = tuple(param.resolved(v if v is not None else global_value(param)) for v in own)
        else:
            value = param.resolved(global_value(param))
        if param.field:
            fields[param.field] = value
        else:
            extra[param.name] = value
    params = TensorParameters(**fields, extra=extra)
    problem = method.check(params, deltas) if method.check is not None else None
    if problem:
        raise UserError(f"{tensor}: {problem}")
    return params
