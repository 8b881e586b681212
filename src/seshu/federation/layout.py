"""A federation on disk: the folder `seshu server init` makes and every other server command opens.

D/federation.yaml    where the state and the artifacts live (database URL, store URL) and what v0 was made from
D/policy.yaml        the acceptance policy, frozen at init
D/federation.db      the SQLite database (when no other URL was given)
D/store/             the artifact store (when no other URL was given): releases, adapters, evaluation sets
D/staging/           uploads in progress and folders being checked; never read as state
D/cache/             releases and adapters unpacked from the store for evaluation and merging
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from seshu.errors import UserError
from seshu.federation.database import Database

if TYPE_CHECKING:
    from seshu.federation.policy import Policy
    from seshu.hub.store import Store

SETTINGS = "federation.yaml"
POLICY = "policy.yaml"
SFT_RECIPE = "sft-recipe.yaml"


@dataclass
class Federation:
    """An opened federation folder: its settings, database, store and policy."""

    folder: Path
    settings: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> Federation:
        folder = Path(folder)
        path = folder / SETTINGS
        if not path.is_file():
            raise UserError(f"{folder}: not a federation folder (no {SETTINGS}); create one with `seshu server init`")
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(settings, dict) or "db" not in settings or "store" not in settings:
            raise UserError(f"{path}: not a federation settings file (it needs db and store)")
        return cls(folder, settings)

    @cached_property
    def db(self) -> Database:
        return Database(str(self.settings["db"]))

    @cached_property
    def store(self) -> Store:
        from seshu.hub.store import open_store

        return open_store(str(self.settings["store"]))

    @cached_property
    def policy(self) -> Policy:
        from seshu.federation.policy import load_policy

        return load_policy(self.folder / POLICY)

    @property
    def staging(self) -> Path:
        path = self.folder / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def cache(self) -> Path:
        path = self.folder / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def upload_path(self, upload_id: str) -> Path:
        path = self.staging / "uploads"
        path.mkdir(exist_ok=True)
        return path / f"{upload_id}.part"

    def scratch(self, prefix: str) -> Path:
        """A new empty folder under staging/, for work that is thrown away or renamed into place."""
        return Path(tempfile.mkdtemp(dir=self.staging, prefix=prefix))

    def unpack(self, manifest_sha256: str, kind: str) -> Path:
        """The folder stored under `manifest_sha256`, unpacked once into the cache (content-addressed, so a
        cached copy never goes stale)."""
        target = self.cache / kind / manifest_sha256
        if not target.is_dir():
            # Unpacked aside and renamed in: a second thread unpacking the same folder meanwhile never moves
            # the copy a first one is reading (the rename fails on a folder that exists, and the spare goes).
            spare = self.scratch("unpack-")
            try:
                self.store.get_dir(manifest_sha256, spare / "folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    os.rename(spare / "folder", target)
            finally:
                shutil.rmtree(spare, ignore_errors=True)
        return target

    def forget_scratch(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.dispose()
