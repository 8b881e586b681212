"""The federation's policy: relative gains, each acceptance rule on tiny inputs, decisions, the release gate and the
policy file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from seshu.errors import UserError
from seshu.federation.policy import (
    RULES,
    Evidence,
    Policy,
    Score,
    decide,
    gains,
    load_policy,
    norm_violations,
    relative_gain,
    release_gate,
)


def loss(value: float) -> Score:
    return Score.of("loss", value)


def chrf(value: float) -> Score:
    return Score.of("chrf", value)


def policy(**sections: dict[str, object]) -> Policy:
    return Policy.model_validate(sections)


# Release vN: a loss on the general set, chrF on two task sets.
REFERENCE = {"general": loss(2.0), "translate": chrf(40.0), "summarize": chrf(30.0)}


def evidence(task: str = "translate", **scores: Score) -> Evidence:
    return Evidence(task=task, scores={**REFERENCE, **scores}, reference=REFERENCE)


# --------------------------------------------------------------------------------------------------
# Scores and gains


def test_relative_gain_has_one_sign_for_both_directions() -> None:
    assert relative_gain(loss(1.9), loss(2.0)) == pytest.approx(0.05)  # loss 5% lower: 5% better
    assert relative_gain(loss(2.1), loss(2.0)) == pytest.approx(-0.05)
    assert relative_gain(chrf(42.0), chrf(40.0)) == pytest.approx(0.05)  # chrF 5% higher: 5% better
    assert relative_gain(chrf(38.0), chrf(40.0)) == pytest.approx(-0.05)
    assert relative_gain(Score.of("perplexity", 8.0), Score.of("perplexity", 10.0)) == pytest.approx(0.2)


def test_relative_gain_edge_values() -> None:
    assert relative_gain(chrf(3.0), chrf(0.0)) == 3.0  # a zero reference: the absolute difference
    assert relative_gain(loss(math.nan), loss(2.0)) == -math.inf  # a diverged model is the worst there is
    assert relative_gain(loss(math.inf), loss(2.0)) == -math.inf
    assert relative_gain(loss(2.0), loss(math.inf)) == math.inf
    assert relative_gain(loss(math.nan), loss(math.inf)) == 0.0
    with pytest.raises(ValueError, match="other direction"):
        relative_gain(loss(1.0), chrf(1.0))


def test_unknown_metric_and_mixed_directions_are_user_errors() -> None:
    with pytest.raises(UserError, match="metric 'rouge' has no known direction"):
        Score.of("rouge", 1.0)
    with pytest.raises(UserError, match="'general' is scored in opposite directions"):
        gains({"general": chrf(2.0)}, {"general": loss(2.0)})


def test_gains_cover_sets_both_have() -> None:
    found = gains({"general": loss(1.5), "extra": loss(1.0)}, {"general": loss(2.0), "translate": chrf(40.0)})
    assert found == {"general": pytest.approx(0.25)}


# --------------------------------------------------------------------------------------------------
# Each rule


def test_rule_complete() -> None:
    check = RULES["complete"]
    assert check(evidence(), Policy()).ok
    partial = Evidence(task="translate", scores={"translate": chrf(41.0)}, reference=REFERENCE)
    verdict = check(partial, Policy())
    assert not verdict.ok
    assert verdict.reason == "not evaluated on 'general', 'summarize'"
    unknown_task = check(evidence(task="poetry"), Policy())
    assert not unknown_task.ok
    assert "'poetry' has no evaluation set" in unknown_task.reason


def test_rule_task_gain() -> None:
    check = RULES["task_gain"]
    strict = policy(acceptance={"min_task_gain": 0.05})
    assert check(evidence(translate=chrf(42.0)), strict).ok  # exactly +5%
    verdict = check(evidence(translate=chrf(41.0)), strict)
    assert not verdict.ok
    assert verdict.reason == "gain on task 'translate' is +2.50%, below the +5.00% required"
    assert not check(evidence(translate=chrf(math.nan)), Policy()).ok  # NaN never passes
    assert not check(Evidence("translate", {}, REFERENCE), Policy()).ok


def test_rule_no_regression_ignores_the_task_set() -> None:
    check = RULES["no_regression"]
    limit = policy(acceptance={"max_regression": 0.02})
    # The task set itself may be anything; 'general' loss 1% worse is within 2%.
    assert check(evidence(translate=chrf(10.0), general=loss(2.02)), limit).ok
    verdict = check(evidence(general=loss(2.1), summarize=chrf(29.0)), limit)
    assert not verdict.ok
    assert verdict.reason == (
        "'general' is 5.00% worse (at most 2.00% allowed); 'summarize' is 3.33% worse (at most 2.00% allowed)"
    )
    assert not check(evidence(summarize=chrf(math.nan)), limit).ok  # NaN on another set is a regression


def test_rule_update_norms() -> None:
    check = RULES["update_norms"]
    limits = policy(limits={"max_module_norm": 1.0, "max_total_norm": 1.5})
    ok = Evidence("translate", REFERENCE, REFERENCE, {"q.weight": 1.0, "v.weight": 1.0}, math.sqrt(2))
    assert check(ok, limits).ok
    big = Evidence("translate", REFERENCE, REFERENCE, {"q.weight": 1.25, "v.weight": 1.0}, 1.6)
    verdict = check(big, limits)
    assert not verdict.ok
    assert verdict.reason == (
        "the update of q.weight has norm 1.25, over the limit 1; the whole update has norm 1.6, over the limit 1.5"
    )
    assert check(big, Policy()).ok  # no limits by default
    assert norm_violations(limits.limits, {"q.weight": math.nan}, 0.0) != []


# --------------------------------------------------------------------------------------------------
# Decisions


def test_decide_accepts_with_every_rule_explained() -> None:
    decision = decide(policy(acceptance={"min_task_gain": 0.01}), evidence(translate=chrf(44.0), general=loss(1.98)))
    assert decision.accepted
    assert [r.split(":")[0] for r in decision.reasons] == list(RULES)
    assert decision.gains == {
        "general": pytest.approx(0.01),
        "summarize": 0.0,
        "translate": pytest.approx(0.1),
    }


def test_decide_rejects_with_only_the_failures() -> None:
    decision = decide(Policy(), evidence(translate=chrf(39.0), general=loss(2.5)))
    assert not decision.accepted
    assert decision.reasons == [
        "task_gain: gain on task 'translate' is -2.50%, below the +0.00% required",
        "no_regression: 'general' is 25.00% worse (at most 2.00% allowed)",
    ]


def test_decide_applies_only_the_policys_rules() -> None:
    only_task = policy(acceptance={"rules": ["task_gain"]})
    decision = decide(only_task, evidence(translate=chrf(41.0), general=loss(3.0)))
    assert decision.accepted
    assert decision.reasons == ["task_gain: gain on task 'translate' is +2.50% (at least +0.00% required)"]


def test_release_gate() -> None:
    gate = policy(release={"max_regression": 0.01})
    held = release_gate(gate, {**REFERENCE, "general": loss(2.01), "translate": chrf(45.0)}, REFERENCE)
    assert held.accepted
    assert held.gains["general"] == pytest.approx(-0.005)
    worse = release_gate(gate, {**REFERENCE, "summarize": chrf(29.0)}, REFERENCE)
    assert not worse.accepted
    assert worse.reasons == ["'summarize' is 3.33% worse (at most 1.00% allowed)"]
    missing = release_gate(gate, {"general": loss(1.0)}, REFERENCE)
    assert missing.reasons == ["not evaluated on 'summarize'", "not evaluated on 'translate'"]


# --------------------------------------------------------------------------------------------------
# The policy file


def test_load_policy_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "limits: {max_rank: 16, max_adapter_bytes: 64MB, max_claimed_examples: 5000}\n"
        "acceptance: {min_task_gain: 0.01, max_regression: 0.05, rules: [complete, task_gain]}\n"
        "release: {method: ties, density: 0.3, lambda: 0.8}\n",
        encoding="utf-8",
    )
    loaded = load_policy(path, ["similarity.duplicate_cosine=0.9"])
    assert loaded.limits.max_rank == 16
    assert loaded.limits.max_adapter_bytes == 64_000_000
    assert loaded.limits.max_claimed_examples == 5000
    assert loaded.acceptance.rules == ["complete", "task_gain"]
    assert loaded.release.method == "ties"
    assert loaded.release.lambda_ == 0.8
    assert loaded.similarity.duplicate_cosine == 0.9
    assert Policy().acceptance.rules == list(RULES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: {max_rnak: 3}\n", "unknown key 'limits.max_rnak'"),
        ("acceptance: {rules: [task_gain, vibes]}\n", "unknown rule 'vibes'"),
        ("release: {method: average}\n", "unknown method 'average'"),
        ("limits: {max_adapter_bytes: lots}\n", "'lots' is not a size"),
        ("similarity: {duplicate_cosine: 1.5}\n", "'similarity.duplicate_cosine'"),
        ("acceptance: [1, 2]\n", "'acceptance'"),
    ],
)
def test_bad_policy_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message) as caught:
        load_policy(path)
    assert str(path) in str(caught.value)


def test_a_diverged_score_travels_as_null_and_counts_as_the_worst() -> None:
    import json

    from seshu.federation.decisions import scores_of
    from seshu.federation.evaluation import score

    sent = json.loads(json.dumps({"general-en": score(math.inf, False, "perplexity")}, allow_nan=False))
    assert sent["general-en"]["value"] is None
    reference = scores_of({"general-en": score(50.0, False, "perplexity")})
    assert gains(scores_of(sent), reference)["general-en"] == -math.inf
    with pytest.raises(UserError, match="a number or null"):
        scores_of({"general-en": {"value": "12", "higher_is_better": False}})
