"""`seshu server report` (every frozen set's score against release version, as a PNG) and `--push-to-hub`
(a release uploaded to a Hub model repository and tagged `v<N>`), against a fake `HfApi` that records its calls."""

from __future__ import annotations

import inspect
import json
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from matplotlib.image import imread
from safetensors.torch import save_file
from typer.testing import CliRunner

from seshu import cli
from seshu.errors import UserError
from seshu.federation import plot
from seshu.federation.database import sqlite_url, upgrade
from seshu.federation.hub_push import push_release
from seshu.federation.layout import Federation
from seshu.federation.models import Release

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _score(value: float, higher_is_better: bool, metric: str) -> dict[str, Any]:
    return {"value": value, "higher_is_better": higher_is_better, "metric": metric}


# Three releases scored on four sets: two perplexities, an answer perplexity and a chrF (higher is better).
METRICS = [
    {
        "general-en": _score(400.0 - 10 * v, False, "perplexity"),
        "general-hi": _score(900.0 - 50 * v, False, "perplexity"),
        "instruct": _score(380.0 - 40 * v, False, "answer_ppl"),
        "translation-hi": _score(10.0 + 5 * v, True, "chrf"),
    }
    for v in range(3)
]


def release_federation(folder: Path, metrics: list[dict[str, Any]]) -> Federation:
    """A federation whose releases v0..vN are tiny model folders in its store (config.json + model.safetensors,
    each version's own bytes) with `metrics`; nothing but the database and the store."""
    folder.mkdir()
    (folder / "federation.yaml").write_text(f"db: {sqlite_url(folder)}\nstore: {folder / 'store'}\n")
    fed = Federation.open(folder)
    upgrade(fed.db.engine)
    for version, scores in enumerate(metrics):
        model = folder / "made" / f"v{version}"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "made_for": f"v{version}"}))
        save_file({"w": torch.full((2, 2), float(version))}, str(model / "model.safetensors"))
        if version == 1:  # a file v0 does not have: a push of v0 after v1 must not keep it
            (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 64}))
        with fed.db.transaction() as session:
            session.add(
                Release(version=version, parent=version - 1 if version else None,
                        manifest_sha256=fed.store.put_dir(model), metrics=scores)
            )  # fmt: skip
    return fed


def test_report_writes_a_png_with_one_panel_per_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = release_federation(tmp_path / "fed", METRICS)
    drawn: dict[str, dict[str, Any]] = {}
    figures: list[Any] = []
    real_panel, real_save = plot.panel, plot.save_figure

    def panel(ax: Any, points: list[tuple[int, float]], title: str, ylabel: str, color: str, **kw: Any) -> None:
        drawn[title] = {"points": points, "ylabel": ylabel, **kw}
        real_panel(ax, points, title, ylabel, color, **kw)

    def save_figure(figure: Any, out: Path) -> Path:
        figures.append(figure)
        return real_save(figure, out)

    monkeypatch.setattr(plot, "panel", panel)
    monkeypatch.setattr(plot, "save_figure", save_figure)
    cli._register()
    out = tmp_path / "plots" / "federation.png"
    result = CliRunner().invoke(cli.app, ["server", "report", "--dir", str(tmp_path / "fed"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}\n"

    # Every set, every release, in version order; log scale for perplexities only.
    assert drawn == {
        "general-en (lower is better)": {"points": [(v, 400.0 - 10 * v) for v in range(3)], "ylabel": "perplexity",
                                         "log_y": True, "xlabel": "release"},
        "general-hi (lower is better)": {"points": [(v, 900.0 - 50 * v) for v in range(3)], "ylabel": "perplexity",
                                         "log_y": True, "xlabel": "release"},
        "instruct (lower is better)": {"points": [(v, 380.0 - 40 * v) for v in range(3)], "ylabel": "answer_ppl",
                                       "log_y": True, "xlabel": "release"},
        "translation-hi (higher is better)": {"points": [(v, 10.0 + 5 * v) for v in range(3)], "ylabel": "chrf",
                                              "log_y": False, "xlabel": "release"},
    }  # fmt: skip
    (figure,) = figures
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == sorted(drawn)  # 4 panels on a 3-wide grid: 2 left empty
    assert all(list(ax.get_xticks()) == [0, 1, 2] for ax in visible)
    assert figure.get_suptitle() == "Seshu federation: 3 release(s)"

    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert imread(out).shape[:2] == (round(3.4 * 2 * 120), round(4.5 * 3 * 120))  # two rows of three, 120 dpi
    assert [p.name for p in out.parent.iterdir()] == ["federation.png"]  # written atomically, no temporary left
    fed.close()


def test_report_user_errors(tmp_path: Path) -> None:
    release_federation(tmp_path / "fed", METRICS[:1]).close()
    cli._register()
    runner = CliRunner()
    wrong = runner.invoke(cli.app, ["server", "report", "--dir", str(tmp_path / "fed"), "--out", "plot.txt"])
    assert isinstance(wrong.exception, UserError) and "cannot write '.txt' images" in str(wrong.exception)
    nowhere = runner.invoke(cli.app, ["server", "report", "--dir", str(tmp_path), "--out", "plot.png"])
    assert isinstance(nowhere.exception, UserError) and "not a federation folder" in str(nowhere.exception)


# ------------------------------------------------------------------------------------------------- Hub push


GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`, holding repositories as {path: bytes}: every call is bound to HfApi's
    own signature (a call the real API would refuse fails here too) and recorded. upload_folder commits as the Hub
    does: remote files matching `delete_patterns` go (.gitattributes never does), then the folder's files land."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, dict[str, bytes]] = {}  # commit id -> the repository's files at that commit
        self.tags: dict[tuple[str, str], dict[str, bytes]] = {}
        self.fail = fail

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = inspect.signature(getattr(HfApi, method)).bind(self, *args, **kwargs)
        self.calls.append((method, args, kwargs))
        if method == self.fail:
            response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
            raise HfHubHTTPError(
                '403 Forbidden: You don\'t have the rights to create a model under the namespace "seshu-org".\n'
                "Cannot access content at: https://huggingface.co/api/repos/create.",
                response=response,
            )
        return {k: v for k, v in bound.arguments.items() if k != "self"}

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        call = self._call("create_repo", args, kwargs)
        self.repos.setdefault(call["repo_id"], {".gitattributes": GITATTRIBUTES})
        return f"https://huggingface.co/{call['repo_id']}"

    def upload_folder(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call("upload_folder", args, kwargs)
        files, folder = self.repos[call["repo_id"]], Path(call["folder_path"])
        patterns = call.get("delete_patterns") or []
        for name in [n for n in files if n != ".gitattributes"]:
            if any(fnmatch(name, p) for p in ([patterns] if isinstance(patterns, str) else patterns)):
                del files[name]
        files.update({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
        oid = f"{len(self.commits) + 1:040x}"
        self.commits[oid] = dict(files)
        return SimpleNamespace(oid=oid)  # what the code reads of a CommitInfo

    def create_tag(self, *args: Any, **kwargs: Any) -> None:
        call = self._call("create_tag", args, kwargs)
        self.tags[(call["repo_id"], call["tag"])] = self.commits[call["revision"]]


def _stored_files(fed: Federation, version: int) -> dict[str, bytes]:
    made = fed.folder / "made" / f"v{version}"
    return {p.name: p.read_bytes() for p in sorted(made.iterdir())}


def test_push_release_uploads_the_release_folder_and_tags_its_commit(tmp_path: Path) -> None:
    fed = release_federation(tmp_path / "fed", METRICS[:2])
    hub = FakeHub()
    assert push_release(fed, 1, "seshu-org/demo", api=hub) == "0" * 39 + "1"
    assert [name for name, _, _ in hub.calls] == ["create_repo", "upload_folder", "create_tag"]
    assert hub.calls[0][1:] == (("seshu-org/demo",), {"repo_type": "model", "exist_ok": True})
    upload = hub.calls[1][2]
    assert upload["repo_id"] == "seshu-org/demo" and upload["commit_message"] == "Seshu federation release v1"
    assert Path(upload["folder_path"]).parent == fed.cache / "releases"  # the release, unpacked from the store
    assert hub.calls[2][2] == {"tag": "v1", "revision": "0" * 39 + "1", "tag_message": "release v1"}
    v1 = hub.tags[("seshu-org/demo", "v1")]
    assert v1 == {".gitattributes": GITATTRIBUTES, **_stored_files(fed, 1)}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(v1)

    # An older release pushed later: its tag holds exactly its own files, none left over from v1.
    assert push_release(fed, 0, "seshu-org/demo", api=hub) == "0" * 39 + "2"
    assert hub.tags[("seshu-org/demo", "v0")] == {".gitattributes": GITATTRIBUTES, **_stored_files(fed, 0)}
    assert hub.tags[("seshu-org/demo", "v1")] == v1  # a tag does not move
    fed.close()


def test_push_release_errors_are_one_line(tmp_path: Path) -> None:
    fed = release_federation(tmp_path / "fed", METRICS[:2])
    hub = FakeHub(fail="upload_folder")
    with pytest.raises(UserError) as refused:
        push_release(fed, 1, "seshu-org/demo", api=hub)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        "seshu-org/demo: pushing v1 to the Hub failed: 403 Forbidden: You don't have the rights to create a model "
        'under the namespace "seshu-org".'
    )
    assert [name for name, _, _ in hub.calls] == ["create_repo", "upload_folder"]  # no tag on a failed upload
    with pytest.raises(UserError, match="release v7 not found"):
        push_release(fed, 7, "seshu-org/demo", api=FakeHub())
    fed.close()
