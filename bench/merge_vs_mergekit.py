"""Merging: wall time and peak memory of `seshu merge` against mergekit's `mergekit-yaml`, in the same run, and the
disk-bound merges (linear, task_arithmetic) against the disk's own sequential read and write of the same bytes.

Command (~9 minutes on 2 CPU cores with the defaults and built checkpoints; `--sizes tiny` checks it in 2 minutes):
    python bench/merge_vs_mergekit.py [--sizes 60m 740m] [--methods linear task_arithmetic ties dare_ties]
        [--mergekit PATH] [--repeats 1] [--work DIR] [--keep] [--out bench/results/merge_vs_mergekit.json]

Per size: a fp32 Llama base (seeded random init) and two variants (base + seeded noise), built under `--work`. Per
method: both tools merge the same three models from the same YAML, each in a child process (wall time around it,
peak memory its own ru_maxrss, via a small launcher process), inputs read once before each run (warm cache), sides
alternating; then the two outputs are compared tensor by tensor. For linear and task_arithmetic, seshu's merge time
is then put against `dd` reading the same input files and writing as many bytes as the output, each of the two
from the same settled memory (dirty pages written back, the page cache dropped where allowed, then the inputs read
once for warm, evicted for cold, where the output is also synced to the disk). bench/README.md
(## merge_vs_mergekit) has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from machine import machine_record  # bench/machine.py: the benchmarks' shared look at the machine
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_OUT = Path(__file__).parent / "results" / "merge_vs_mergekit.json"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DETERMINISTIC = {"linear", "task_arithmetic", "ties"}
# Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab (embeddings untied).
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 4, 8000),  # 1.1M parameters, for checking the script
    "60m": (512, 1536, 8, 8, 8, 32000),  # 60.0M, 0.24 GB
    "740m": (1536, 3744, 24, 16, 16, 32000),  # 738.9M, 2.96 GB
}
NOISE = 1e-3  # the variants' noise, relative to each tensor's std
TOLERANCE = 1e-6  # |seshu - mergekit| above this is not rounding (a task-vector entry is ~2e-5 here)
SEED = 0
PACKAGES = ("seshu", "torch", "transformers", "safetensors")  # versions recorded (mergekit's venv: mergekit for seshu)
DISK_METHODS = ("linear", "task_arithmetic")  # no statistics pass: one read of each input, one write, nothing else
DD_BLOCK = 1 << 24  # dd's block size (16 MiB): large enough that dd itself costs nothing


# --------------------------------------------------------------------------------------------------
# Checkpoints


def build_base(folder: Path, preset: str, seed: int) -> int:
    """A seeded random-init fp32 Llama, saved in 1 GB shards like a Hub checkpoint; returns its parameter count."""
    hidden, intermediate, layers, heads, kv_heads, vocab = PRESETS[preset]
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")
    return int(sum(p.numel() for p in model.parameters()))


def build_variant(base: Path, folder: Path, seed: int) -> None:
    """base + N(0, (NOISE * std)^2) per tensor, one shard in memory at a time, same file layout as the base."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(base.iterdir()):
        if path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
            continue
        tensors = load_file(path)
        for name in sorted(tensors):
            tensor = tensors[name]
            scale = float(tensor.std()) or float(tensor.abs().mean()) or 1.0  # norms start as ones: std 0
            tensor.add_(torch.randn(tensor.shape, generator=generator) * (NOISE * scale))
        save_file(tensors, folder / path.name, metadata={"format": "pt"})
        del tensors


def prepare_models(work: Path, preset: str) -> tuple[list[Path], dict[str, Any]]:
    """[base, variant 1, variant 2] under work/<preset>, reused when an earlier run built the same spec there."""
    root = work / preset
    spec = {"preset": preset, "shape": PRESETS[preset], "seed": SEED, "noise": NOISE}
    folders = [root / "base", root / "variant-1", root / "variant-2"]
    marker = root / "spec.json"
    if not (marker.is_file() and json.loads(marker.read_text())["spec"] == json.loads(json.dumps(spec))):
        shutil.rmtree(root, ignore_errors=True)
        began = time.perf_counter()
        print(f"[{preset}] building the base and two variants in {root}", flush=True)
        params = build_base(folders[0], preset, SEED)
        for i, folder in enumerate(folders[1:], start=1):
            build_variant(folders[0], folder, SEED + i)
        size = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))
        info = {"parameters": params, "bytes": size, "build_seconds": round(time.perf_counter() - began, 1)}
        marker.write_text(json.dumps({"spec": spec, "info": info}))
    info = json.loads(marker.read_text())["info"]
    shards = len(list(folders[0].glob("*.safetensors")))
    print(f"[{preset}] {info['parameters']:,} parameters, {info['bytes'] / 1e9:.3f} GB in {shards} shard(s)")
    return folders, {**spec, **info, "shards": shards}


def tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return files


def warm_cache(folders: Sequence[Path]) -> None:
    """Read every input file once (into a reused buffer), so that both sides start from a warm file cache."""
    buffer = bytearray(1 << 24)
    for folder in folders:
        for path in folder.iterdir():
            with path.open("rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def hash_inputs(folders: Sequence[Path]) -> float:
    """Hash every input file the way `seshu merge` does for its card (remembered afterwards); the seconds taken."""
    from seshu.hub.card import describe_model

    began = time.perf_counter()
    for folder in folders:
        describe_model(str(folder))
    return round(time.perf_counter() - began, 2)


# --------------------------------------------------------------------------------------------------
# Configs, runs and the comparison


def merge_config(method: str, models: Sequence[Path]) -> dict[str, Any]:
    base, *variants = [str(p.resolve()) for p in models]  # absolute: mergekit takes relative paths for Hub ids
    if method == "linear":  # a soup of all three, equal weights (normalized)
        entries = [{"model": m, "parameters": {"weight": 1.0}} for m in (base, *variants)]
        return {"merge_method": method, "models": entries, "dtype": "float32"}
    params: dict[str, float] = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 0.5, "density": 0.5}
    entries = [{"model": m, "parameters": dict(params)} for m in variants]
    return {"merge_method": method, "base_model": base, "models": entries, "dtype": "float32"}


def find_mergekit(given: str | None) -> str | None:
    found = given or os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    fallback = "/work/mkvenv/bin/mergekit-yaml"
    return found or (fallback if Path(fallback).is_file() else None)


def mergekit_versions(script: str) -> dict[str, str | None]:
    """Versions inside mergekit's own environment (the interpreter on its script's #! line)."""
    try:
        interpreter = Path(script).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
        packages = ["mergekit", *PACKAGES[1:]]
        code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {packages!r}}}))"
        done = subprocess.run([*interpreter, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return {"python": interpreter[-1], **json.loads(done.stdout)}
    except (OSError, IndexError, subprocess.SubprocessError, json.JSONDecodeError) as error:
        return {"error": str(error)}


def rss_split(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a live process in KiB: its own memory, and the file pages it maps (mmap)."""
    fields = dict.fromkeys(("RssAnon", "RssFile"), 0)
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                fields[key] = int(value.split()[0])
    return fields["RssAnon"], fields["RssFile"]


# Why a launcher: Linux carries a process's peak RSS across exec, so a child forked from this driver (which holds
# checkpoints and torch) would report the driver's size as its own peak. The launcher is a small Python process that
# forks the merge and reports the merge's own rusage (its peak starts from the launcher's ~10 MB).
LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'maxrss': usage.ru_maxrss, 'cpu': usage.ru_utime + usage.ru_stime}, f)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _launched_pid(launcher: int) -> int:
    """The merge process the launcher started (the launcher itself until it has)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()[0])
    return launcher


def run_timed(command: list[str], log: Path, output: Path) -> dict[str, Any]:
    """Run one merge in a child process: its wall time, its own peak RSS (ru_maxrss, KiB on Linux), CPU time, the
    peaks of its anonymous and file-backed RSS sampled every 20 ms, and the time to fsync its output folder `output`
    afterwards (the write-back the merge left to the kernel; outside the wall time)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    anon = mapped = 0
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        began = time.perf_counter()
        usage_file = log.with_suffix(".rusage.json")
        launcher = [sys.executable, "-c", LAUNCHER, str(usage_file), *command]
        child = subprocess.Popen(launcher, stdout=out, stderr=err, env=env)
        while not (reaped := os.wait4(child.pid, os.WNOHANG))[0]:
            sample = rss_split(_launched_pid(child.pid))
            anon, mapped = max(anon, sample[0]), max(mapped, sample[1])
            time.sleep(0.02)
        wall = time.perf_counter() - began
    _, status, _ = reaped
    child.returncode = os.waitstatus_to_exitcode(status)
    usage = json.loads(usage_file.read_text()) if usage_file.is_file() else {"maxrss": 0, "cpu": 0.0}
    sync_seconds = fsync_folder(output)
    os.sync()  # untimed: no dirty page of this run may be written back during the next one
    result: dict[str, Any] = {
        "wall_seconds": round(wall, 2),
        "peak_mb": round(usage["maxrss"] / 1024, 1),
        "sampled_peak_anon_mb": round(anon / 1024, 1),
        "sampled_peak_file_mb": round(mapped / 1024, 1),
        "cpu_seconds": round(usage["cpu"], 2),
        "returncode": child.returncode,
        "output_fsync_seconds": sync_seconds,
    }
    with contextlib.suppress(OSError, IndexError, json.JSONDecodeError, TypeError, KeyError):  # seshu's --json
        result["own_seconds"] = json.loads(log.with_suffix(".out").read_text().splitlines()[-1])["seconds"]
    if child.returncode != 0:
        result["error_tail"] = log.with_suffix(".err").read_text(errors="replace")[-3000:]
    return result


def fsync_folder(folder: Path) -> float:
    """Seconds to fsync every file of `folder` (0 when there is none)."""
    began = time.perf_counter()
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return round(time.perf_counter() - began, 3)


def weight_files(folders: Sequence[Path]) -> list[Path]:
    return [path for folder in folders for path in sorted(folder.glob("*.safetensors"))]


def evict(files: Sequence[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages go: the inputs are never written), so that the next
    read comes from the disk. posix_fadvise needs no privileges, unlike /proc/sys/vm/drop_caches."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_dd(*operands: str) -> float:
    began = time.perf_counter()
    subprocess.run(["dd", *operands, f"bs={DD_BLOCK}", "status=none"], check=True)
    return time.perf_counter() - began


def settle(models: Sequence[Path], cold: bool) -> bool:
    """Put memory in the same state before each timed run against the disk, so that neither seshu nor `dd` meets a
    kinder page cache: dirty pages written back, the page cache dropped where that is allowed (as root), then the
    inputs evicted (cold) or read once (warm). Returns whether the cache could be dropped.

    Why: on this VM the time to write into the page cache depends on what the cache went through just before.
    1.5 GB of writes took 3.3, 1.2 and 0.3 s in three runs in a row. `dd`'s warm write of a 740M merge's bytes took
    1.1-1.4 s when it came right after another write and an unlink, and 7.6-7.8 s after the settling the merge
    had."""
    os.sync()
    dropped = False
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dropped = True
    files = weight_files(models)
    if cold:
        evict(files)
    else:
        for path in files:
            timed_dd(f"if={path}", "of=/dev/null")
    return dropped


def disk_reference(models: Sequence[Path], out_bytes: int, scratch: Path, cold: bool) -> dict[str, Any]:
    """`dd` on the same bytes as a merge of `models`, from a settled cache (see `settle`): reading every input file
    to /dev/null, then writing `out_bytes` of zeros; cold: the inputs evicted first and the write fdatasync'd (to
    the disk), warm: the inputs cached and the write left in the page cache, as a merge's own timing leaves it."""
    files = weight_files(models)
    dropped = settle(models, cold)
    read = sum(timed_dd(f"if={path}", "of=/dev/null") for path in files)
    blocks = -(-out_bytes // DD_BLOCK)
    write = timed_dd("if=/dev/zero", f"of={scratch}", f"count={blocks}", *(["conv=fdatasync"] if cold else []))
    scratch.unlink()
    return {
        "read_bytes": sum(path.stat().st_size for path in files),
        "write_bytes": blocks * DD_BLOCK,
        "read_seconds": round(read, 3),
        "write_seconds": round(write, 3),
        "page_cache_dropped_first": dropped,
    }


def disk_ratios(merge_seconds: float, read: float, write: float) -> dict[str, float]:
    """The merge's time over the disk's for the same bytes: reads then writes (what a merge that overlaps nothing
    would take at best), and the longer of the two (what one that overlaps them perfectly would)."""
    return {
        "merge_seconds": round(merge_seconds, 3),
        "read_seconds": round(read, 3),
        "write_seconds": round(write, 3),
        "over_read_plus_write": round(merge_seconds / (read + write), 3),
        "over_max_read_write": round(merge_seconds / max(read, write), 3),
    }


def compare(seshu_out: Path, mergekit_out: Path, base: Path, method: str) -> dict[str, Any]:
    """Tensor by tensor (one in memory at a time): max |seshu - mergekit| and how many entries differ by over
    TOLERANCE; for dare_ties, whose drops come from different RNGs, also each side's task vector (merged - base):
    the share of entries it moved and its L1 norm."""
    ours, theirs, base_files = tensor_files(seshu_out), tensor_files(mergekit_out), tensor_files(base)
    check: dict[str, Any] = {"missing": sorted(set(ours) ^ set(theirs)), "mismatched": [], "tolerance": TOLERANCE}
    check.update(max_abs_diff=0.0, worst_tensor=None, entries_over_tolerance=0)
    changed, l1, total = [0, 0], [0.0, 0.0], 0
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(path: Path, name: str) -> torch.Tensor:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path].get_tensor(name)

        for name in sorted(set(ours) & set(theirs)):
            a, b = read(ours[name], name), read(theirs[name], name)
            if a.shape != b.shape or a.dtype != b.dtype:
                check["mismatched"].append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                continue
            diff = (a - b).abs()
            check["entries_over_tolerance"] += int((diff > TOLERANCE).sum())
            if float(diff.max()) > check["max_abs_diff"]:
                check.update(max_abs_diff=float(diff.max()), worst_tensor=name)
            if method not in DETERMINISTIC:
                ref = read(base_files[name], name)
                for i, out in enumerate((a, b)):
                    changed[i] += int((out != ref).sum())
                    l1[i] += float((out - ref).abs().sum(dtype=torch.float64))
                total += a.numel()
    if total:
        check["changed_fraction"] = {"seshu": changed[0] / total, "mergekit": changed[1] / total}
        check["task_vector_l1"] = {"seshu": l1[0], "mergekit": l1[1]}
        check["l1_ratio_seshu_over_mergekit"] = l1[0] / l1[1] if l1[1] else None
    return check


@dataclass
class Row:
    size: str
    method: str
    seshu: dict[str, Any]  # median wall_seconds and max peak_mb over the attempts, the command, every attempt
    mergekit: dict[str, Any] | None
    time_ratio: float | None  # seshu / mergekit wall time; the goal is <= 0.5
    check: dict[str, Any] | None
    config: dict[str, Any]  # the YAML both read
    loadavg_after: tuple[float, float, float]
    disk: dict[str, Any] | None = None  # DISK_METHODS: seshu's merge time against dd on the same bytes


def summarize(attempts: list[dict[str, Any]], command: list[str]) -> dict[str, Any]:
    ok = [a for a in attempts if a["returncode"] == 0]
    summary: dict[str, Any] = {"ok": len(ok) == len(attempts), "command": command, "attempts": attempts}
    if ok:
        summary["wall_seconds"] = round(statistics.median(a["wall_seconds"] for a in ok), 2)
        summary["peak_mb"] = max(a["peak_mb"] for a in ok)
    return summary


def bench_method(size: str, method: str, models: list[Path], work: Path, args: argparse.Namespace) -> Row:
    tag = f"{size}-{method}"
    config = work / "configs" / f"{tag}.yaml"
    for folder in ("configs", "logs", "outputs"):
        (work / folder).mkdir(exist_ok=True)
    config_dict = merge_config(method, models)
    config.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    outs = {side: work / "outputs" / f"{tag}-{side}" for side in ("seshu", "mergekit")}
    shard_bytes = str(args.shard_bytes)  # plain bytes: both tools read a bare number as bytes
    commands = {
        "seshu": [sys.executable, "-m", "seshu", "merge", "--config", str(config), "--out", str(outs["seshu"]),
                  "--no-progress", "--json", "--set", f"output.shard_size={shard_bytes}"],
        # --out-shard-size counts bytes, whatever its help says; see the README for the other flags.
        "mergekit": [args.mergekit, str(config), str(outs["mergekit"]), "--out-shard-size", shard_bytes,
                     "--no-copy-tokenizer", "--quiet", "--random-seed", str(SEED)],
    }  # fmt: skip
    sides = ["seshu", "mergekit"] if args.mergekit else ["seshu"]
    attempts: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            shutil.rmtree(outs[side], ignore_errors=True)
            warm_cache(models)
            print(f"[{tag}] {side} (run {repeat + 1}/{args.repeats}) ...", end=" ", flush=True)
            attempt = run_timed(commands[side], work / "logs" / f"{tag}-{side}-{repeat}", outs[side])
            attempts[side].append(attempt)
            state = "ok" if attempt["returncode"] == 0 else f"FAILED (exit {attempt['returncode']})"
            own = f" (merging: {attempt['own_seconds']:.2f} s by its report)" if "own_seconds" in attempt else ""
            print(f"{attempt['wall_seconds']:.1f} s{own}, peak {attempt['peak_mb']:,.0f} MB, {state}", flush=True)
            if attempt["returncode"] != 0:
                print(attempt["error_tail"][-1500:], file=sys.stderr, flush=True)
    seshu = summarize(attempts["seshu"], commands["seshu"])
    mergekit = summarize(attempts["mergekit"], commands["mergekit"]) if args.mergekit else None
    check, ratio = None, None
    if mergekit and seshu["ok"] and mergekit["ok"]:
        ratio = round(seshu["wall_seconds"] / mergekit["wall_seconds"], 3)
        check = compare(outs["seshu"], outs["mergekit"], models[0], method)
        print(f"[{tag}] seshu/mergekit time {ratio:.2f}; max |diff| {check_cell(method, check)}", flush=True)
    disk = None
    if method in DISK_METHODS and seshu["ok"]:
        disk = against_disk(tag, models, outs["seshu"], commands["seshu"], work)
    for out in outs.values():  # 3 GB each at 740m
        shutil.rmtree(out, ignore_errors=True)
    return Row(size, method, seshu, mergekit, ratio, check, config_dict, os.getloadavg(), disk)


def against_disk(tag: str, models: list[Path], out: Path, command: list[str], work: Path) -> dict[str, Any]:
    """seshu's merge time (its own report, without start-up) against `dd` on the same bytes, each from the same
    settled state of memory (`settle`): warm (inputs in the cache, output left in the page cache) and cold (inputs
    evicted, output fsynced: that time counts)."""
    out_bytes = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    result: dict[str, Any] = {"reference": {}, "runs": {}}
    for state in ("warm", "cold"):
        cold = state == "cold"
        shutil.rmtree(out)
        settle(models, cold)
        print(f"[{tag}] seshu from a settled {state} cache ...", end=" ", flush=True)
        run = run_timed(command, work / "logs" / f"{tag}-seshu-{state}", out)
        fsync = run["output_fsync_seconds"] if cold else 0.0
        print(f"{run.get('own_seconds', float('nan')):.2f} s merging" + (f" + {fsync:.2f} s fsync" if cold else ""))
        reference = disk_reference(models, out_bytes, work / "dd-write.tmp", cold)
        result["runs"][state], result["reference"][state] = run, reference
        if "own_seconds" not in run:
            return {**result, "error": "a seshu run failed"}
        r = result[state] = disk_ratios(
            run["own_seconds"] + fsync, reference["read_seconds"], reference["write_seconds"]
        )
        print(f"[{tag}] {state}: merge {r['merge_seconds']:.2f} s, dd read {r['read_seconds']:.2f} s + write "
              f"{r['write_seconds']:.2f} s: x{r['over_read_plus_write']:.2f} of read+write, "
              f"x{r['over_max_read_write']:.2f} of max(read, write)", flush=True)  # fmt: skip
    return result


# --------------------------------------------------------------------------------------------------
# Driver


def check_cell(method: str, check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    if check["mismatched"] or check["missing"]:
        return "[red]tensors differ[/red]"
    if method not in DETERMINISTIC:
        ratio = check.get("l1_ratio_seshu_over_mergekit")
        return f"random; L1 x{ratio:.3f}" if ratio is not None else "random"
    over = check["entries_over_tolerance"]
    return f"{check['max_abs_diff']:.2g}" + (f" ({over:,} > {TOLERANCE:g})" if over else "")


def print_table(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("size", "method", "seshu s", "mergekit s", "seshu/mergekit", "seshu peak MB", "mergekit peak MB")
    for name in (*columns, "max |diff|"):
        table.add_column(name, justify="left" if name in columns[:2] else "right")

    def cell(side: dict[str, Any] | None, key: str, spec: str) -> str:
        return "-" if side is None or key not in side else format(side[key], spec)

    for r in rows:
        ratio = "-" if r.time_ratio is None else f"[{'green' if r.time_ratio <= 0.5 else 'red'}]{r.time_ratio:.2f}[/]"
        table.add_row(
            r.size, r.method, cell(r.seshu, "wall_seconds", ".1f"), cell(r.mergekit, "wall_seconds", ".1f"), ratio,
            cell(r.seshu, "peak_mb", ",.0f"), cell(r.mergekit, "peak_mb", ",.0f"), check_cell(r.method, r.check),
        )  # fmt: skip
    console = Console(width=132)
    console.print(table)
    console.print(
        "Goal: seshu/mergekit wall time <= 0.5 for every method; seshu peak under 1 GB at 740m (not growing with\n"
        "the model). Peak MB: each child process's own ru_maxrss. max |diff|: largest |seshu - mergekit| over all\n"
        "tensors; dare_ties drops at random with different RNGs, so instead: L1 of seshu's task vector over mergekit's."
    )


def print_disk_table(rows: Sequence[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="seshu merge against dd on the same bytes (merge time: seshu's own, without start-up)")
    for name in ("size", "method", "cache", "merge s", "dd read s", "dd write s", "/ (read+write)", "/ max"):
        table.add_column(name, justify="left" if name in ("size", "method", "cache") else "right")
    for r in rows:
        for state in ("warm", "cold"):
            if r.disk and state in r.disk:
                d = r.disk[state]
                table.add_row(
                    r.size, r.method, state, f"{d['merge_seconds']:.2f}", f"{d['read_seconds']:.2f}",
                    f"{d['write_seconds']:.2f}", f"{d['over_read_plus_write']:.2f}", f"{d['over_max_read_write']:.2f}",
                )  # fmt: skip
    console = Console(width=132)
    console.print(table)
    console.print(
        "Each row's merge and dd start from the same settled memory: dirty pages written back, the page cache\n"
        "dropped where allowed (root), then warm: inputs read once, the output left in the page cache (dd write\n"
        "without fdatasync); cold: inputs evicted, the merge's output fsynced (counted), dd with conv=fdatasync.\n"
        "/ (read+write) <= 1: the merge overlaps its reads and writes better than taking turns would; / max = 1 is\n"
        "the limit of a perfect overlap."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(PRESETS), default=["60m", "740m"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--mergekit", default=None, help="mergekit-yaml to run (default: $MERGEKIT_YAML, PATH)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side and method (median wall time)")
    parser.add_argument("--shard-bytes", type=int, default=2_000_000_000, help="output shard size, both sides")
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints, configs, logs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.mergekit = find_mergekit(args.mergekit)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    if args.mergekit is None:
        print("mergekit-yaml not found (--mergekit, $MERGEKIT_YAML, PATH): measuring seshu only", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="seshu-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ours = [work] if args.work is None else [work / name for name in (*args.sizes, "configs", "logs", "outputs")]
    rows: list[Row] = []
    checkpoints: dict[str, Any] = {}
    # Seshu's cards carry the inputs' sha256, which Seshu remembers per file (seshu.io.sha256_file); mergekit hashes
    # nothing. The bench hashes the inputs once, untimed, into a cache of its own, and reports what that took.
    os.environ["SESHU_CACHE_DIR"] = str(work / "seshu-cache")
    ours.append(work / "seshu-cache")
    try:
        for size in args.sizes:
            models, checkpoints[size] = prepare_models(work, size)
            checkpoints[size]["seshu_input_hashing_seconds"] = hash_inputs(models)
            print(f"[{size}] hashing the inputs once for Seshu's cards: "
                  f"{checkpoints[size]['seshu_input_hashing_seconds']:.1f} s (untimed)", flush=True)  # fmt: skip
            for method in args.methods:
                rows.append(bench_method(size, method, models, work, args))
    finally:
        for folder in [] if args.keep else ours:  # only what this run made, never a --work folder itself
            shutil.rmtree(folder, ignore_errors=True)

    versions = mergekit_versions(args.mergekit) if args.mergekit else None
    print_table(rows, f"Merging 3 fp32 Llama checkpoints, {os.cpu_count()} CPUs: seshu against mergekit")
    print_disk_table(rows)
    report = {
        "benchmark": "merge_vs_mergekit",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/merge_vs_mergekit.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seed": SEED,
            "variant_noise_relative_std": NOISE,
            "env": {"HF_HUB_OFFLINE": "1"},
            "timing": "each side a subprocess; wall = perf_counter around it, peak = ru_maxrss via a launcher; inputs "
            "read once before every run (warm cache), os.sync() after it; sides alternate; the inputs' sha256 for "
            "Seshu's card hashed once before the runs (checkpoints.<size>.seshu_input_hashing_seconds); "
            "results[i].disk (linear, task_arithmetic): seshu's own merge seconds against dd on the same bytes, each "
            "after the same settling of memory (sync, drop_caches where allowed, inputs read or evicted)",
        },
        "checkpoints": checkpoints,
        "environment": {
            "seshu_env": {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}},
            "mergekit_env": versions,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            **machine_record(started, load_start),
        },
        "results": [asdict(row) for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    failed = [f"{r.size}-{r.method}" for r in rows if not r.seshu["ok"] or (r.mergekit and not r.mergekit["ok"])]
    if failed:
        print(f"failed: {', '.join(failed)} (the JSON has each error's tail)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
