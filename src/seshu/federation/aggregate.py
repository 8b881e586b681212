"""The release merge: the accepted adapters' updates merged exactly into the current release.

An aggregation method is a `seshu merge` method plus how the submissions weigh (`AGGREGATIONS`):

- fedavg: W + sum(w_i d_i) / sum(w_i), w_i the examples a donor claims, capped at `limits.max_claimed_examples`
  (a donor's count is self-reported, so the cap is the most one submission can weigh). This is `seshu merge`'s
  task_arithmetic with normalize on and lambda 1, on the adapters' exact deltas d_i = scale_i B_i A_i.
- task_arithmetic: W + lambda sum(d_i), every submission weight 1.
- ties / dare_ties: W + lambda * the sign-elected mix of the pruned d_i, at the policy's density.

Near-duplicates (`seshu.federation.similarity`) count once: a group's members share the weight of one submission,
the largest one of them could claim alone (so that copying an update can neither add weight to it nor, by claiming
fewer examples, take weight from it), split evenly. The math itself is all `seshu.merge.engine.merge`: streamed,
checked against the base, and written only when complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seshu.errors import UserError
from seshu.federation.policy import Policy
from seshu.merge.checkpoint import Checkpoint
from seshu.merge.config import MergeConfig
from seshu.merge.engine import MergeReport, merge

Weighting = Literal["examples", "equal"]
# Output dtypes MergeConfig accepts; a base in any other (float8) is written in float32.
_OUT_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class Aggregation:
    name: str
    summary: str
    merge_method: str  # the `seshu merge` method that computes it
    weighting: Weighting  # unless the policy's release.weighting says otherwise
    normalize: bool | None  # None: the merge method's own default
    uses_density: bool  # prunes at release.density
    uses_lambda: bool  # scales the mixed update by release.lambda (fedavg is an average: lambda 1)


AGGREGATIONS: dict[str, Aggregation] = {
    a.name: a
    for a in (
        Aggregation("fedavg", "base + the example-weighted mean of the updates", "task_arithmetic", "examples",
                    normalize=True, uses_density=False, uses_lambda=False),
        Aggregation("task_arithmetic", "base + lambda * the sum of the updates", "task_arithmetic", "equal",
                    normalize=False, uses_density=False, uses_lambda=True),
        Aggregation("ties", "magnitude-pruned updates, sign election, agreeing ones averaged", "ties", "equal",
                    normalize=None, uses_density=True, uses_lambda=True),
        Aggregation("dare_ties", "randomly dropped, rescaled updates with sign election", "dare_ties", "equal",
                    normalize=None, uses_density=True, uses_lambda=True),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Contribution:
    """One accepted submission as the release merge sees it."""

    adapter_dir: Path
    examples_claimed: int
    group: int | None = None  # near-duplicate group: members count once together


def aggregation(name: str) -> Aggregation:
    if name not in AGGREGATIONS:
        raise UserError(f"unknown release method '{name}'; choose from: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]


def release_weights(contributions: Sequence[Contribution], policy: Policy, method: str | None = None) -> list[float]:
    """Each contribution's weight in the release merge (see the module's note on caps and near-duplicates)."""
    chosen = aggregation(method or policy.release.method)
    weighting = policy.release.weighting or chosen.weighting
    cap = policy.limits.max_claimed_examples
    own = []
    for c in contributions:
        if c.examples_claimed < 1:
            raise UserError(f"{c.adapter_dir}: claims {c.examples_claimed} training examples; at least 1 is needed")
        own.append(float(min(c.examples_claimed, cap)) if weighting == "examples" else 1.0)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(contributions):
        if c.group is not None:
            groups.setdefault(c.group, []).append(i)
    weights = list(own)
    for members in groups.values():
        share = max(own[i] for i in members) / len(members)
        for i in members:
            weights[i] = share
    return weights


def release_merge_config(
    base_dir: str | Path,
    contributions: Sequence[Contribution],
    weights: Sequence[float],
    method: str | None = None,
    seed: int | None = None,
    policy: Policy | None = None,
) -> MergeConfig:
    """The `seshu merge` config of a release: the contributions' adapters merged into `base_dir` (the current
    release) with `weights`, in float32, written in the base's own dtype with the base's tokenizer. `policy`
    (default: the default policy) gives the method, density, lambda and seed that are not passed."""
    policy = policy or Policy()
    chosen = aggregation(method or policy.release.method)
    if not contributions:
        raise UserError("no accepted submissions to merge into a release")
    if len(weights) != len(contributions):
        raise ValueError(f"{len(contributions)} contributions but {len(weights)} weights")
    density = {"density": policy.release.density} if chosen.uses_density else {}
    parameters: dict[str, Any] = {
        "lambda": policy.release.lambda_ if chosen.uses_lambda else 1.0,
        "seed": policy.release.seed if seed is None else seed,
    }
    if chosen.normalize is not None:
        parameters["normalize"] = chosen.normalize
    raw = {
        "merge_method": chosen.merge_method,
        "base_model": str(base_dir),
        "models": [
            {"model": str(c.adapter_dir), "parameters": {"weight": float(w), **density}}
            for c, w in zip(contributions, weights, strict=True)
        ],
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": _base_dtype(Path(base_dir)),
        "tokenizer_source": "base",
        "output": {"kind": "model"},
    }
    return MergeConfig.model_validate(raw)


def _base_dtype(base_dir: Path) -> str:
    """The dtype the release is published in: its base's, so that vN+1 is the size vN was."""
    checkpoint = Checkpoint(base_dir)
    floating = [info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point]
    name = str(floating[0]).removeprefix("torch.") if floating else "float32"
    return name if name in _OUT_DTYPES else "float32"


def merge_release(
    base_dir: str | Path,
    contributions: Sequence[Contribution],
    policy: Policy,
    method: str | None,
    out_dir: str | Path,
    progress: bool = False,
) -> MergeReport:
    """Merge the contributions into `base_dir` as the policy says (method None: the policy's) into `out_dir`."""
    name = method or policy.release.method
    weights = release_weights(contributions, policy, name)
    config = release_merge_config(base_dir, contributions, weights, name, policy=policy)
    return merge(config, Path(out_dir), progress=progress)
