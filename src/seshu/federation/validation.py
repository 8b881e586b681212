"""Checks on an uploaded adapter folder when it arrives, before anything else reads it.

Two layers. `check_files` looks only at names, sizes and leading bytes: a flat folder of an allowlist of files,
no pickles (under any name: a pickle renamed .safetensors is caught by its header), archives, executables,
links or subfolders, and under the size cap. `validate_adapter` then reads the adapter the one checked way
(`seshu.merge.adapters.read_adapter`: safetensors, known config fields, finite values), makes it LoRA pairs
(`seshu.merge.lora.adapter_pairs`, which refuses adapters that are not low-rank deltas), matches it against the
release's base (tensor shapes and architecture) and measures it (rank, targets, exact update norms, size).

tokenizer.model is allowed. It is a sentencepiece ModelProto: protobuf, which a parser reads as data and which
cannot run code as a pickle can, and peft/transformers write it next to an adapter when the donor saves the
tokenizer of a sentencepiece model (Llama 2, Mistral), so refusing it would refuse honest uploads. It must start
as a serialized ModelProto does (byte 0x0A: field 1, `pieces`), which also refuses a pickle under that name.
The coordinator never uses a donor's tokenizer files: a release keeps the tokenizer of its base.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from seshu.errors import UserError
from seshu.federation.policy import Limits, Policy, norm_violations
from seshu.federation.similarity import module_norms, total_norm
from seshu.io import sha256_file
from seshu.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from seshu.merge.checkpoint import Checkpoint, read_header
from seshu.merge.lora import LoraPair, adapter_pairs, check_against_base

REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Other files an adapter folder may carry: its card, and the tokenizer and chat template saved with it.
OPTIONAL_NAMES = ("README.md", "tokenizer.model")
OPTIONAL_SUFFIXES = (".json", ".txt", ".jinja")
# Files refused whatever their name says, by their leading bytes: only signatures that no text file starts with
# (binary bytes or control characters), so that an honest vocabulary is never refused for its first word. Anything
# else under an allowed name must be UTF-8 text or start as its own binary format does, and is only read as data.
MAGIC: dict[bytes, str] = {
    b"\x80\x02": "a pickle (it can run code when loaded)",
    b"\x80\x03": "a pickle (it can run code when loaded)",
    b"\x80\x04": "a pickle (it can run code when loaded)",
    b"\x80\x05": "a pickle (it can run code when loaded)",
    b"PK\x03\x04": "a zip archive (torch.save's format holds a pickle)",
    b"\x1f\x8b": "a gzip archive",
    b"\xfd7zXZ": "an xz archive",
    b"7z\xbc\xaf": "a 7z archive",
    b"\x7fELF": "an executable",
}
# Suffixes refused with a reason that says what to do instead.
REFUSED_SUFFIXES: dict[str, str] = {
    **dict.fromkeys((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"), "pickle weights "
                    "can run code when loaded; save the adapter with safetensors (peft's default)"),
    **dict.fromkeys((".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"), "archives are not "
                    "accepted; upload the adapter folder's files themselves"),
    **dict.fromkeys((".exe", ".sh", ".py", ".so", ".dll", ".dylib", ".bat", ".cmd", ".ps1"), "executables and "
                    "code are not accepted"),
}  # fmt: skip
SENTENCEPIECE_FIRST_BYTE = 0x0A
SAFETENSORS_HEADER_START = b"{"


def check_name(name: str) -> None:
    """A file name that stays inside the folder it is written to: one plain component, not hidden."""
    bad = (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\:\0")
        or any(ord(c) < 32 for c in name)
    )
    if bad:
        raise UserError(f"file name {name!r} is not allowed: only plain file names, inside the adapter folder")


def _allowed(name: str) -> bool:
    return name in REQUIRED_FILES or name in OPTIONAL_NAMES or name.endswith(OPTIONAL_SUFFIXES)


def check_files(folder: str | Path, max_bytes: int) -> dict[str, int]:
    """The folder's files and their sizes, or a UserError naming the first file that is not allowed."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{folder}: not an adapter folder")
    sizes: dict[str, int] = {}
    total = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name, where = entry.name, folder / entry.name
        check_name(name)
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            raise UserError(f"{where}: a link; links can point outside the folder, upload the file itself")
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{where}: a subfolder; an adapter folder is flat")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{where}: not a regular file")
        suffix = Path(name).suffix.lower()
        if suffix in REFUSED_SUFFIXES:
            raise UserError(f"{where}: {REFUSED_SUFFIXES[suffix]}")
        if not _allowed(name):
            raise UserError(
                f"{where}: not a file an adapter folder holds (allowed: {', '.join(REQUIRED_FILES + OPTIONAL_NAMES)}"
                f" and {', '.join('*' + s for s in OPTIONAL_SUFFIXES)})"
            )
        total += info.st_size
        if total > max_bytes:
            raise UserError(f"{folder}: over the size limit of {max_bytes} bytes (at {name})")
        _check_content(where)
        sizes[name] = info.st_size
    missing = [n for n in REQUIRED_FILES if n not in sizes]
    if missing:
        raise UserError(f"{folder}: has no {missing[0]}; upload a PEFT adapter folder (save_pretrained's output)")
    return sizes


def _check_content(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(16)
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            raise UserError(f"{path}: is {what}, whatever its name says")
    if path.name == ADAPTER_WEIGHTS:
        if len(head) < 9 or head[8:9] != SAFETENSORS_HEADER_START:
            raise UserError(f"{path}: not a safetensors file (no 8-byte header length followed by a JSON header)")
        read_header(path)  # the header's entries fit the file
    elif path.name == "tokenizer.model":
        if not head or head[0] != SENTENCEPIECE_FIRST_BYTE:
            raise UserError(f"{path}: not a sentencepiece model")
    else:
        _check_text(path)


def _check_text(path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that passed every check on arrival, and what was measured of it."""

    path: Path
    sha256: str  # of adapter_model.safetensors
    rank: int  # the largest over its adapted weights
    target_modules: tuple[str, ...]  # module names as peft targets them (q_proj, ...), sorted
    module_norms: dict[str, float]  # ||scale * B @ A||_F by base weight name
    total_norm: float
    parameters: int  # numbers in the adapter's tensors
    files: dict[str, int]  # file name -> bytes


def validate_adapter(folder: str | Path, base_folder: str | Path, policy: Policy) -> ValidatedAdapter:
    """Check an uploaded adapter against the release it names (`base_folder`, a model folder) and the policy's
    limits; a UserError says what is wrong with it."""
    folder, base_folder = Path(folder), Path(base_folder)
    limits = policy.limits
    files = check_files(folder, limits.max_adapter_bytes)
    adapter = read_adapter(folder)
    pairs = adapter_pairs(adapter)
    base = Checkpoint(base_folder)
    try:
        check_against_base(pairs, {name: info.shape for name, info in base.tensors.items()}, str(folder))
        weight_norms = _weight_norms(base, pairs) if limits.max_relative_update is not None else None
    finally:
        base.close()
    _check_architecture(adapter.raw_config, base_folder, folder)
    rank = max(int(p.a.shape[0]) for p in pairs.values())
    if rank > limits.max_rank:
        raise UserError(f"{folder}: rank {rank} is over the limit of {limits.max_rank}; train with a lower r")
    targets = target_modules(pairs)
    _check_targets(targets, limits, folder)
    norms = module_norms(pairs)
    total = total_norm(norms)
    over = norm_violations(limits, norms, total, weight_norms)
    if over:
        raise UserError(f"{folder}: {over[0]}; the update is too large for this federation")
    return ValidatedAdapter(
        path=folder,
        sha256=sha256_file(folder / ADAPTER_WEIGHTS),
        rank=rank,
        target_modules=targets,
        module_norms=norms,
        total_norm=total,
        parameters=sum(t.numel() for t in adapter.tensors.values()),
        files=files,
    )


def _weight_norms(base: Checkpoint, pairs: dict[str, LoraPair]) -> dict[str, float]:
    """||W||_F of every adapted base weight, read in row chunks (never a whole large tensor at once)."""
    from seshu.merge.methods import rows_per_chunk

    out = {}
    for name in pairs:
        shape = base.tensors[name].shape
        step, total = rows_per_chunk(shape), 0.0
        for start in range(0, shape[0], step):
            rows = base.read_rows(name, start, min(shape[0], start + step)).double()
            total += float((rows * rows).sum())
        out[name] = total**0.5
    return out


def target_modules(pairs: dict[str, LoraPair]) -> tuple[str, ...]:
    """The last component of every adapted module's name, as LoraConfig.target_modules names it."""
    return tuple(sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in pairs}))


def _check_targets(targets: tuple[str, ...], limits: Limits, folder: Path) -> None:
    if limits.allowed_target_modules is not None:
        refused = [t for t in targets if t not in limits.allowed_target_modules]
        if refused:
            allowed = ", ".join(limits.allowed_target_modules)
            raise UserError(f"{folder}: adapts {refused[0]}, which this federation does not allow (allowed: {allowed})")
    if limits.required_target_modules is not None:
        missing = [t for t in limits.required_target_modules if t not in targets]
        if missing:
            raise UserError(f"{folder}: does not adapt {missing[0]}, which this federation requires")


def _check_architecture(raw_config: dict[str, object], base_folder: Path, folder: Path) -> None:
    """peft records the base's class in `auto_mapping` when it saves an adapter without a task type; when both
    sides name one, they must agree (shapes alone cannot tell two architectures of one size apart)."""
    mapping = raw_config.get("auto_mapping")
    claimed = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    config_path = base_folder / "config.json"
    if not claimed or not config_path.is_file():
        return
    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{config_path}: not a valid model config") from None
    if isinstance(architectures, list) and architectures and claimed not in architectures:
        raise UserError(
            f"{folder}: was trained on a {claimed} but the release is a {', '.join(map(str, architectures))}; "
            "train it on this release"
        )
