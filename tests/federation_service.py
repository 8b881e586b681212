"""Test-only builders for whole federations: a tiny base with a tokenizer, evaluation sets, and a coordinator
served over real HTTP on 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from helpers import save_tiny_model

from seshu import assets
from seshu.federation.demo import serve_in_thread as serving  # noqa: F401 (the tests' coordinator)

INSTRUCT = Path(assets.resolve("seshu:instructions/instruct.jsonl"))
EN = Path(assets.resolve("seshu:corpus/en.txt"))
HI = Path(assets.resolve("seshu:corpus/hi.txt"))
# The bundled instructions split once: donors train on the first records, the federation judges on the rest.
DONOR_RECORDS, EVAL_RECORDS = slice(0, 30), slice(30, 40)


def save_tiny_chatless_base(out: Path, arch: str = "llama") -> Path:
    """A tiny random model with a byte-level BPE tokenizer that has neither chat tokens nor a chat template (so
    `server init` must make it chat-ready)."""
    docs = [line for path in (EN, HI) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return save_tiny_model(out, docs, arch=arch, vocab_size=400, context_length=512)


def write_sets(folder: Path) -> dict[str, Path]:
    """A general English set and an instruct set, held out from what donors train on."""
    folder.mkdir(parents=True, exist_ok=True)
    general = folder / "general-en.txt"
    general.write_text("\n".join(EN.read_text(encoding="utf-8").splitlines()[-20:]) + "\n", encoding="utf-8")
    lines = INSTRUCT.read_text(encoding="utf-8").splitlines()
    instruct = folder / "instruct.jsonl"
    instruct.write_text("\n".join(lines[EVAL_RECORDS]) + "\n", encoding="utf-8")
    donor = folder / "donor.jsonl"
    donor.write_text("\n".join(lines[DONOR_RECORDS]) + "\n", encoding="utf-8")
    return {"general-en": general, "instruct": instruct, "donor": donor}


def write_policy(path: Path, **limits: object) -> Path:
    path.write_text(json.dumps({"limits": limits, "acceptance": {"max_regression": 0.05}}), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def upload_folder(fed: object, client: object, folder: Path) -> dict[str, str]:
    """Every file of `folder` uploaded through the coordinator's own upload functions (no HTTP): name -> upload id."""
    import asyncio
    import hashlib

    from seshu.federation.submissions import append_upload, create_upload

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    ids = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        upload = create_upload(fed, client, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
        asyncio.run(append_upload(fed, client, upload.id, 0, body(data)))  # type: ignore[arg-type]
        ids[path.name] = upload.id
    return ids
