"""`seshu quickstart --federated`: one whole federation round on one machine, offline, in a few minutes on a CPU.

A coordinator served over HTTP on 127.0.0.1 and three simulated donors, each with its own task and data:

1. the base: the quickstart's tokenizer and tiny Llama, pretrained on the bundled English + Hindi corpus;
2. `init_federation` on it, with frozen sets held out from everything anyone trains on: `general-en` and
   `general-hi` (the quickstart's validation documents) and `instruct` (a quarter of each donor's conversations);
3. every donor pulls release v0 over HTTP, fine-tunes a LoRA adapter on its own data with the recipe the
   coordinator serves (`train_adapter`) and submits it; the hostile one submits its honest adapter tampered
   twice: B scaled x50 (refused on arrival: its update is as large as the weights it changes) and sign-flipped
   (normal in size, so it is evaluated, and rejected for making its task worse);
4. an evaluation worker (its own token, over HTTP: it sees blind ids only) scores every validated submission;
5. `publish_release` merges the accepted adapters into v1, which is published only if it holds up on every set,
   and v1 is compared with v0 on each donor's own held-out conversations.

Every set is scored by perplexity (general) or answer-only perplexity (instruct), lower is better. A federation's
`translation` sets are scored by chrF of greedy answers to {"source", "target"} records, which the bundled
translation file (conversations) is not; so every donor declares the task `instruct`, and the translation
donor's conversations are judged as conversations, like the others'.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seshu import assets
from seshu.errors import UserError
from seshu.federation import Report

HELD_OUT = 0.25  # of each donor's conversations, kept for the frozen `instruct` set and the v0/v1 comparison
SEED = 0
# Tuned on 2 CPU cores: the quickstart's own 300 pretraining steps (a base whose general perplexity falls from
# ~2000 to ~100), then 80 donor steps at 2e-4, where each honest adapter lowers the answer perplexity of its own
# held-out task by a quarter or more and moves a weight by ~2% of its norm (so x50 is ~1x: refused at 0.5). At
# 1e-3 the instruction adapters cost the general sets 5-20%; at fewer pretraining steps the translation one does.
PRETRAIN_STEPS = 300
DONOR_STEPS = 80
DONOR_LR = 2.0e-4
SEQ_LEN = 128  # the quickstart model's context
TAMPER_SCALE = 50.0
# The demo's policy: the packaged defaults, but a fine-tune of a ~1M-parameter model may cost a set up to 10% (a
# real one is held to 2%: see recipes/seshu-federation.yaml), and a release up to 5%.
POLICY: dict[str, Any] = {
    "acceptance": {"min_task_gain": 0.01, "max_regression": 0.10},
    "release": {"method": "fedavg", "max_regression": 0.05},
}


@dataclass(frozen=True)
class Donor:
    name: str
    task: str  # what its data teaches
    data: str  # its conversations (the training part is what it fine-tunes on)
    language: str = "hi"
    hostile: bool = False


DONORS: tuple[Donor, ...] = (
    Donor("asha", "instructions", "seshu:instructions/instruct.jsonl"),
    Donor("bala", "translation", "seshu:instructions/translation.jsonl"),
    Donor("chandra", "question answering", "seshu:instructions/qa.jsonl", hostile=True),
)
# What the demo replaces in its workdir on each run.
OWNED = ("tokenizer", "model", "sets", "federation", "donors", "worker")
SET_TASK = "instruct"  # the federation's task every donor declares: its set holds all the donors' held-out parts


@dataclass
class DemoSubmission:
    donor: str
    tampering: str | None  # None for an honest adapter
    blind_id: str
    status: str  # rejected on arrival, or accepted/rejected after the blind evaluation (merged once released)
    reason: str
    gains: dict[str, float | None] = field(default_factory=dict)  # relative, per set: +0.05 is 5% better
    scores: dict[str, float] = field(default_factory=dict)  # v0 with this adapter, per set


@dataclass
class DemoResult:
    workdir: Path
    base_dir: Path
    federation_dir: Path
    submissions: list[DemoSubmission]
    published: bool
    version: int | None
    release_reasons: list[str]
    metrics: dict[int, dict[str, float]]  # release version -> set -> value (lower is better on every set here)
    task_scores: dict[str, tuple[float, float]]  # donor -> answer perplexity of v0, of v1 on its held-out part
    seconds: dict[str, float]  # per stage, and "total"

    def of(self, donor: str) -> list[DemoSubmission]:
        return [s for s in self.submissions if s.donor == donor]


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI `app` with uvicorn on a free port of `host` in a daemon thread for the duration of the
    block; yields its URL."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise UserError(f"the coordinator did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)


def tampered_copy(adapter: Path, out: Path, factor: float) -> Path:
    """A copy of the adapter folder `adapter` in `out` with every LoRA B matrix multiplied by `factor` (so its
    update scale * B @ A is `factor` times the honest one)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for item in Path(adapter).iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(weights), {"format": "pt"})
    return out


def split_conversations(source: str, train: Path, held_out: Path, fraction: float = HELD_OUT) -> tuple[int, int]:
    """Shuffle the records of a jsonl file (seeded) and write `fraction` of them to `held_out`, the rest to
    `train`; returns both counts."""
    lines = [line for line in Path(assets.resolve(source)).read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(SEED).shuffle(lines)
    cut = max(1, round(len(lines) * fraction))
    for path, part in ((held_out, lines[:cut]), (train, lines[cut:])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(part) + "\n", encoding="utf-8")
    return len(lines) - cut, cut


def write_general_sets(folder: Path) -> dict[str, Path]:
    """The quickstart's validation documents (never pretrained on), one file per language."""
    from seshu.data.pipeline import validation_documents
    from seshu.quickstart import quickstart_recipe

    recipe = quickstart_recipe(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_language: dict[str, list[str]] = {"en": [], "hi": []}
    for doc in validation_documents(recipe.data, seed=recipe.train.seed):
        devanagari = sum("\u0900" <= ch <= "\u097f" for ch in doc)
        by_language["hi" if devanagari > len(doc) / 4 else "en"].append(" ".join(doc.split()))
    out = {}
    for language, docs in by_language.items():
        out[f"general-{language}"] = folder / f"general-{language}.txt"
        out[f"general-{language}"].write_text("\n".join(docs) + "\n", encoding="utf-8")
    return out


def make_base(workdir: Path, steps: int, say: Report) -> Path:
    """The quickstart's base: its tokenizer, then its tiny Llama pretrained on the bundled corpus."""
    from seshu.quickstart import quickstart_recipe, train_quickstart_tokenizer
    from seshu.train import pretrain

    recipe = quickstart_recipe(workdir, steps)
    spec = recipe.tokenizer.train
    say(f"      a {spec.kind} tokenizer of {spec.vocab_size} tokens, then a {recipe.model.arch} pretrained for "
        f"{recipe.train.max_steps} steps (the quickstart's recipe)")  # fmt: skip
    _, recipe = train_quickstart_tokenizer(recipe, workdir / "tokenizer")
    result = pretrain.run(recipe)
    say(f"      validation perplexity {result.metrics.get('eval_perplexity', float('nan')):.1f}")
    return Path(result.output_dir)


def run_federated_demo(
    workdir: Path,
    report: Report | None = None,
    *,
    base: Path | None = None,
    pretrain_steps: int = PRETRAIN_STEPS,
    donor_steps: int = DONOR_STEPS,
    donor_lr: float = DONOR_LR,
    donors: tuple[Donor, ...] = DONORS,
) -> DemoResult:
    """Run the round in `workdir` (its folders are replaced on each run). `base`: start from this model folder
    instead of pretraining the quickstart's for `pretrain_steps`."""
    from seshu.federation import auth
    from seshu.federation.app import create_app
    from seshu.federation.client import Coordinator, RemoteJobs
    from seshu.federation.coordinator import init_federation
    from seshu.federation.layout import Federation
    from seshu.federation.releases import ReleaseOutcome, publish_release
    from seshu.federation.worker import run_worker

    say = report or (lambda _msg: None)
    seconds: dict[str, float] = {}
    began = last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[stage], last = now - last, now

    workdir = Path(workdir)
    for owned in OWNED:
        shutil.rmtree(workdir / owned, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)

    if base is None:
        say(f"[1/6] the base: the quickstart's tokenizer and model, {pretrain_steps} steps of pretraining")
        base = make_base(workdir, pretrain_steps, say)
    else:
        say(f"[1/6] the base: {base}")
    lap("base")

    say("[2/6] the federation: frozen evaluation sets held out from all training, release v0")
    sets_dir = workdir / "sets"
    general = write_general_sets(sets_dir)
    held_out: dict[str, Path] = {}
    train_files: dict[str, Path] = {}
    for donor in donors:
        train_files[donor.name] = sets_dir / f"{donor.name}-train.jsonl"
        held_out[donor.name] = sets_dir / f"{donor.name}-heldout.jsonl"
        n_train, n_held = split_conversations(donor.data, train_files[donor.name], held_out[donor.name])
        say(f"      {donor.name}{' (hostile)' if donor.hostile else ''}: {donor.task}, {n_train} conversations "
            f"to train on, {n_held} held out")  # fmt: skip
    task_set = sets_dir / f"{SET_TASK}.jsonl"
    task_set.write_text("".join(p.read_text(encoding="utf-8") for p in held_out.values()), encoding="utf-8")
    policy = sets_dir / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY, sort_keys=False), encoding="utf-8")
    recipe = sets_dir / "sft-recipe.yaml"
    recipe.write_text(yaml.safe_dump(_donor_recipe(donor_steps, donor_lr), sort_keys=False), encoding="utf-8")
    folder = workdir / "federation"
    specs = [f"{name}={path}" for name, path in general.items()] + [f"{SET_TASK}={task_set}"]
    init = init_federation(
        folder, str(base), specs, policy_path=policy, sft_recipe=recipe, report=lambda m: say(f"      {m}")
    )
    say(f"      v0: {_scores(init.metrics)}")
    fed = Federation.open(folder)
    with fed.db.transaction() as session:
        _, admin_token = auth.add_client(session, "admin", "admin")  # what `seshu server add-client` does
    lap("init")

    submissions: list[DemoSubmission] = []
    task_scores: dict[str, tuple[float, float]] = {}
    outcome: ReleaseOutcome | None = None
    try:
        with serve_in_thread(create_app(fed)) as url:
            say(f"[3/6] the donors: each pulls v0 from the coordinator on {url}, fine-tunes on its own data, submits")
            admin = Coordinator(url, admin_token)
            tokens = {
                name: admin.json("POST", "/admin/clients", json={"name": name, "role": role})["token"]
                for name, role in [*((d.name, "client") for d in donors), ("worker", "worker")]
            }
            for donor in donors:
                api = Coordinator(url, tokens[donor.name])
                submissions += _donate(api, donor, train_files[donor.name], workdir, say)
            lap("donors")

            say("[4/6] blind evaluation: a worker (its own token; it sees blind ids only) scores every validated "
                "submission on every frozen set")  # fmt: skip
            worker = Coordinator(url, tokens["worker"])
            run_worker(RemoteJobs(worker, workdir / "worker"), "demo", once=True, report=lambda m: say(f"      {m}"))
            decided = {row["blind_id"]: row for row in admin.json("GET", "/submissions")}
            say("      decisions (the admin's view: who sent what is revealed once decided):")
            for sub in submissions:
                row = decided[sub.blind_id]
                sub.status, sub.reason, sub.gains = row["status"], row["reason"] or "", dict(row["gains"])
                sub.scores = {k: float(v["value"]) for k, v in row["scores"].items()}
                say(_line(sub, row.get("client")))
            lap("evaluation")

            say("[5/6] release: the accepted adapters merged exactly into v0, judged on every set")
            if any(s.status == "accepted" for s in submissions):
                outcome = publish_release(fed, report=lambda m: say(f"      {m}"))
                verdict = "published" if outcome.published else "not published"
                say(f"      {verdict}: {'; '.join(outcome.reasons)}")
            else:
                say("      no submission was accepted: nothing to release")
            lap("release")

            releases = {r["version"]: r["metrics"] for r in admin.json("GET", "/releases")}
            metrics = {v: {k: float(s["value"]) for k, s in m.items()} for v, m in releases.items()}
            say("[6/6] v1 against v0")
            if outcome is not None and outcome.published:
                for sub in submissions:
                    sub.status = "merged" if sub.status == "accepted" else sub.status
                for name in metrics[0]:
                    say(f"      {name}: {metrics[0][name]:.2f} -> {metrics[1][name]:.2f}")
                v1 = workdir / "donors" / "v1"
                Coordinator(url, tokens[donors[0].name]).pull(str(outcome.version), v1)
                task_scores = _compare(workdir / "donors" / donors[0].name / "release", v1, held_out)
                for name, (before, after) in task_scores.items():
                    say(f"      {name}'s held-out conversations, answer perplexity: {before:.2f} -> {after:.2f}")
            else:
                say("      no v1")
            lap("comparison")
    finally:
        fed.close()
    seconds["total"] = time.perf_counter() - began
    return DemoResult(
        workdir=workdir,
        base_dir=Path(base),
        federation_dir=folder,
        submissions=submissions,
        published=bool(outcome and outcome.published),
        version=outcome.version if outcome else None,
        release_reasons=outcome.reasons if outcome else [],
        metrics=metrics,
        task_scores=task_scores,
        seconds=seconds,
    )


def _donor_recipe(steps: int, lr: float) -> dict[str, Any]:
    """The packaged donor recipe, sized for the demo."""
    from seshu.config import deep_merge
    from seshu.federation.coordinator import read_donor_recipe

    train = {"seq_len": SEQ_LEN, "max_steps": steps, "lr": lr, "warmup_steps": max(1, steps // 10),
             "eval_every": steps, "save_every": steps, "log_every": max(1, steps // 4)}  # fmt: skip
    return deep_merge(read_donor_recipe(None), {"train": train})


def _donate(api: Any, donor: Donor, data: Path, workdir: Path, say: Report) -> list[DemoSubmission]:
    """One donor's part: pull the release, fine-tune on its data, submit (tampered twice when hostile)."""
    from seshu.federation.donor import adapter_facts, train_adapter

    home = workdir / "donors" / donor.name
    info = api.pull("latest", home / "release")
    recipe = api.json("GET", "/recipe")["recipe"]
    say(f"      {donor.name}: pulled v{info['version']} ({len(info['files'])} files, verified); fine-tuning a LoRA "
        f"adapter on its {donor.task}")  # fmt: skip
    result = train_adapter(home / "release", str(data), home / "adapter", recipe=recipe)
    facts = adapter_facts(result.output_dir)
    sent: list[tuple[str | None, Path]] = [(None, result.output_dir)]
    if donor.hostile:
        sent = [
            (f"B x{TAMPER_SCALE:g}", tampered_copy(result.output_dir, home / "loud", TAMPER_SCALE)),
            ("sign-flipped", tampered_copy(result.output_dir, home / "flipped", -1.0)),
        ]
    out = []
    for tampering, adapter in sent:
        row = api.submit(SET_TASK, donor.language, facts["release"], adapter=adapter, examples=facts["examples"])
        sub = DemoSubmission(donor.name, tampering, row["blind_id"], row["status"], row["reason"] or "")
        say(f"      {donor.name}: submitted {'an honest adapter' if tampering is None else 'its adapter ' + tampering}"
            f" ({facts['examples']} examples) as {sub.blind_id}: {sub.status}"
            + (f" on arrival: {sub.reason}" if sub.status == "rejected" else ""))  # fmt: skip
        out.append(sub)
    return out


def _compare(v0: Path, v1: Path, held_out: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """Answer perplexity of v0 and v1 on each donor's held-out conversations."""
    from seshu.federation.evaluation import score_sets
    from seshu.generate import load_for_generation

    scores: dict[str, list[float]] = {name: [] for name in held_out}
    for folder in (v0, v1):
        model, tokenizer = load_for_generation(str(folder), None, "cpu")
        for name, path in held_out.items():
            scores[name].append(score_sets(model, tokenizer, {SET_TASK: path})[SET_TASK]["value"])
    return {name: (pair[0], pair[1]) for name, pair in scores.items()}


def _scores(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name} {m['metric']} {m['value']:.2f}" for name, m in sorted(metrics.items()))


def _line(sub: DemoSubmission, client: str | None) -> str:
    gains = ", ".join(f"{k} {v:+.1%}" for k, v in sorted(sub.gains.items()) if v is not None)
    line = f"      {sub.blind_id} ({client or sub.donor}): {sub.status}" + (f", gains {gains}" if gains else "")
    return line + (f"; {sub.reason}" if sub.status == "rejected" else "")
