"""Releases: v0 made at init, and each later version merged from the accepted submissions, judged, and published
only when it holds up.

`publish_release` merges the accepted, not yet merged submissions of the current release exactly in weight space
(`seshu.federation.aggregate`, the merge engine in float32), optionally continues pretraining on server data,
scores the candidate on every frozen set and publishes v(N+1) only if the policy's release rule holds. The new
folder goes into the store first; it becomes the release, and its submissions become merged, in one database
transaction, so a crash at any point leaves either vN with its submissions still waiting or v(N+1) with them
merged, never a half of each. Releases are immutable: a version's row and folder are never changed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from seshu.errors import UserError
from seshu.federation import Report
from seshu.federation.decisions import scores_of
from seshu.federation.evaluation import eval_set_files, score_folder
from seshu.federation.layout import Federation
from seshu.federation.models import Client, Release, Submission, utcnow
from seshu.federation.policy import release_gate
from seshu.federation.submissions import current_release
from seshu.hub.card import render_card

RELEASE_COMMAND = "server release"
CHANGELOG = "CHANGELOG.md"
# The files of a model folder that make the release (a continued-pretraining run folder also holds checkpoints
# and logs, which do not belong in it).
MODEL_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


@dataclass
class ReleaseOutcome:
    published: bool
    version: int | None  # the new version when published
    parent: int
    method: str
    reasons: list[str]
    contributions: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    gains: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def release_set_files(fed: Federation, sets: dict[str, Any]) -> dict[str, Path]:
    """The frozen evaluation sets of a release as local files, from the federation's store."""
    return eval_set_files(fed.cache, sets, fed.store.get_file)


def publish_release(
    fed: Federation,
    method: str | None = None,
    cpt_recipe: Path | None = None,
    report: Report | None = None,
    device: str | None = None,
) -> ReleaseOutcome:
    """Merge, judge and (if it holds up) publish the next release; see the module's docstring. The candidate is
    scored on `device` (the evaluation workers' choice: default, the best there is)."""
    from seshu.federation.aggregate import Contribution, aggregation, merge_release, release_weights
    from seshu.federation.similarity import near_duplicate_groups
    from seshu.merge.adapters import read_adapter
    from seshu.merge.lora import adapter_pairs

    say = report or (lambda _msg: None)
    method = method or fed.policy.release.method
    aggregation(method)  # an unknown method fails before anything is read
    with fed.db.read() as session:
        current = current_release(session)
        rows = list(
            session.execute(
                select(Submission, Client.name)
                .join(Client, Client.id == Submission.client_id)
                .where(
                    Submission.status == "accepted",
                    Submission.release_version == current.version,
                    Submission.merged_in.is_(None),
                )
                .order_by(Submission.id)
            )
        )
    if not rows:
        raise UserError(f"no accepted submissions wait to be merged into v{current.version}; nothing to release")
    say(f"merging {len(rows)} accepted submission(s) into v{current.version} ({method})")
    base = fed.unpack(current.manifest_sha256, "releases")
    adapters = [fed.unpack(str(sub.adapter_manifest), "adapters") for sub, _ in rows]  # set on every accepted one
    updates = [adapter_pairs(read_adapter(path)) for path in adapters]
    groups = near_duplicate_groups(
        updates, [str(sub.client_id) for sub, _ in rows], fed.policy.similarity.duplicate_cosine
    )
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    contributions = [
        Contribution(adapter_dir=path, examples_claimed=max(1, sub.examples_claimed), group=group_of.get(i))
        for i, ((sub, _), path) in enumerate(zip(rows, adapters, strict=True))
    ]
    weights = release_weights(contributions, fed.policy, method)
    work = fed.scratch("release-")
    try:
        candidate = work / "merged"
        merge_release(base, contributions, fed.policy, method, candidate)
        if cpt_recipe is not None:
            say("continued pretraining on server data")
            candidate = _continue_pretraining(cpt_recipe, candidate, work, say)
        say("scoring the candidate on every frozen set")
        metrics = score_folder(candidate, None, release_set_files(fed, current.eval_sets), device=device)
        gate = release_gate(fed.policy, scores_of(metrics), scores_of(current.metrics))
        credits = [
            {
                "client": name,
                "blind_id": sub.blind_id,
                "task": sub.task,
                "language": sub.language,
                "examples_claimed": sub.examples_claimed,
                "weight": weights[i],
                "duplicate_group": group_of.get(i),
                "gains": sub.gains,
            }
            for i, (sub, name) in enumerate(rows)
        ]
        outcome = ReleaseOutcome(
            published=gate.accepted,
            version=None,
            parent=current.version,
            method=method,
            reasons=gate.reasons,
            contributions=credits,
            metrics=metrics,
            gains=gate.gains,
        )
        if not gate.accepted:
            return outcome
        version = current.version + 1
        entry = _changelog_entry(version, current.version, method, credits, gate.gains)
        _write_card(fed, candidate, version, current, method, credits, metrics, entry)
        manifest = fed.store.put_dir(candidate)
        try:
            with fed.db.transaction() as session:
                session.add(
                    Release(
                        version=version,
                        parent=current.version,
                        manifest_sha256=manifest,
                        method=method,
                        metrics=metrics,
                        eval_sets=dict(current.eval_sets),
                        changelog=entry,
                    )
                )
                session.flush()  # a concurrent release of the same version fails here, before anything else
                for i, (sub, _) in enumerate(rows):
                    row = session.get(Submission, sub.id)
                    assert row is not None
                    if row.status != "accepted" or row.merged_in is not None:
                        raise UserError(f"submission {sub.blind_id} changed while the release was made; run it again")
                    row.status, row.merged_in, row.weight = "merged", version, weights[i]
                # What was accepted (or is still being evaluated) on vN while this release was made can no longer
                # be merged: it is a delta on vN. Decided here, in the same transaction, so nothing waits forever.
                merged_ids = {sub.id for sub, _ in rows}
                for late in session.scalars(
                    select(Submission).where(
                        Submission.release_version == current.version,
                        Submission.status == "accepted",
                        Submission.id.not_in(merged_ids),
                    )
                ):
                    late.status = "rejected"
                    late.reason = (
                        f"release v{current.version} was superseded by v{version} before it could be merged; "
                        f"train on v{version} and submit again"
                    )
        except IntegrityError:
            raise UserError(
                f"release v{version} was published by another command meanwhile; nothing was changed"
            ) from None
        outcome.version = version
        say(f"published v{version}")
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _continue_pretraining(recipe_path: Path, model: Path, work: Path, say: Report) -> Path:
    from seshu.config import PretrainRecipe, load_recipe
    from seshu.train.pretrain import run

    recipe: PretrainRecipe = load_recipe(
        PretrainRecipe, recipe_path, [f"model.init_from={model}", f"output_dir={work / 'cpt'}"]
    )
    result = run(recipe, log=say)
    folder = Path(result.output_dir)
    out = work / "continued"
    out.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.suffix in MODEL_SUFFIXES:
            shutil.copy2(path, out / path.name)
    return out


def _changelog_entry(
    version: int, parent: int, method: str, credits: list[dict[str, Any]], gains: dict[str, float]
) -> str:
    lines = [f"## v{version} ({utcnow():%Y-%m-%d})", "", f"Merged into v{parent} with {method}. Contributors:", ""]
    for c in credits:
        task_gain = {k: v for k, v in (c["gains"] or {}).items() if v is not None}
        best = ", ".join(f"{k} {v:+.2%}" for k, v in sorted(task_gain.items()))
        lines.append(f"- **{c['client']}**: {c['task']} ({c['language']}), weight {c['weight']:g}; measured: {best}")
    lines += ["", "Against v{}: {}".format(parent, ", ".join(f"{k} {v:+.2%}" for k, v in sorted(gains.items()))), ""]
    return "\n".join(lines)


def _write_card(
    fed: Federation,
    folder: Path,
    version: int,
    parent: Release,
    method: str,
    credits: list[dict[str, Any]],
    metrics: dict[str, Any],
    entry: str,
) -> None:
    previous = fed.unpack(parent.manifest_sha256, "releases") / CHANGELOG
    history = previous.read_text(encoding="utf-8") if previous.is_file() else ""
    (folder / CHANGELOG).write_text(f"# Changelog\n\n{entry}\n{history.removeprefix('# Changelog').lstrip()}", "utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["seshu", "federated", str(config.get("model_type", ""))],
        "seshu": {
            "command": RELEASE_COMMAND,
            "version": version,
            "parent": parent.version,
            "method": method,
            # Credited by name, without the blind ids: the card is public, and who sent which blind id is the
            # admins' to know.
            "contributors": [{k: v for k, v in c.items() if k != "blind_id"} for c in credits],
            "metrics": metrics,
            "eval_sets": parent.eval_sets,
        },
    }
    body = (
        f"Release v{version} of a Seshu federation: v{parent.version} with the accepted adapters of "
        f"{len(credits)} contribution(s) merged exactly ({method}).\n\n{entry}\n"
    )
    (folder / "README.md").write_text(render_card(f"Seshu federation release v{version}", metadata, body), "utf-8")
