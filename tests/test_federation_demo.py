"""`seshu quickstart --federated` (seshu.federation.demo): a whole round over HTTP, a hostile donor caught twice, a
release better than v0; the same flow on a tiny Mamba; and the real-scale federation recipe as a policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

from federation_service import save_tiny_chatless_base
from sqlalchemy import select

from seshu.federation.demo import DONORS, run_federated_demo, split_conversations
from seshu.federation.layout import Federation
from seshu.federation.models import Job
from seshu.federation.policy import load_policy

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_a_demo_round_rejects_the_hostile_donor_and_v1_beats_v0(tmp_path: Path) -> None:
    said: list[str] = []
    # Reduced: 30 pretraining steps instead of 300, 24 donor steps instead of 80 (at a higher rate).
    result = run_federated_demo(tmp_path, said.append, pretrain_steps=30, donor_steps=24, donor_lr=1.5e-3)

    loud, flipped = result.of("chandra")
    assert loud.tampering == "B x50" and flipped.tampering == "sign-flipped"
    # x50 is refused on arrival, before any evaluation, for the size of its update; it was never scored.
    assert loud.status == "rejected" and "times the weight's own norm" in loud.reason and not loud.gains
    # Sign-flipped is as large as an honest update: it is evaluated blind and rejected for what it does.
    assert flipped.status == "rejected" and "task_gain" in flipped.reason
    assert flipped.gains["instruct"] is not None and flipped.gains["instruct"] < 0

    honest = [s for d in DONORS if not d.hostile for s in result.of(d.name)]
    assert all(s.tampering is None and (s.gains["instruct"] or 0) > 0 for s in honest)
    assert any(s.status == "merged" for s in honest), [s.reason for s in honest]

    assert result.published and result.version == 1, result.release_reasons
    assert result.metrics[1]["instruct"] < result.metrics[0]["instruct"]
    for donor in DONORS:
        if not donor.hostile:
            before, after = result.task_scores[donor.name]
            assert after < before, (donor.name, before, after)
    changelog = (result.workdir / "donors" / "v1" / "CHANGELOG.md").read_text()  # credits by name, as pulled
    assert all((f"**{s.donor}**" in changelog) == (s.status == "merged") for s in result.submissions)

    # What the worker was given names no donor; what was reported shows every blind id and the hostile reasons.
    fed = Federation.open(result.federation_dir)
    with fed.db.read() as session:
        payloads = json.dumps([job.payload for job in session.scalars(select(Job))])
    fed.close()
    assert not any(d.name in payloads for d in DONORS)
    text = "\n".join(said)
    assert all(s.blind_id in text for s in result.submissions)
    assert "[6/6]" in text and "times the weight's own norm" in text
    assert 0 < result.seconds["base"] < result.seconds["total"]


def test_a_tiny_mamba_base_goes_through_init_training_evaluation_and_release(tmp_path: Path) -> None:
    base = save_tiny_chatless_base(tmp_path / "mamba", arch="mamba")
    result = run_federated_demo(tmp_path / "demo", base=base, donors=DONORS[:1], donor_steps=30, donor_lr=5e-3)

    config = json.loads((tmp_path / "demo" / "donors" / "asha" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["in_proj", "x_proj"]  # the registry's Mamba targets
    (sub,) = result.submissions
    assert sub.status == "merged", sub.reason
    assert result.published and result.version == 1
    v1 = json.loads((tmp_path / "demo" / "donors" / "v1" / "config.json").read_text())
    assert v1["model_type"] == "mamba"
    # One adapter at fedavg weight 1: v1 is v0 + the adapter's exact delta, so it scores what the worker measured
    # for v0 with the adapter loaded; a merge that dropped or changed a Mamba LoRA target would not.
    for name, value in sub.scores.items():
        assert math.isclose(result.metrics[1][name], value, rel_tol=1e-4), (name, result.metrics[1][name], value)
    assert result.metrics[1]["instruct"] < result.metrics[0]["instruct"]


def test_conversations_split_apart_and_whole(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[1] / "src" / "seshu" / "assets" / "instructions" / "qa.jsonl"
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert split_conversations(str(source), train, held) == (30, 10)
    a, b = train.read_text().splitlines(), held.read_text().splitlines()
    assert not set(a) & set(b) and sorted(a + b) == sorted(source.read_text().splitlines())
    split_conversations(str(source), tmp_path / "again.jsonl", tmp_path / "again-held.jsonl")
    assert (tmp_path / "again-held.jsonl").read_text() == held.read_text()  # seeded


def test_the_real_scale_federation_recipe_is_a_policy_for_the_mamba_base() -> None:
    from seshu.config import PretrainRecipe, load_recipe
    from seshu.models.registry import get_arch

    path = RECIPES / "seshu-federation.yaml"
    policy = load_policy(path)  # the whole file: what `seshu server init --policy` reads
    assert policy.acceptance.max_regression == 0.02 and policy.release.max_regression == 0.01
    assert policy.release.method == "fedavg" and policy.limits.max_relative_update == 0.25
    base = load_recipe(PretrainRecipe, RECIPES / "seshu-mamba.yaml")
    assert policy.limits.allowed_target_modules == list(get_arch(base.model.arch).lora_modules)
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    text = "\n".join(header)
    for command in ("seshu pretrain --config recipes/seshu-mamba.yaml", "--policy recipes/seshu-federation.yaml",
                    "seshu server start", "seshu server worker", "seshu server release", "seshu client pull",
                    "seshu client train", "seshu client submit"):  # fmt: skip
        assert command in text, command
