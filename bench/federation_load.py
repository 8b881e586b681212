"""The federation coordinator under load: upload throughput and latency, its memory against upload size, and the
time from a submission to its decision.

Command (~2 minutes on 2 idle CPU cores at the full scale; `--clients 5,20 --size-mb 5` checks it in about one):
    python bench/federation_load.py [--clients 20,100] [--size-mb 20] [--rss-clients 10] [--rss-sizes-mb 5,40]
        [--submissions 3] [--max-wait 15] [--work DIR] [--keep] [--out bench/results/federation_load.json]

A federation is made in a temp folder with the CLI (`seshu server init` on a tiny llama with a BPE tokenizer and
two evaluation sets, `seshu server add-client` for an admin token; the admin API registers one donor token per
simulated client) and served by `seshu server start --no-worker` as a separate process on 127.0.0.1, whose RSS
and CPU time are sampled every 20 ms. Beside it runs the peer: a bare Starlette app on the same uvicorn that
streams PUT bodies to disk without Seshu's logic (no auth, no database, no hashing), the ceiling of the HTTP
stack; and the disk itself (write + fsync of the same bytes into the same filesystem). bench/README.md
(## federation_load) says what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import psutil
from machine import (  # bench/machine.py: the benchmarks' shared look at the machine
    CpuMonitor,
    machine_record,
    wait_for_quiet,
)

DEFAULT_OUT = Path(__file__).parent / "results" / "federation_load.json"
MB = 1 << 20
PART = 8 * MB  # bytes per PUT, as seshu.federation.client.UPLOAD_PART
BLOCK = 1 * MB  # the client streams each part in blocks of this size, as seshu.federation.client.CHUNK
SAMPLE_SECONDS = 0.02
PROBE_SECONDS = 0.05
POLL_SECONDS = 2.0  # the evaluation worker's poll interval: run_worker's default
PACKAGES = ("seshu", "fastapi", "starlette", "uvicorn", "h11", "httpx", "sqlalchemy", "torch", "peft")

# The peer: the same uvicorn serving a bare Starlette app with the upload API's three routes. A PUT streams its
# body into the file at the offset the file ends at, on the event loop, as Seshu's route does; nothing is hashed
# and nothing goes to a database. Run as `python -c RAW_APP FOLDER PORT`.
RAW_APP = """
import os, secrets, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

folder, sizes = sys.argv[1], {}

def state(upload_id):
    held = os.path.getsize(os.path.join(folder, upload_id))
    return {"id": upload_id, "offset": held, "size": sizes[upload_id], "complete": held == sizes[upload_id]}

async def create(request):
    upload_id = secrets.token_hex(16)
    sizes[upload_id] = int((await request.json())["size"])
    open(os.path.join(folder, upload_id), "wb").close()
    return JSONResponse(state(upload_id), status_code=201)

async def put(request):
    upload_id = request.path_params["upload_id"]
    path = os.path.join(folder, upload_id)
    if int(request.query_params["offset"]) != os.path.getsize(path):
        return JSONResponse({"detail": "wrong offset"}, status_code=409)
    with open(path, "r+b") as handle:
        handle.seek(0, 2)
        async for chunk in request.stream():
            handle.write(chunk)
    return JSONResponse(state(upload_id))

async def get(request):
    return JSONResponse(state(request.path_params["upload_id"]))

async def health(request):
    return JSONResponse({"status": "ok"})

routes = [
    Route("/api/v1/health", health),
    Route("/api/v1/uploads", create, methods=["POST"]),
    Route("/api/v1/uploads/{upload_id}", put, methods=["PUT"]),
    Route("/api/v1/uploads/{upload_id}", get, methods=["GET"]),
]
uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


# --------------------------------------------------------------------------------------------------
# The federation


def seshu_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "seshu", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"seshu {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def build_federation(work: Path) -> tuple[Path, str]:
    """A tiny llama (BPE tokenizer of 400 tokens on the bundled corpus), two evaluation sets, `seshu server init`
    on them and an admin token from `seshu server add-client`; returns the federation folder and that token."""
    from seshu import assets
    from seshu.models.registry import build_config, build_model
    from seshu.tokenizer import train_tokenizer

    en = Path(assets.resolve("seshu:corpus/en.txt")).read_text(encoding="utf-8").splitlines()
    hi = Path(assets.resolve("seshu:corpus/hi.txt")).read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer([line for line in en + hi if line.strip()], vocab_size=400)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = build_config("llama", "tiny", vocab_size=len(tokenizer), context_length=512, special_token_ids=ids)
    base = work / "base"
    build_model(config, seed=0).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    sets = work / "sets"
    sets.mkdir()
    (sets / "general-en.txt").write_text("\n".join(en[-20:]) + "\n", encoding="utf-8")
    instruct = Path(assets.resolve("seshu:instructions/instruct.jsonl")).read_text(encoding="utf-8").splitlines()
    (sets / "instruct.jsonl").write_text("\n".join(instruct[30:40]) + "\n", encoding="utf-8")
    fed = work / "federation"
    seshu_cli(
        "server", "init", "--base", str(base), "--dir", str(fed),
        "--eval-set", f"general-en={sets / 'general-en.txt'}", "--eval-set", f"instruct={sets / 'instruct.jsonl'}",
    )  # fmt: skip
    admin = json.loads(seshu_cli("server", "add-client", "bench-admin", "--dir", str(fed), "--role", "admin", "--json"))
    return fed, str(admin["token"])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on a loopback port, its RSS and CPU time sampled every 20 ms from start to stop."""

    def __init__(self, name: str, command: list[str], port: int, log: Path) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        self.samples: list[tuple[float, int, int]] = []  # (time, RSS bytes, threads)
        self._stop = threading.Event()
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=5).status_code == 200:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.1)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.perf_counter(), self.ps.memory_info().rss, self.ps.num_threads()))
            time.sleep(SAMPLE_SECONDS)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def reset_peak(self) -> bool:
        """Reset the kernel's peak RSS (VmHWM) of the process, so that `kernel_peak` covers what follows."""
        try:
            Path(f"/proc/{self.ps.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def kernel_peak(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.ps.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def sampled_peak(self, begin: float, end: float) -> int:
        return max((rss for t, rss, _ in self.samples if begin <= t <= end), default=0)

    def peak_threads(self, begin: float, end: float) -> int:
        return max((threads for t, _, threads in self.samples if begin <= t <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# --------------------------------------------------------------------------------------------------
# Uploads


@dataclass
class Payload:
    """Client i's file: `size` bytes of one shared random buffer with i in its first 8 bytes, so every file (and
    every sha256) differs while the clients share one copy in memory."""

    noise: memoryview
    size: int

    def prefix(self, i: int) -> bytes:
        return i.to_bytes(8, "little")

    def sha256(self, i: int) -> str:
        digest = hashlib.sha256(self.prefix(i))
        digest.update(self.noise[8 : self.size])
        return digest.hexdigest()

    def blocks(self, i: int, start: int, end: int) -> Iterator[bytes]:
        for pos in range(start, end, BLOCK):
            block = bytes(self.noise[pos : min(end, pos + BLOCK)])
            yield self.prefix(i) + block[8:] if pos == 0 else block


@dataclass
class Upload:
    upload_id: str = ""
    seconds: float = 0.0
    error: str = ""
    verified: bool = False


def upload_one(http: httpx.Client, payload: Payload, i: int, sha256: str) -> Upload:
    """The upload API alone, as seshu.federation.client.Coordinator drives it: create, PUT the parts at the
    offset the server reports, then ask for the state (complete, offset = size)."""
    result = Upload()
    began = time.perf_counter()
    try:
        created = http.post("/uploads", json={"size": payload.size, "sha256": sha256})
        created.raise_for_status()
        result.upload_id = created.json()["id"]
        offset = 0
        while offset < payload.size:
            end = min(offset + PART, payload.size)
            response = http.put(
                f"/uploads/{result.upload_id}", params={"offset": offset},
                content=payload.blocks(i, offset, end), headers={"Content-Length": str(end - offset)},
            )  # fmt: skip
            response.raise_for_status()
            if response.json()["offset"] != end:
                raise RuntimeError(f"server holds {response.json()['offset']} bytes after a part ending at {end}")
            offset = end
        state = http.get(f"/uploads/{result.upload_id}").json()
        result.verified = bool(state["complete"]) and state["offset"] == payload.size
        if not result.verified:
            result.error = f"not complete after the last part: {state}"
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.seconds = time.perf_counter() - began
    return result


def probe(url: str, stop: threading.Event, out: list[float]) -> None:
    """Latency of GET /health every 50 ms: how long a small request waits behind the uploads."""
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            began = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                http.get(f"{url}/api/v1/health")
                out.append(time.perf_counter() - began)
            stop.wait(PROBE_SECONDS)


def quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)  # linear interpolation, as numpy's default
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def run_uploads(server: Server, tokens: Sequence[str], payload: Payload, clients: int) -> dict[str, Any]:
    """`clients` threads, one connection and token each, upload one file each, all starting together."""
    results: list[Upload | None] = [None] * clients
    gate = threading.Barrier(clients + 1, timeout=600)  # a client that dies before it breaks the gate

    def client(i: int) -> None:
        sha256 = payload.sha256(i)  # before the gate: not timed
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
        with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=600) as http:
            gate.wait()
            results[i] = upload_one(http, payload, i, sha256)

    idle: list[float] = []
    with httpx.Client(timeout=60) as http:  # the small request's latency on the idle server, for comparison
        for _ in range(10):
            began = time.perf_counter()
            http.get(f"{server.url}/api/v1/health")
            idle.append(time.perf_counter() - began)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    loaded: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(server.url, stop, loaded))
    rss_before, reset = server.rss(), server.reset_peak()
    cpu_before, own_before = server.cpu_seconds(), time.process_time()
    monitor = CpuMonitor()
    gate.wait()
    began = time.perf_counter()
    monitor.start()
    prober.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    foreign = monitor.stop()  # all but this process's CPU, as a share of the machine: the server's is in it
    stop.set()
    prober.join()
    server_cpu, client_cpu = server.cpu_seconds() - cpu_before, time.process_time() - own_before
    cores = os.cpu_count() or 1
    peak = (server.kernel_peak() if reset else None) or server.sampled_peak(began, began + wall)
    done = [r for r in results if r is not None]
    latencies = [r.seconds for r in done if not r.error]
    errors = [r.error for r in done if r.error] + ["client thread died"] * (clients - len(done))
    landed = sum(1 for r in done if r.verified)
    total = payload.size * landed
    return {
        "clients": clients,
        "file_bytes": payload.size,
        "landed": landed,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "upload_ids": [r.upload_id for r in done if r.verified],
        "wall_seconds": round(wall, 3),
        "mb_per_second": round(total / MB / wall, 1),
        "latency_p50_seconds": _round(quantile(latencies, 0.5)),
        "latency_p99_seconds": _round(quantile(latencies, 0.99)),
        "latency_max_seconds": _round(max(latencies, default=None)),
        "server_cpu_seconds": round(server_cpu, 2),
        "server_cpu_seconds_per_gb": round(server_cpu / (total / 1e9), 2) if total else None,
        "client_cpu_seconds": round(client_cpu, 2),
        "other_load": None if foreign is None else round(max(0.0, foreign - server_cpu / (wall * cores)), 3),
        "server_threads_peak": server.peak_threads(began, began + wall),
        "rss_before_mb": round(rss_before / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "peak_over_before_mb": round((peak - rss_before) / MB, 1),
        "peak_rss_source": "VmHWM (reset before)" if reset else "sampled every 20 ms",
        "health_idle_p50_ms": _ms(quantile(idle, 0.5)),
        "health_loaded_p50_ms": _ms(quantile(loaded, 0.5)),
        "health_loaded_p99_ms": _ms(quantile(loaded, 0.99)),
        "health_loaded_max_ms": _ms(max(loaded, default=None)),
        "health_probes": len(loaded),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def check_landed(server: Server, folder: Path, result: dict[str, Any], fed_dir: Path | None) -> dict[str, Any]:
    """What the server holds after a phase: each landed upload's file on disk at its full size, and for Seshu its
    database row complete at that size. The files are removed afterwards (the bench's own temp folder)."""
    size, ids = result["file_bytes"], result["upload_ids"]
    paths = [folder / (f"{i}.part" if fed_dir else i) for i in ids]
    on_disk = sum(1 for p in paths if p.is_file() and p.stat().st_size == size)
    check: dict[str, Any] = {"files_at_full_size": on_disk}
    if fed_dir is not None:
        from sqlalchemy import select

        from seshu.federation.layout import Federation
        from seshu.federation.models import Upload as UploadRow

        fed = Federation.open(fed_dir)
        with fed.db.read() as session:
            rows = session.scalars(select(UploadRow).where(UploadRow.id.in_(ids))).all()
            check["db_complete_at_full_size"] = sum(1 for r in rows if r.complete and r.received == size)
        fed.close()
    for path in paths:
        path.unlink(missing_ok=True)
    return check


def disk_write(folder: Path, total: int, noise: memoryview) -> dict[str, Any]:
    """The disk's own sequential write: `total` bytes in 1 MB writes into `folder`'s filesystem, then fsync."""
    path = folder / "disk-peer.bin"
    began = time.perf_counter()
    with open(path, "wb") as handle:
        written = 0
        while written < total:
            count = min(BLOCK, total - written)
            handle.write(noise[:count])
            written += count
        wrote = time.perf_counter()
        handle.flush()
        os.fsync(handle.fileno())
    synced = time.perf_counter()
    path.unlink()
    return {
        "bytes": total,
        "write_seconds": round(wrote - began, 3),
        "fsync_seconds": round(synced - wrote, 3),
        "mb_per_second": round(total / MB / (synced - began), 1),
        "page_cache_mb_per_second": round(total / MB / (wrote - began), 1),
    }


# --------------------------------------------------------------------------------------------------
# Submission to decision


def make_adapter(release: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of `release` saved by peft (r 4, alpha 8 on q_proj, v_proj, down_proj), with B filled with
    randn * 0.01 (zero, as peft initialises it, would be no update at all)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(release))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


def timeline(session: Any, blind: str, claims: dict[int, datetime]) -> dict[str, Any]:
    """A decided submission's times from the database (and the worker's claim), split into its stages."""
    from sqlalchemy import select

    from seshu.federation.models import Evaluation, Job, Submission

    sub = session.scalar(select(Submission).where(Submission.blind_id == blind))
    job = None if sub is None else session.scalar(select(Job).where(Job.submission_id == sub.id))
    evaluation = None if job is None else session.scalar(select(Evaluation).where(Evaluation.job_id == job.id))
    if sub is None or job is None or evaluation is None or sub.decided_at is None or job.id not in claims:
        return {}
    claimed = claims[job.id]
    return {
        "queued_at": sub.created_at.isoformat(),
        "job_created_at": job.created_at.isoformat(),
        "claimed_at": claimed.isoformat(),
        "decided_at": sub.decided_at.isoformat(),
        "attempts": job.attempts,
        "queue_seconds": round((claimed - sub.created_at).total_seconds(), 3),
        "evaluation_seconds": round(evaluation.seconds, 3),
        "record_seconds": round((sub.decided_at - claimed).total_seconds() - evaluation.seconds, 3),
        "submission_to_decision_seconds": round((sub.decided_at - sub.created_at).total_seconds(), 3),
    }


def decision_timings(url: str, fed_dir: Path, token: str, work: Path, count: int) -> list[dict[str, Any]]:
    """`count` adapters submitted one after another through the API (the client's upload, then POST
    /submissions), each evaluated by one worker polling every 2 s in this process (`run_worker` on `LocalJobs`,
    as `seshu server worker --dir D` runs), and its timeline read back from the database."""
    from seshu.federation.client import SUBMITTED_FILES, Coordinator
    from seshu.federation.layout import Federation
    from seshu.federation.models import utcnow
    from seshu.federation.worker import LocalJobs, run_worker

    claims: dict[int, datetime] = {}  # the jobs table keeps no claim time: the worker's source notes it

    class TimedJobs(LocalJobs):
        def claim(self, instance: str, lease_seconds: float) -> dict[str, Any] | None:
            job = super().claim(instance, lease_seconds)
            if job is not None:
                claims[int(job["job_id"])] = utcnow()
            return job

    donor = Coordinator(url, token)
    donor.pull("latest", work / "v0")
    fed = Federation.open(fed_dir)
    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker, args=(TimedJobs(fed, "bench"), "0"), kwargs={"stop": stop, "poll_seconds": POLL_SECONDS}
    )
    worker.start()
    rows: list[dict[str, Any]] = []
    try:
        for k in range(count):
            adapter = make_adapter(work / "v0", work / f"adapter-{k}", seed=k)
            began = time.perf_counter()
            files = {
                p.name: donor.upload(p) for p in sorted(adapter.iterdir()) if p.is_file() and p.name in SUBMITTED_FILES
            }
            uploaded = time.perf_counter()
            body = {"task": "instruct", "language": "en", "release": 0, "files": files}
            stalls: list[float] = []
            probing = threading.Event()
            prober = threading.Thread(target=probe, args=(url, probing, stalls))
            prober.start()
            response = donor.http.post("/submissions", json=body)
            posted = time.perf_counter()
            probing.set()
            prober.join()
            reply = response.json()
            row: dict[str, Any] = {
                "adapter_bytes": sum(p.stat().st_size for p in adapter.iterdir() if p.name in files),
                "upload_seconds": round(uploaded - began, 3),
                "validation_seconds": round(posted - uploaded, 3),
                "health_max_ms_during_validation": _ms(max(stalls, default=None)),
                "http_status": response.status_code,
                "status": reply.get("status"),
                "reason": reply.get("reason"),
            }
            blind = reply.get("blind_id")
            while reply.get("status") == "validated" and time.perf_counter() - posted < 600:
                time.sleep(0.05)
                reply = donor.json("GET", f"/submissions/{blind}")
            row["client_seen_decision_seconds"] = round(time.perf_counter() - posted, 3)
            row["status"], row["reason"] = reply.get("status"), reply.get("reason")
            with fed.db.read() as session:
                row.update(timeline(session, str(blind), claims))
            rows.append(row)
    finally:
        stop.set()
        worker.join()
        fed.close()
        donor.close()
    return rows


# --------------------------------------------------------------------------------------------------
# Driver


@dataclass
class Run:
    uploads: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    servers: dict[str, Any] = field(default_factory=dict)


def register_donors(server: Server, admin_token: str, count: int) -> list[str]:
    """One donor token per simulated client, through the admin API (the CLI's add-client costs a process each)."""
    with httpx.Client(base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {admin_token}"}) as http:
        tokens = []
        for i in range(count):
            response = http.post("/admin/clients", json={"name": f"donor-{i:03d}", "role": "client"})
            response.raise_for_status()
            tokens.append(str(response.json()["token"]))
    return tokens


def upload_phase(
    run: Run, name: str, server: Server, tokens: list[str], payload: Payload, clients: int, folder: Path,
    fed_dir: Path | None,
) -> dict[str, Any]:  # fmt: skip
    os.sync()  # untimed: the previous phase's dirty pages are written back before this one starts
    result = run_uploads(server, tokens, payload, clients)
    result["server_check"] = check_landed(server, folder, result, fed_dir)
    result["server"] = name
    del result["upload_ids"]
    lost = result["clients"] - result["server_check"]["files_at_full_size"]
    print(
        f"  {name:5s} {clients:3d} x {payload.size / MB:.0f} MB: {result['mb_per_second']:7.1f} MB/s, "
        f"p50 {result['latency_p50_seconds']} s, p99 {result['latency_p99_seconds']} s, "
        f"errors {result['errors']}, not on disk {lost}, peak RSS +{result['peak_over_before_mb']} MB",
        flush=True,
    )
    return result


def print_tables(run: Run, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=190)
    table = Table(title=f"Uploads of {args.size_mb} MB files in {PART // MB} MB parts, {os.cpu_count()} CPUs")
    columns = (
        "clients", "seshu MB/s", "raw MB/s", "disk MB/s", "seshu/raw", "seshu/disk", "seshu p50 / p99 s",
        "raw p50 / p99 s", "seshu CPU s/GB", "raw CPU s/GB", "health p99 ms seshu / raw", "seshu RSS +MB",
        "landed seshu / raw", "errors", "other load seshu / raw",
    )  # fmt: skip
    for name in columns:
        table.add_column(name, justify="right")
    by_level: dict[int, dict[str, dict[str, Any]]] = {}
    for row in run.uploads:
        by_level.setdefault(row["clients"], {})[row["server"]] = row
    for clients, sides in by_level.items():
        seshu, raw, disk = sides["seshu"], sides["raw"], sides["disk"]
        table.add_row(
            str(clients), f"{seshu['mb_per_second']:,.0f}", f"{raw['mb_per_second']:,.0f}",
            f"{disk['mb_per_second']:,.0f}", f"{seshu['mb_per_second'] / raw['mb_per_second']:.2f}",
            f"{seshu['mb_per_second'] / disk['mb_per_second']:.2f}",
            f"{seshu['latency_p50_seconds']:.2f} / {seshu['latency_p99_seconds']:.2f}",
            f"{raw['latency_p50_seconds']:.2f} / {raw['latency_p99_seconds']:.2f}",
            f"{seshu['server_cpu_seconds_per_gb']}", f"{raw['server_cpu_seconds_per_gb']}",
            f"{seshu['health_loaded_p99_ms']} / {raw['health_loaded_p99_ms']}", f"{seshu['peak_over_before_mb']}",
            f"{seshu['server_check']['files_at_full_size']} / {raw['server_check']['files_at_full_size']}",
            str(seshu["errors"] + raw["errors"]), f"{seshu['other_load']} / {raw['other_load']}",
        )  # fmt: skip
    console.print(table)
    memory = Table(title=f"Coordinator memory against upload size ({args.rss_clients} concurrent uploads)")
    for name in ("file MB", "seshu RSS before MB", "seshu peak - before MB", "raw peak - before MB", "landed"):
        memory.add_column(name, justify="right")
    sizes: dict[int, dict[str, dict[str, Any]]] = {}
    for row in run.memory:
        sizes.setdefault(row["file_bytes"], {})[row["server"]] = row
    for size, sides in sizes.items():
        seshu, raw = sides["seshu"], sides["raw"]
        memory.add_row(
            f"{size / MB:.0f}", f"{seshu['rss_before_mb']:.0f}", f"{seshu['peak_over_before_mb']}",
            f"{raw['peak_over_before_mb']}", f"{seshu['landed']}/{seshu['clients']} | {raw['landed']}/{raw['clients']}",
        )  # fmt: skip
    console.print(memory)
    timing = Table(title=f"Submission to decision (tiny llama, LoRA r 4; worker polls every {POLL_SECONDS:g} s)")
    stages = (
        "#", "adapter KB", "upload s", "validation s", "health max ms", "queue s", "evaluation s", "record s",
        "total s", "status",
    )  # fmt: skip
    for name in stages:
        timing.add_column(name, justify="right")
    for i, row in enumerate(run.decisions):
        total = (row.get("submission_to_decision_seconds") or 0) + row["validation_seconds"]
        timing.add_row(
            str(i), f"{row['adapter_bytes'] / 1024:.0f}", f"{row['upload_seconds']:.2f}",
            f"{row['validation_seconds']:.2f}", str(row["health_max_ms_during_validation"]),
            str(row.get("queue_seconds")), str(row.get("evaluation_seconds")),
            str(row.get("record_seconds")), f"{total:.2f}", str(row["status"]),
        )  # fmt: skip
    console.print(timing)
    console.print(
        "MB/s: bytes of verified uploads / wall time from the common start to the last completion. disk: write +\n"
        "fsync of the same bytes in the same filesystem (the coordinator does not fsync; the JSON has the page-cache\n"
        "rate too). raw: bare Starlette on the same uvicorn, streaming PUT bodies to disk (no auth, database or\n"
        "hashing). health p99: GET /health every 50 ms during the uploads. RSS +MB: the coordinator's peak RSS\n"
        "(VmHWM) minus its RSS before the phase. total s: validation (POST /submissions) + queue + evaluation +\n"
        "record. health max ms: the slowest GET /health answered while POST /submissions ran. other load: the share\n"
        "of the machine's CPU that processes other than the bench and its servers took during the phase."
    )


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=parse_sizes, default=[20, 100], help="concurrent uploads, e.g. 20,100")
    parser.add_argument("--size-mb", type=int, default=20, help="size of each uploaded file")
    parser.add_argument("--rss-clients", type=int, default=10, help="concurrent uploads of the memory phase")
    parser.add_argument("--rss-sizes-mb", type=parse_sizes, default=[5, 40], help="file sizes of the memory phase")
    parser.add_argument("--submissions", type=int, default=3, help="adapters submitted for the decision timing")
    parser.add_argument("--max-wait", type=float, default=15.0, help="seconds to wait for a quiet machine per level")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (federation, server logs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from seshu.cli.common import quiet_libraries

    quiet_libraries()
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="seshu-federation-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SESHU_CACHE_DIR"] = str(work / "seshu-cache")  # the servers' and the client's sha256 memory
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = Run()
    servers: list[Server] = []
    try:
        began = time.perf_counter()
        fed_dir, admin_token = build_federation(work)
        run.servers["federation_build_seconds"] = round(time.perf_counter() - began, 1)
        print(f"federation made in {run.servers['federation_build_seconds']} s: {fed_dir}", flush=True)
        staging = fed_dir / "staging" / "uploads"
        raw_dir = work / "raw-uploads"
        raw_dir.mkdir()
        seshu_port, raw_port = free_port(), free_port()
        seshu = Server(
            "seshu",
            [sys.executable, "-m", "seshu", "server", "start", "--dir", str(fed_dir), "--port", str(seshu_port),
             "--no-worker"],
            seshu_port, work / "seshu-server.log",
        )  # fmt: skip
        servers.append(seshu)
        raw = Server("raw", [sys.executable, "-c", RAW_APP, str(raw_dir), str(raw_port)], raw_port, work / "raw.log")
        servers.append(raw)
        tokens = register_donors(seshu, admin_token, max([*args.clients, args.rss_clients]))
        noise = memoryview(os.urandom(max([args.size_mb, *args.rss_sizes_mb, 1]) * MB))
        sides = [("raw", raw, raw_dir, None), ("seshu", seshu, staging, fed_dir)]
        for name, server, folder, fed in sides:  # warm-up: every route once, untimed
            check_landed(server, folder, run_uploads(server, tokens, Payload(noise, MB), 2), fed)
            run.servers[f"{name}_rss_after_warmup_mb"] = round(server.rss() / MB, 1)

        print(f"memory: {args.rss_clients} concurrent uploads at {args.rss_sizes_mb} MB", flush=True)
        for size_mb in args.rss_sizes_mb:
            for name, server, folder, fed in sides:
                payload = Payload(noise, size_mb * MB)
                run.memory.append(upload_phase(run, name, server, tokens, payload, args.rss_clients, folder, fed))

        payload = Payload(noise, args.size_mb * MB)
        for level, clients in enumerate(args.clients):
            waited = wait_for_quiet(args.max_wait)
            print(f"uploads: {clients} clients x {args.size_mb} MB (waited {waited} s for quiet)", flush=True)
            for name, server, folder, fed in sides if level % 2 == 0 else sides[::-1]:  # alternate who goes first
                run.uploads.append(upload_phase(run, name, server, tokens, payload, clients, folder, fed))
            os.sync()
            disk = disk_write(work, clients * payload.size, noise)
            run.uploads.append({"server": "disk", "clients": clients, **disk})
            print(f"  disk  write + fsync of {clients * payload.size / MB:,.0f} MB: {disk['mb_per_second']} MB/s "
                  f"(page cache {disk['page_cache_mb_per_second']} MB/s)", flush=True)  # fmt: skip

        print(f"decisions: {args.submissions} submissions, one worker", flush=True)
        run.decisions = decision_timings(seshu.url, fed_dir, tokens[0], work, args.submissions)
        for name, server, _, _ in sides:
            run.servers[f"{name}_rss_at_end_mb"] = round(server.rss() / MB, 1)
            run.servers[f"{name}_max_sampled_rss_mb"] = round(max(r for _, r, _ in server.samples) / MB, 1)
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print_tables(run, args)
    lost = [
        f"{r['server']} {r['clients']}x{r['file_bytes'] // MB}MB"
        for r in run.uploads + run.memory
        if r["server"] != "disk" and (r["errors"] or r["server_check"]["files_at_full_size"] != r["clients"])
    ]
    undecided = [i for i, r in enumerate(run.decisions) if "submission_to_decision_seconds" not in r]
    report = {
        "benchmark": "federation_load",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/federation_load.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "part_bytes": PART,
            "client_block_bytes": BLOCK,
            "worker_poll_seconds": POLL_SECONDS,
            "client": "one thread, httpx.Client (one connection) and donor token per upload; POST /uploads, PUT "
            "parts at the offset the server reports, GET the state; all threads start together at a barrier",
            "servers": "seshu: `seshu server start --no-worker` (uvicorn, SQLite in the federation folder); raw: bare "
            "Starlette on the same uvicorn streaming PUT bodies to disk on the event loop, no auth/database/hash",
        },
        "environment": {
            "python": platform.python_version(),
            **{p: version(p) for p in PACKAGES},
            "uvicorn_http": "httptools" if _has("httptools") else "h11",
            "uvicorn_loop": "uvloop" if _has("uvloop") else "asyncio",
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "filesystem": _filesystem(Path(tempfile.gettempdir())),
            **machine_record(started, load_start),
        },
        "servers": run.servers,
        "uploads": run.uploads,
        "memory": run.memory,
        "decisions": run.decisions,
        "problems": {"lost_or_failed_uploads": lost, "undecided_submissions": undecided},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if lost or undecided:
        print(f"problems: {report['problems']}", file=sys.stderr)
    return 1 if lost or undecided else 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _filesystem(path: Path) -> str:
    best = max(
        (p for p in psutil.disk_partitions(all=True) if str(path.resolve()).startswith(p.mountpoint)),
        key=lambda p: len(p.mountpoint),
        default=None,
    )
    return f"{best.fstype} on {best.device} ({best.mountpoint})" if best else "unknown"


if __name__ == "__main__":
    sys.exit(main())
