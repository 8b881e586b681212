"""The federation end to end over real HTTP on 127.0.0.1: init, pull, train, submit, blind evaluation, release,
with hostile submissions along the way and every role held to its routes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch
from federation_service import save_tiny_chatless_base, serving, write_policy, write_sets
from safetensors.torch import load_file, save_file

from seshu.errors import UserError
from seshu.federation import auth
from seshu.federation.app import create_app
from seshu.federation.client import RELEASE_MARKER, Coordinator, RemoteJobs
from seshu.federation.coordinator import init_federation
from seshu.federation.donor import adapter_facts, train_adapter
from seshu.federation.layout import Federation
from seshu.federation.releases import publish_release
from seshu.federation.worker import run_worker


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    base = save_tiny_chatless_base(root / "base")
    return {"root": root, "base": base, **write_sets(root / "sets")}


def _init(world: dict[str, Path], folder: Path, db_url: str | None = None) -> Federation:
    policy = write_policy(world["root"] / "policy.yaml")
    sets = [f"general-en={world['general-en']}", f"instruct={world['instruct']}"]
    init_federation(folder, str(world["base"]), sets, db_url=db_url, policy_path=policy)
    return Federation.open(folder)


def _tokens(fed: Federation) -> dict[str, str]:
    with fed.db.transaction() as session:
        return {
            name: auth.add_client(session, name, role)[1]
            for name, role in (("asha", "client"), ("bala", "client"), ("w1", "worker"), ("root", "admin"))
        }


def _scaled(adapter: Path, out: Path, factor: float) -> Path:
    out.mkdir()
    for item in adapter.iterdir():
        if item.is_file():
            (out / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    scaled = {k: v * factor if "lora_B" in k else v for k, v in tensors.items()}
    save_file(scaled, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_federation_round_trip(world: dict[str, Path], tmp_path: Path) -> None:
    fed = _init(world, tmp_path / "fed")
    tokens = _tokens(fed)
    with serving(create_app(fed)) as url:
        asha, bala = Coordinator(url, tokens["asha"]), Coordinator(url, tokens["bala"])
        worker, admin = Coordinator(url, tokens["w1"]), Coordinator(url, tokens["root"])

        # Pull v0: chat-ready (the template and tokens are in its tokenizer), verified, marked.
        info = asha.pull("latest", tmp_path / "v0")
        assert info["version"] == 0
        assert json.loads((tmp_path / "v0" / RELEASE_MARKER).read_text())["version"] == 0
        for entry in info["files"]:
            digest = hashlib.sha256((tmp_path / "v0" / entry["path"]).read_bytes()).hexdigest()
            assert digest == entry["sha256"]
        assert (
            "chat_template" in (tmp_path / "v0" / "tokenizer_config.json").read_text()
            or (tmp_path / "v0" / "chat_template.jinja").is_file()
        )

        # A donor trains with the federation's recipe; the adapter records what it was trained on.
        recipe = asha.json("GET", "/recipe")["recipe"]
        overrides = ["train.max_steps=40", "train.eval_every=40", "train.save_every=40", "train.seq_len=128"]
        result = train_adapter(
            tmp_path / "v0", str(world["donor"]), tmp_path / "honest", recipe=recipe, overrides=overrides
        )
        facts = adapter_facts(result.output_dir)
        assert facts["release"] == 0 and facts["examples"] == result.examples > 0 and facts["answer_tokens"] > 0
        config = json.loads((result.output_dir / "adapter_config.json").read_text())
        assert not config.get("trainable_token_indices")  # v0 carried the chat tokens: a plain LoRA delta

        honest = asha.submit("instruct", "en", 0, adapter=result.output_dir, examples=facts["examples"])
        assert honest["status"] == "validated", honest

        # Hostile: x50 (refused on arrival for its norm), sign-flipped (judged worse), a stale release.
        loud = bala.submit("instruct", "en", 0, adapter=_scaled(result.output_dir, tmp_path / "x50", 50.0), examples=10)
        assert loud["status"] == "rejected" and "times the weight's own norm" in loud["reason"]
        flipped = bala.submit(
            "instruct", "en", 0, adapter=_scaled(result.output_dir, tmp_path / "neg", -1.0), examples=10
        )
        assert flipped["status"] == "validated"
        stale = bala.submit("instruct", "en", 7, adapter=result.output_dir, examples=10)
        assert stale["status"] == "rejected" and "current release is v0" in stale["reason"]

        # Roles: a worker sees no clients, tokens or submissions; a client no jobs or blobs.
        for path in ("/submissions", "/admin/clients"):
            with pytest.raises(UserError, match="403"):
                worker.json("GET", path)
        with pytest.raises(UserError, match="403"):
            asha.json("POST", "/jobs/claim", json={})
        with pytest.raises(UserError, match="401"):
            Coordinator(url, "seshu_not-a-token").json("GET", "/releases")

        # The worker's jobs carry blind ids only.
        with fed.db.read() as session:
            from sqlalchemy import select

            from seshu.federation.models import Job

            payloads = [job.payload for job in session.scalars(select(Job))]
        assert payloads and all("client" not in json.dumps(p) and "asha" not in json.dumps(p) for p in payloads)
        assert run_worker(RemoteJobs(worker, tmp_path / "worker-cache"), "t", once=True) == 2
        # What the worker fetched of each adapter: its weights and config, nothing of the donor's card or paths.
        for folder in (tmp_path / "worker-cache" / "adapters").iterdir():
            assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
            fetched = json.loads((folder / "adapter_config.json").read_text())
            assert fetched["base_model_name_or_path"] == "seshu-federation-release-v0"
            assert str(tmp_path) not in (folder / "adapter_config.json").read_text()

        mine = {row["blind_id"]: row for row in asha.json("GET", "/submissions")}
        assert mine[honest["blind_id"]]["status"] == "accepted", mine[honest["blind_id"]]
        assert mine[honest["blind_id"]]["gains"]["instruct"] > 0
        assert "client" not in mine[honest["blind_id"]]
        theirs = {row["blind_id"]: row for row in bala.json("GET", "/submissions")}
        assert honest["blind_id"] not in theirs  # another client's submission does not exist for bala
        assert theirs[flipped["blind_id"]]["status"] == "rejected"
        assert "task_gain" in theirs[flipped["blind_id"]]["reason"]
        everyone = {row["blind_id"]: row for row in admin.json("GET", "/submissions")}
        assert everyone[honest["blind_id"]]["client"] == "asha"

        # Release v1: merged exactly, judged, credited by name.
        outcome = publish_release(fed)
        assert outcome.published and outcome.version == 1, outcome.reasons
        assert outcome.metrics["instruct"]["value"] < fed_metrics(fed, 0)["instruct"]["value"]
        info = bala.pull("1", tmp_path / "v1")
        changelog = (tmp_path / "v1" / "CHANGELOG.md").read_text()
        assert "asha" in changelog and "v1" in changelog
        assert asha.json("GET", f"/submissions/{honest['blind_id']}")["status"] == "merged"
        # Nothing left to merge: a second release publishes nothing.
        with pytest.raises(UserError, match="nothing to release"):
            publish_release(fed)
        page = httpx.get(f"{url}/").text
        assert "Seshu federation" in page
        summary = httpx.get(f"{url}/api/v1/dashboard").json()
        assert [r["version"] for r in summary["releases"]] == [0, 1]
        assert all("client" not in s for s in summary["submissions"])
    fed.close()


def fed_metrics(fed: Federation, version: int) -> dict[str, dict[str, float]]:
    from seshu.federation.models import Release

    with fed.db.read() as session:
        row = session.get(Release, version)
        assert row is not None
        return dict(row.metrics)


def test_uploads_resume_and_a_wrong_hash_leaves_nothing(world: dict[str, Path], tmp_path: Path) -> None:
    fed = _init(world, tmp_path / "fed")
    tokens = _tokens(fed)
    payload = torch.randint(0, 256, (3_000_000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
    data = payload.tobytes()
    digest = hashlib.sha256(data).hexdigest()
    blobs_before = set(fed.store.list_blobs())
    with serving(create_app(fed)) as url:
        asha = Coordinator(url, tokens["asha"])
        upload = asha.json("POST", "/uploads", json={"size": len(data), "sha256": digest})
        half = len(data) // 2
        # The connection is cut at half: the server keeps what arrived and says where to go on.
        asha.request("PUT", f"/uploads/{upload['id']}", params={"offset": 0}, content=data[:half])
        with pytest.raises(UserError, match="409"):
            asha.request("PUT", f"/uploads/{upload['id']}", params={"offset": 0}, content=data[:10])
        state = asha.json("GET", f"/uploads/{upload['id']}")
        assert state["offset"] == half and not state["complete"]
        done = asha.json("PUT", f"/uploads/{upload['id']}", params={"offset": half}, content=data[half:])
        assert done["complete"] and done["offset"] == len(data)
        staged = fed.upload_path(upload["id"])
        assert hashlib.sha256(staged.read_bytes()).hexdigest() == digest

        wrong = asha.json("POST", "/uploads", json={"size": len(data), "sha256": "0" * 64})
        with pytest.raises(UserError, match="sha256"):
            asha.request("PUT", f"/uploads/{wrong['id']}", params={"offset": 0}, content=data)
        assert not fed.upload_path(wrong["id"]).exists()
        with pytest.raises(UserError, match="404"):
            asha.json("GET", f"/uploads/{wrong['id']}")
        # Another client cannot see or extend asha's upload.
        with pytest.raises(UserError, match="404"):
            Coordinator(url, tokens["bala"]).json("GET", f"/uploads/{upload['id']}")
        # Over the announced size, or over the policy's cap.
        with pytest.raises(UserError, match="400"):
            asha.json("POST", "/uploads", json={"size": 10**12, "sha256": digest})
    assert set(fed.store.list_blobs()) == blobs_before  # uploads stage outside the store
    fed.close()


def test_hostile_files_are_rejected_with_nothing_stored(world: dict[str, Path], tmp_path: Path) -> None:
    import pickle

    fed = _init(world, tmp_path / "fed")
    tokens = _tokens(fed)
    blobs_before = set(fed.store.list_blobs())
    with serving(create_app(fed)) as url:
        bala = Coordinator(url, tokens["bala"])
        evil = tmp_path / "evil"
        evil.mkdir()
        (evil / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
        (evil / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": 1}))
        result = bala.submit("instruct", "en", 0, adapter=evil, examples=5)
        assert result["status"] == "rejected" and "pickle" in result["reason"].lower()
        upload = bala.upload(evil / "adapter_config.json")
        with pytest.raises(UserError, match="not allowed"):
            bala.json(
                "POST", "/submissions", json={"task": "instruct", "language": "en", "release": 0,
                                              "files": {"../adapter_config.json": upload}},
            )  # fmt: skip
    assert set(fed.store.list_blobs()) == blobs_before
    fed.close()


def test_hub_submissions_are_pinned_and_checked_like_uploads(world: dict[str, Path], tmp_path: Path) -> None:
    fed = _init(world, tmp_path / "fed")
    tokens = _tokens(fed)
    calls: list[str] = []

    def fake_hub(ref: str, folder: Path) -> str:
        # What fetch_hub_adapter writes: the adapter's files at the commit the revision names.
        calls.append(ref)
        (folder / "adapter_config.json").write_text("{}")
        return "someone/adapter@" + "a" * 40

    with serving(create_app(fed, fetch_hub=fake_hub)) as url:
        result = Coordinator(url, tokens["asha"]).submit("instruct", "en", 0, hub="someone/adapter@main", examples=3)
    assert calls == ["someone/adapter@main"]
    assert result["status"] == "rejected" and "adapter_model.safetensors" in result["reason"]
    fed.close()


def test_a_translation_set_is_scored_by_chrf_into_its_named_language(world: dict[str, Path], tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in [("water", "पानी"), ("book", "किताब")]),
        encoding="utf-8",
    )
    sets = [f"general-en={world['general-en']}", f"translation-hi={pairs}"]
    report = init_federation(tmp_path / "fed", str(world["base"]), sets)
    assert report.metrics["translation-hi"]["metric"] == "chrf"
    assert report.metrics["translation-hi"]["higher_is_better"] is True
    with pytest.raises(UserError, match="translation-<target language>"):
        init_federation(
            tmp_path / "other", str(world["base"]), [f"general-en={world['general-en']}", f"translation={pairs}"]
        )
    assert not (tmp_path / "other").exists()


def test_an_interrupted_pull_resumes_and_a_corrupt_part_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    fed = _init(world, tmp_path / "fed")
    tokens = _tokens(fed)
    with serving(create_app(fed)) as url:
        asha = Coordinator(url, tokens["asha"])
        whole = tmp_path / "whole"
        info = asha.pull("0", whole)
        weights = (whole / "model.safetensors").read_bytes()
        # A pull cut halfway through the weights left this behind; the next pull fetches only the rest.
        keep = tmp_path / ".again.v0.download"
        keep.mkdir()
        (keep / "model.safetensors.partial").write_bytes(weights[: len(weights) // 2])
        asha.pull("0", tmp_path / "again")
        assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
        assert not keep.exists()
        # A part that is not what the server holds fails its sha256, is dropped, and the next pull succeeds.
        keep = tmp_path / ".third.v0.download"
        keep.mkdir()
        (keep / "model.safetensors.partial").write_bytes(b"\0" * (len(weights) // 2))
        with pytest.raises(UserError, match="sha256"):
            asha.pull("0", tmp_path / "third")
        assert not (tmp_path / "third").exists()
        asha.pull("0", tmp_path / "third")
        assert sorted(p.name for p in (tmp_path / "third").iterdir()) == sorted(
            [e["path"] for e in info["files"]] + [RELEASE_MARKER]
        )
    fed.close()
