"""Creating a federation (`seshu server init`): its folder, database, store, frozen evaluation sets and release v0.

v0 is the base model made chat-ready (the chat template and tokens in its tokenizer, embeddings resized), so that
the donors' `seshu sft` runs add no tokens and their adapters are plain LoRA deltas that merge exactly. It is
scored on every evaluation set at once: each later submission and release is judged against those figures.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from seshu.errors import UserError
from seshu.federation import Report
from seshu.federation.database import Database, current_revision, sqlite_url, upgrade
from seshu.federation.evaluation import check_set_file, parse_set_name, score_folder
from seshu.federation.layout import POLICY, SETTINGS, SFT_RECIPE, Federation
from seshu.federation.models import EvalSet, Release, utcnow
from seshu.io import write_text_atomic

DEFAULT_SFT_RECIPE = "seshu:recipes/federation-sft.yaml"


@dataclass(frozen=True)
class InitReport:
    folder: Path
    db: str
    store: str
    release_manifest: str
    metrics: dict[str, Any]
    eval_sets: dict[str, Any]


def parse_eval_set(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` of `--eval-set`."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--eval-set {spec!r}: write it as NAME=PATH (e.g. general-hi=data/hi-heldout.txt)")
    parse_set_name(name)
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--eval-set {name}: {path} is not a file")
    return name, file


def init_federation(
    folder: Path,
    base: str,
    eval_sets: list[str],
    db_url: str | None = None,
    store_url: str | None = None,
    policy_path: Path | None = None,
    sft_recipe: Path | None = None,
    report: Report | None = None,
) -> InitReport:
    """Create the federation in `folder` (new or empty) whose release v0 is `base` (a folder or a Hub id)."""
    from seshu.federation.policy import Policy, load_policy
    from seshu.merge.engine import resolve_reference
    from seshu.models.chat_ready import write_chat_ready_model

    say = report or (lambda _msg: None)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: exists and is not empty; a federation starts in a new folder")
    if not eval_sets:
        raise UserError("give at least one --eval-set NAME=PATH: submissions and releases are judged on them")
    sets = dict(parse_eval_set(spec) for spec in eval_sets)
    if not any(parse_set_name(name).kind == "general" for name in sets):
        raise UserError("give a general evaluation set (general or general-<lang>): it guards the language as a whole")
    policy = load_policy(policy_path) if policy_path else Policy()
    donor_recipe = read_donor_recipe(sft_recipe)
    counts = {name: check_set_file(name, path) for name, path in sets.items()}
    base_folder = resolve_reference(base)

    folder.mkdir(parents=True, exist_ok=True)
    created_tables = False
    try:
        settings = {
            "db": db_url or sqlite_url(folder),
            "store": store_url or str((folder / "store").resolve()),
            "base": base,
            "created": utcnow().isoformat(timespec="seconds"),
        }
        write_text_atomic(
            folder / POLICY, yaml.safe_dump(policy.model_dump(mode="json", by_alias=True), sort_keys=False)
        )
        write_text_atomic(folder / SFT_RECIPE, yaml.safe_dump(donor_recipe, sort_keys=False, allow_unicode=True))
        write_text_atomic(folder / SETTINGS, yaml.safe_dump(settings, sort_keys=False))
        fed = Federation.open(folder)
        if current_revision(fed.db.engine) is not None:
            raise UserError(f"{settings['db']}: holds a federation already; give a new database")
        created_tables = True
        upgrade(fed.db.engine)
        stored: dict[str, Any] = {}
        for name, path in sets.items():
            stored[name] = {"sha256": fed.store.put_file(path), "filename": path.name, "records": counts[name]}
        say("making release v0 chat-ready")
        v0 = fed.scratch("v0-") / "model"
        write_chat_ready_model(str(base_folder), v0)
        say(f"scoring v0 on {len(sets)} evaluation set(s)")
        from seshu.federation.releases import release_set_files

        metrics = score_folder(v0, None, release_set_files(fed, stored))
        manifest = fed.store.put_dir(v0)
        shutil.rmtree(v0.parent, ignore_errors=True)
        with fed.db.transaction() as session:
            for name, item in stored.items():
                kind = parse_set_name(name)
                session.add(
                    EvalSet(name=name, kind=kind.kind, task=kind.task, language=kind.language,
                            sha256=item["sha256"], filename=item["filename"])
                )  # fmt: skip
            session.add(
                Release(
                    version=0,
                    parent=None,
                    manifest_sha256=manifest,
                    method=None,
                    metrics=metrics,
                    eval_sets={k: {"sha256": v["sha256"], "filename": v["filename"]} for k, v in stored.items()},
                    changelog=f"## v0\n\nThe base model {base}, made chat-ready.\n",
                )
            )
        fed.close()
    except BaseException:
        _remove_partial(folder, db_url if created_tables else None)
        raise
    return InitReport(folder, str(settings["db"]), str(settings["store"]), manifest, metrics, stored)


def read_donor_recipe(path: Path | None) -> dict[str, Any]:
    """The SFT recipe donors train with (the packaged one by default): a recipe without model.init_from and
    data.train, which `seshu client train` fills in. Checked now by completing it with placeholders."""
    from seshu import assets
    from seshu.config import SFTRecipe, deep_merge, read_yaml, validate

    source = Path(path) if path else Path(assets.resolve(DEFAULT_SFT_RECIPE))
    raw = read_yaml(source)
    validate(SFTRecipe, deep_merge(raw, complete_donor_recipe("release", "data.jsonl", "out")), str(source))
    return raw


def complete_donor_recipe(release: str, data: str, out: str) -> dict[str, Any]:
    """What `seshu client train` sets in the federation's recipe: the release to train, the data, the output."""
    return {"model": {"init_from": release}, "data": {"train": data}, "output_dir": out}


def _remove_partial(folder: Path, db_url: str | None) -> None:
    # Only what init made: the folder (it was new or empty) and, with an external database, the tables it created.
    if db_url:
        from seshu.federation.database import downgrade

        try:
            db = Database(db_url)
            downgrade(db.engine, "base")
            db.dispose()
        except Exception:  # the database may be unreachable: that is the error the user sees already
            pass
    shutil.rmtree(folder, ignore_errors=True)
