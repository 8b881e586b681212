"""The federation's policy: limits on what a donor may upload, the rules that accept an adapter, and the gate a
release must pass. A YAML file (every key optional; unknown keys are errors):

    limits:
      max_rank: 64
      max_adapter_bytes: 256MB
      max_module_norm: 5.0             # ||scale * B @ A||_F of any one adapted weight (null: no limit)
      max_total_norm: 20.0             # sqrt of the sum of their squares
      allowed_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      required_target_modules: null
      max_claimed_examples: 100000     # the most a donor's self-reported example count weighs in fedavg
    acceptance:
      rules: [complete, task_gain, no_regression, update_norms]
      min_task_gain: 0.01              # 1% better than the release on the declared task's own set
      max_regression: 0.02             # at most 2% worse than the release on every other set
    similarity:
      duplicate_cosine: 0.95           # submissions this alike count once in a release
    release:
      method: fedavg                   # fedavg, task_arithmetic, ties or dare_ties
      max_regression: 0.01             # a merged release at most 1% worse than the current one on any set
      density: 0.5                     # ties / dare_ties
      lambda: 1.0                      # task_arithmetic / ties / dare_ties
      seed: 0                          # dare's random masks

Every comparison of scores goes through one function, `relative_gain`, whose sign is the same for every metric
(positive = better) so that a rule never has to know whether its set is scored by loss or by chrF. Acceptance
rules are small pure functions in `RULES`; a policy names the ones it applies, and a new rule is one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from seshu.config import StrictModel, apply_overrides, read_yaml, validate
from seshu.errors import UserError
from seshu.merge.checkpoint import parse_size

# Whether a larger value of a metric is better. Losses, perplexity and bits per byte fall as a model improves.
METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "loss": False,
    "perplexity": False,
    "bits_per_byte": False,
    "chrf": True,
    "bleu": True,
    "exact_match": True,
    "accuracy": True,
}
# Below this a reference value counts as zero, and gains are absolute differences instead of relative ones.
_ZERO = 1e-12


# --------------------------------------------------------------------------------------------------
# Scores and gains


@dataclass(frozen=True)
class Score:
    """One evaluation result: its value and which way is better."""

    value: float
    higher_is_better: bool

    @classmethod
    def of(cls, metric: str, value: float) -> Score:
        """A score of a named metric (see METRIC_HIGHER_IS_BETTER)."""
        if metric not in METRIC_HIGHER_IS_BETTER:
            known = ", ".join(METRIC_HIGHER_IS_BETTER)
            raise UserError(f"metric '{metric}' has no known direction; use one of: {known}")
        return cls(float(value), METRIC_HIGHER_IS_BETTER[metric])


def relative_gain(candidate: Score, reference: Score) -> float:
    """How much better `candidate` is than `reference`, relative to the reference: +0.05 is 5% better (a loss
    5% lower, or a chrF 5% higher), -0.02 is 2% worse. A reference of zero gives the absolute difference.

    A non-finite value (a diverged loss, a NaN) is the worst score there is: a non-finite candidate against a
    finite reference is -inf, the other way round +inf, and two of them are level (0), so that no rule ever
    compares against a NaN (where every comparison is false and a check written as `gain < limit` would pass).
    """
    if candidate.higher_is_better != reference.higher_is_better:
        raise ValueError("a score compared with a score of the other direction; they are not the same metric")
    finite_c, finite_r = math.isfinite(candidate.value), math.isfinite(reference.value)
    if not (finite_c and finite_r):
        return 0.0 if finite_c == finite_r else (math.inf if finite_c else -math.inf)
    diff = candidate.value - reference.value
    if not candidate.higher_is_better:
        diff = -diff
    scale = abs(reference.value)
    return diff / scale if scale > _ZERO else diff


def gains(scores: Mapping[str, Score], reference: Mapping[str, Score]) -> dict[str, float]:
    """The relative gain of `scores` over `reference` on every set both have."""
    out = {}
    for name in sorted(set(scores) & set(reference)):
        if scores[name].higher_is_better != reference[name].higher_is_better:
            raise UserError(
                f"evaluation set '{name}' is scored in opposite directions for the two models; evaluate both "
                "with the same metric"
            )
        out[name] = relative_gain(scores[name], reference[name])
    return out


def _regressions(gains_by_set: Mapping[str, float], limit: float, skip: Iterable[str] = ()) -> list[str]:
    """One line for every set (but `skip`) that is more than `limit` worse; written as `not gain >= -limit`."""
    skipped = set(skip)
    return [
        f"'{name}' is {-gain:.2%} worse (at most {limit:.2%} allowed)"
        for name, gain in sorted(gains_by_set.items())
        if name not in skipped and not gain >= -limit
    ]


def _missing(scores: Mapping[str, Score], reference: Mapping[str, Score]) -> list[str]:
    return sorted(set(reference) - set(scores))


# --------------------------------------------------------------------------------------------------
# Acceptance rules


@dataclass(frozen=True)
class Evidence:
    """What the coordinator knows of one submission when it decides: its scores and the current release's on the
    same evaluation sets, the set of the task the donor declared, and the size of its update."""

    task: str
    scores: Mapping[str, Score]  # release vN with the submitted adapter
    reference: Mapping[str, Score]  # release vN itself
    module_norms: Mapping[str, float] = field(default_factory=dict)  # ||scale * B @ A||_F by base weight name
    total_norm: float = 0.0

    def gains(self) -> dict[str, float]:
        return gains(self.scores, self.reference)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


Rule = Callable[[Evidence, "Policy"], Verdict]


def rule_complete(evidence: Evidence, policy: Policy) -> Verdict:
    """The submission was scored on every set the release was, including its declared task's."""
    if evidence.task not in evidence.reference:
        return Verdict(False, f"the declared task '{evidence.task}' has no evaluation set")
    missing = _missing(evidence.scores, evidence.reference)
    if missing:
        return Verdict(False, f"not evaluated on {', '.join(repr(m) for m in missing)}")
    return Verdict(True, f"evaluated on all {len(evidence.reference)} sets")


def rule_task_gain(evidence: Evidence, policy: Policy) -> Verdict:
    """The submission improves its declared task's set by at least `acceptance.min_task_gain`."""
    wanted = policy.acceptance.min_task_gain
    gain = evidence.gains().get(evidence.task)
    if gain is None:
        return Verdict(False, f"no score on the declared task '{evidence.task}'")
    if not gain >= wanted:
        return Verdict(False, f"gain on task '{evidence.task}' is {gain:+.2%}, below the {wanted:+.2%} required")
    return Verdict(True, f"gain on task '{evidence.task}' is {gain:+.2%} (at least {wanted:+.2%} required)")


def rule_no_regression(evidence: Evidence, policy: Policy) -> Verdict:
    """No set other than the declared task's gets more than `acceptance.max_regression` worse."""
    limit = policy.acceptance.max_regression
    worse = _regressions(evidence.gains(), limit, skip=[evidence.task])
    if worse:
        return Verdict(False, "; ".join(worse))
    return Verdict(True, f"no other set is more than {limit:.2%} worse")


def rule_update_norms(evidence: Evidence, policy: Policy) -> Verdict:
    """The update is within the norm limits (checked on arrival too; the policy may have changed since)."""
    over = norm_violations(policy.limits, evidence.module_norms, evidence.total_norm)
    if over:
        return Verdict(False, "; ".join(over))
    return Verdict(True, f"update norm {evidence.total_norm:.4g} within the limits")


RULES: dict[str, Rule] = {
    "complete": rule_complete,
    "task_gain": rule_task_gain,
    "no_regression": rule_no_regression,
    "update_norms": rule_update_norms,
}


def norm_violations(
    limits: Limits,
    module_norms: Mapping[str, float],
    total_norm: float,
    weight_norms: Mapping[str, float] | None = None,
) -> list[str]:
    """One line per norm over its limit (a non-finite norm is over any limit). `weight_norms` (the base's
    ||W|| by weight name) enables the relative limit."""
    out = []
    if limits.max_relative_update is not None and weight_norms is not None:
        bound = limits.max_relative_update
        for name, norm in sorted(module_norms.items()):
            ratio = norm / weight_norms[name] if weight_norms.get(name) else float("inf")
            if not ratio <= bound:
                out.append(f"the update of {name} is {ratio:.3g} times the weight's own norm, over the limit {bound:g}")
    if limits.max_module_norm is not None:
        out += [
            f"the update of {name} has norm {norm:.4g}, over the limit {limits.max_module_norm:.4g}"
            for name, norm in sorted(module_norms.items())
            if not norm <= limits.max_module_norm
        ]
    if limits.max_total_norm is not None and not total_norm <= limits.max_total_norm:
        out.append(f"the whole update has norm {total_norm:.4g}, over the limit {limits.max_total_norm:.4g}")
    return out


@dataclass(frozen=True)
class Decision:
    """The outcome and why: when accepted, what every rule found; when rejected, only what failed."""

    accepted: bool
    reasons: list[str]
    gains: dict[str, float]


def decide(policy: Policy, evidence: Evidence) -> Decision:
    """Apply the policy's acceptance rules, in its order, to one submission."""
    verdicts = {name: RULES[name](evidence, policy) for name in policy.acceptance.rules}
    failed = [f"{name}: {v.reason}" for name, v in verdicts.items() if not v.ok]
    passed = [f"{name}: {v.reason}" for name, v in verdicts.items() if v.ok]
    return Decision(accepted=not failed, reasons=failed or passed, gains=evidence.gains())


def release_gate(
    policy: Policy, candidate_scores: Mapping[str, Score], current_scores: Mapping[str, Score]
) -> Decision:
    """Whether a merged candidate may be published: scored on every set the current release was, and no set more
    than `release.max_regression` worse than the current release."""
    found = gains(candidate_scores, current_scores)
    limit = policy.release.max_regression
    failed = [f"not evaluated on '{name}'" for name in _missing(candidate_scores, current_scores)]
    failed += _regressions(found, limit)
    if failed:
        return Decision(False, failed, found)
    return Decision(True, [f"no set more than {limit:.2%} worse than the current release"], found)


# --------------------------------------------------------------------------------------------------
# The policy file


class _Strict(StrictModel):
    model_config = ConfigDict(**StrictModel.model_config, populate_by_name=True)


class Limits(_Strict):
    max_rank: int = Field(64, ge=1)
    max_adapter_bytes: int = Field(256 * 10**6, ge=1, description="bytes, or a size like 256MB")
    max_module_norm: float | None = Field(None, gt=0)
    max_total_norm: float | None = Field(None, gt=0)
    # ||scale * B @ A|| / ||W|| of any adapted weight: scale-free, so it holds for a model of any size. A fine-tune
    # moves a weight by a few percent of its norm; an update half the size of the weight itself is no fine-tune
    # (an honest adapter scaled x50, a replaced weight) and would dominate any merge it entered.
    max_relative_update: float | None = Field(0.5, gt=0)
    allowed_target_modules: list[str] | None = None
    required_target_modules: list[str] | None = None
    max_claimed_examples: int = Field(100_000, ge=1)

    @field_validator("max_adapter_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_size(value)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return value


class Acceptance(_Strict):
    rules: list[str] = Field(default_factory=lambda: list(RULES))
    min_task_gain: float = 0.0
    max_regression: float = Field(0.02, ge=0)

    @field_validator("rules")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [r for r in value if r not in RULES]
        if unknown:
            raise ValueError(f"unknown rule '{unknown[0]}'; choose from: {', '.join(RULES)}")
        return value


class Similarity(_Strict):
    duplicate_cosine: float = Field(0.95, gt=0, le=1)


class Release(_Strict):
    method: str = "fedavg"
    max_regression: float = Field(0.01, ge=0)
    density: float = Field(0.5, gt=0, le=1)
    lambda_: float = Field(1.0, alias="lambda", gt=0)
    seed: int = 0
    # How submissions weigh: by claimed examples (capped) or equally; null takes the method's own default.
    weighting: Literal["examples", "equal"] | None = None

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        from seshu.federation.aggregate import AGGREGATIONS  # torch-heavy: only when a policy names a method

        if value not in AGGREGATIONS:
            raise ValueError(f"unknown method '{value}'; choose from: {', '.join(AGGREGATIONS)}")
        return value


class Policy(_Strict):
    limits: Limits = Field(default_factory=Limits)
    acceptance: Acceptance = Field(default_factory=Acceptance)
    similarity: Similarity = Field(default_factory=Similarity)
    release: Release = Field(default_factory=Release)


def load_policy(path: str | Path, overrides: list[str] | None = None) -> Policy:
    """Read, override (`--set acceptance.max_regression=0.05`) and validate a policy file."""
    raw = apply_overrides(read_yaml(Path(path)), overrides or [])
    policy: Policy = validate(Policy, raw, str(path))
    return policy
