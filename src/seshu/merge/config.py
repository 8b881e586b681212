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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from seshu.errors import UserError
from seshu.merge.methods import INPUT_DEFAULTS, METHODS, MergeMethod, TensorParameters

Scalar = bool | int | float
Gradient = Scalar | list[Scalar]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Gradient


Setting = Gradient | Conditional | list[Conditional]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputModel(_Strict):
    model: str
    parameters: dict[str, Setting] = Field(default_factory=dict)


class OutputSection(_Strict):
    kind: Literal["model", "adapter"] = "model"
    rank: int | None = Field(default=None, ge=1, description="rank of a re-factored adapter (kind: adapter)")
    shard_size: str | int = "2GB"


class MergeConfig(_Strict):
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
        if method.uses_base and not self.base_model:
            raise ValueError(f"{method.name} needs a base_model (it merges the inputs' differences from it)")
        least, most = method.inputs
        count = len(self.inputs())
        if count < least or (most is not None and count > most):
            wanted = f"exactly {least}" if least == most else f"at least {least}"
            raise ValueError(f"{method.name} takes {wanted} model(s) besides base_model, got {count}")
        global_names = (*method.global_parameters, "seed")
        for key, value in self.parameters.items():
            if key not in global_names and key not in method.input_parameters:
                raise ValueError(f"{method.name} has no parameter '{key}' (it takes: {', '.join(global_names)})")
            if key == "seed" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError("parameters.seed must be an integer")
            _check_values(key, value)
        for entry in self.models:
            for key, value in entry.parameters.items():
                if key not in method.input_parameters:
                    takes = ", ".join(method.input_parameters) or "none"
                    raise ValueError(f"{entry.model}: {method.name} takes no model parameter '{key}' (takes: {takes})")
                _check_values(key, value)
        if method.name == "slerp" and "t" not in self.parameters:
            raise ValueError("slerp needs parameters.t (0 gives base_model, 1 the other model)")
        if self.output.kind == "adapter" and self.output.rank is None:
            raise ValueError("output.kind adapter needs output.rank (the rank of the re-factored adapter)")
        return self

    def method(self) -> MergeMethod:
        return METHODS[self.merge_method]

    def inputs(self) -> list[InputModel]:
        """The merged inputs: for methods on a base, `models` without an entry that is the base itself."""
        if not self.method().uses_base:
            return list(self.models)
        return [m for m in self.models if m.model != self.base_model]


def _values(setting: Setting) -> list[Scalar]:
    if isinstance(setting, Conditional):
        return _values(setting.value)
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    return [setting]


def _check_values(key: str, setting: Setting) -> None:
    for value in _values(setting):
        if key in ("normalize", "rescale"):
            if not isinstance(value, bool):
                raise ValueError(f"parameter {key} must be true or false, got {value!r}")
        elif isinstance(value, bool):
            raise ValueError(f"parameter {key} must be a number, got {value!r}")
        elif key == "density" and not 0 < value <= 1:
            raise ValueError(f"density must be in (0, 1], got {value}")
        elif key in ("t", "gamma") and not 0 <= value <= 1:
            raise ValueError(f"{key} must be in [0, 1], got {value}")


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


def tensor_parameters(config: MergeConfig, tensor: str, layers: int) -> TensorParameters:
    """Every parameter of the method for one tensor. Raises UserError for a zero divisor with normalize."""
    method = config.method()
    t = depth(tensor, layers)

    def global_value(key: str, default: Any) -> Any:
        value = evaluate(config.parameters[key], tensor, t) if key in config.parameters else None
        return default if value is None else value

    def per_input(key: str) -> tuple[float, ...]:
        out = []
        for entry in config.inputs():
            own = evaluate(entry.parameters[key], tensor, t) if key in entry.parameters else None
            out.append(float(own if own is not None else global_value(key, INPUT_DEFAULTS[key])))
        return tuple(out)

    normalize = bool(global_value("normalize", method.default_normalize))
    params = TensorParameters(
        weights=per_input("weight"),
        densities=per_input("density"),
        gammas=per_input("gamma"),
        normalize=normalize,
        lambda_=float(global_value("lambda", 1.0)),
        rescale=bool(global_value("rescale", method.default_rescale)),
        t=float(global_value("t", 0.5)),
        seed=int(config.parameters.get("seed", 0)),  # type: ignore[arg-type]  # checked to be an int
    )
    if normalize and not method.sign_election and method.name != "slerp" and abs(sum(params.weights)) < 1e-8:
        raise UserError(
            f"{tensor}: the weights sum to zero, so normalize would divide by zero; change the weights or set "
            "parameters.normalize: false"
        )
    return params
