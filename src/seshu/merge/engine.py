"""`seshu merge`: merge models (or LoRA adapters of one base) tensor by tensor, in bounded memory.

Each output tensor is merged in row chunks read straight from the inputs' safetensors files and written straight
into the output shard (`seshu.merge.checkpoint`), so the memory a merge holds is a few chunks of every input
plus fixed overheads, whatever the model's size. The writes run on a thread of their own (`WriteBehind`) and each
read asks the kernel for the next range ahead, so reading, merging and writing overlap. Everything that can be
wrong with the inputs (architecture, tensor names, shapes, adapters that do not fit the base, parameters) is
checked before the first tensor is merged, and the output appears only when complete (`staged_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from seshu.config import apply_overrides, read_yaml, validate
from seshu.errors import UserError, first_line
from seshu.hub.card import check_replaceable_output, describe_inputs, describe_model, render_card
from seshu.hub.ids import is_hub_id
from seshu.io import staged_dir
from seshu.merge import lora
from seshu.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_dir, read_adapter
from seshu.merge.checkpoint import Checkpoint, PlannedTensor, ShardedWriter, WriteBehind, order_by_file, parse_size
from seshu.merge.config import LAYER_INDEX, MergeConfig, tensor_parameters
from seshu.merge.methods import chunk_rows, merge_chunks, rows_per_chunk
from seshu.progress import progress_bar

CARD_COMMAND = "merge"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
MODEL_FILES = ("config.json", "generation_config.json")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class MergeReport:
    out: Path
    method: str
    kind: str  # model or adapter
    tensors: int
    parameters: int
    out_dtype: str
    seconds: float
    files: list[str] = field(default_factory=list)
    refactor_error: float | None = None  # adapters: ||delta - BA|| / ||delta|| over all adapted weights
    worst_refactor_error: float | None = None
    rank: int | None = None  # adapters: the rank the merged deltas were re-factored to


def load_merge_config(path: Path, overrides: list[str] | None = None) -> MergeConfig:
    raw = apply_overrides(read_yaml(path), overrides or [])
    config: MergeConfig = validate(MergeConfig, raw, str(path))
    return config


def merge_file(path: Path, out: Path, overrides: list[str] | None = None, progress: bool = False) -> MergeReport:
    """`seshu merge --config path --out out`: merge as the YAML file says (with `--set` overrides), its text
    quoted in the card as written when nothing overrides it."""
    config = load_merge_config(path, overrides)
    text = None if overrides else Path(path).read_text(encoding="utf-8")
    return merge(config, out, progress=progress, config_text=text)


def resolve_reference(ref: str) -> Path:
    """A local folder as is; a Hub id (`seshu.hub.ids.is_hub_id`) is fetched from the Hugging Face Hub
    (safetensors, configs, tokenizer)."""
    local = Path(ref)
    if local.is_dir():
        return local
    if not is_hub_id(ref):
        raise UserError(f"{ref}: no such model folder (and not a Hub id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer.model", "merges.txt"]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise UserError(f"{ref}: cannot fetch it from the Hub: {first_line(exc)}") from None


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Inputs:
    config: MergeConfig
    base: Checkpoint | None
    models: list[Checkpoint]  # model inputs (empty when the inputs are adapters)
    pairs: list[dict[str, lora.LoraPair]]  # adapter inputs' deltas (empty when the inputs are models)
    folders: dict[str, Path]
    adapter_configs: list[dict[str, Any]] = field(default_factory=list)  # adapter inputs' adapter_config.json

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def close(self) -> None:
        for checkpoint in [self.base, *self.models]:
            if checkpoint is not None:
                checkpoint.close()


def _open_inputs(config: MergeConfig) -> _Inputs:
    refs = [m.model for m in config.inputs()]
    folders = {ref: resolve_reference(ref) for ref in dict.fromkeys([config.base_model, *refs]) if ref}
    adapters = [is_adapter_dir(folders[ref]) for ref in refs]
    if config.base_model and is_adapter_dir(folders[config.base_model]):
        raise UserError(f"{config.base_model}: base_model is a LoRA adapter; give the model it was trained on")
    if any(adapters) and not all(adapters):
        raise UserError(
            "the inputs mix LoRA adapters and models; fold the adapters first (seshu adapters fold), or merge "
            "adapters only"
        )
    base = Checkpoint(folders[config.base_model]) if config.base_model else None
    if all(adapters):
        return _open_adapters(config, base, refs, folders)
    if config.output.kind == "adapter":
        raise UserError("output.kind adapter needs LoRA adapters as inputs; these are models")
    inputs = _Inputs(config, base, [Checkpoint(folders[ref]) for ref in refs], [], folders)
    _check_models(inputs, refs)
    return inputs


def _open_adapters(config: MergeConfig, base: Checkpoint | None, refs: list[str], folders: dict[str, Path]) -> _Inputs:
    if base is None:
        raise UserError("merging LoRA adapters needs base_model: the model they were trained on")
    shapes = {name: info.shape for name, info in base.tensors.items()}
    pairs, raw_configs = [], []
    for ref in refs:
        files = read_adapter(folders[ref])
        adapter_pairs = lora.adapter_pairs(files)
        lora.check_against_base(adapter_pairs, shapes, ref)
        pairs.append(adapter_pairs)
        raw_configs.append(files.raw_config)
    return _Inputs(config, base, [], pairs, folders, raw_configs)


def _model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; not a transformers model folder")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: not a JSON object")
    return loaded


def _check_models(inputs: _Inputs, refs: list[str]) -> None:
    """Same architecture, the same tensor names and the same shapes, everywhere; errors name the tensor."""
    reference = inputs.reference
    ref_name = inputs.config.base_model or refs[0]
    ref_config = _model_config(reference.folder)
    for ref, checkpoint in zip(refs, inputs.models, strict=True):
        other = _model_config(checkpoint.folder)
        for key in ("model_type", "architectures"):
            if other.get(key) != ref_config.get(key):
                raise UserError(
                    f"{ref}: {key} is {other.get(key)} but {ref_name}'s is {ref_config.get(key)}; only models of one "
                    "architecture merge"
                )
        missing = sorted(set(reference.tensors) - set(checkpoint.tensors))
        if missing:
            raise UserError(f"{ref}: has no tensor {missing[0]}, which {ref_name} has")
        extra = sorted(set(checkpoint.tensors) - set(reference.tensors))
        if extra:
            raise UserError(f"{ref}: has tensor {extra[0]}, which {ref_name} lacks")
        for name, info in reference.tensors.items():
            if checkpoint.tensors[name].shape != info.shape:
                raise UserError(
                    f"tensor {name} has shape {list(checkpoint.tensors[name].shape)} in {ref} but "
                    f"{list(info.shape)} in {ref_name}; the models are of different sizes"
                )


def _layer_count(folder: Path, names: list[str]) -> int:
    config = _model_config(folder) if (folder / "config.json").is_file() else {}
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    found = [int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))]
    return max(found) + 1 if found else 1


# --------------------------------------------------------------------------------------------------
# Streaming


class _FileSource:
    """One tensor of every input, chunk by chunk, read from the checkpoints (see `methods.ChunkSource`)."""

    def __init__(self, name: str, inputs: _Inputs, dtype: torch.dtype) -> None:
        self.name = name
        self.inputs = inputs
        self.dtype = dtype
        self.shape = inputs.reference.tensors[name].shape
        self.deltas = bool(inputs.pairs)
        self.rows, self.cols = chunk_rows(self.shape)
        self.step = rows_per_chunk(self.shape)

    def chunks(self) -> int:
        return max(1, -(-self.rows // self.step))

    def bounds(self, index: int) -> tuple[int, int]:
        return index * self.step, min(self.rows, (index + 1) * self.step)

    def read(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        start, stop = self.bounds(index)
        base = self.inputs.base
        base_rows = None if base is None else base.read_rows(self.name, start, stop).to(self.dtype)
        if self.deltas:
            deltas = []
            for pairs in self.inputs.pairs:
                pair = pairs.get(self.name)
                rows = pair.delta_rows(start, stop) if pair else torch.zeros(stop - start, self.cols)
                deltas.append(rows.to(self.dtype))
            return base_rows, deltas
        return base_rows, [m.read_rows(self.name, start, stop).to(self.dtype) for m in self.inputs.models]


def _reuse_freed_buffers() -> None:
    """A merge allocates and frees buffers of a few MB (one chunk of each input) hundreds of times. glibc serves
    each from a fresh mmap and unmaps it on free, so every chunk pays its page faults again: ~15% of a linear
    merge's time. With these thresholds they stay in the heap and are reused. The setting is the process's and
    stays after the merge (it then keeps up to 512 MB of freed memory for reuse instead of returning it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)


@contextlib.contextmanager
def _a_core_for_the_writer() -> Iterator[None]:
    """torch's intra-op threads, one fewer than the CPUs (at least one), while a model merges. Its operations are
    passes over a few MB, bound by memory, not arithmetic; split across every CPU, their OpenMP team waits at each
    barrier for a thread that the writer thread (or any other process) has pushed off its core: on a 2-CPU machine
    with other work running, an 8 MB `add_` took 16 ms on 2 threads and 0.7 ms on 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge(config: MergeConfig, out: Path, progress: bool = False, config_text: str | None = None) -> MergeReport:
    """Merge as `config` says into the folder `out` (replaced whole, and only when the merge is complete);
    `config_text`, when given, is the YAML the card quotes."""
    began = time.perf_counter()
    _reuse_freed_buffers()
    out = Path(out)
    sources = [r for r in [config.base_model, *(m.model for m in config.models)] if r]
    check_replaceable_output(out, sources, (CARD_COMMAND,), "an earlier merge")
    inputs = _open_inputs(config)
    try:
        # The card's sha256 of every input is read on a second thread while the merge runs.
        with ThreadPoolExecutor(max_workers=1) as pool:
            described = pool.submit(_describe, config, inputs)
            with staged_dir(out) as tmp:
                if config.output.kind == "adapter":
                    report = _merge_adapter(config, inputs, tmp, progress)
                else:
                    report = _merge_model(config, inputs, tmp, progress)
                report = _finish(config, inputs, tmp, out, report, described, config_text, began)
    finally:
        inputs.close()
    return report


def _merge_model(config: MergeConfig, inputs: _Inputs, tmp: Path, progress: bool) -> MergeReport:
    reference = inputs.reference
    names = order_by_file(reference, reference.tensors)
    layers = _layer_count(reference.folder, names)
    compute = torch.float64 if config.dtype == "float64" else torch.float32
    out_dtype = _out_dtype(config, reference)
    plan = []
    for name in names:
        info = reference.tensors[name]
        plan.append(PlannedTensor(name, out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
    deltas = bool(inputs.pairs)
    floating = [n for n in names if reference.tensors[n].dtype.is_floating_point]
    params = {n: tensor_parameters(config, n, layers, deltas) for n in floating}
    method = config.method()
    total = sum(p.nbytes for p in plan)
    with (
        progress_bar(progress, total / 1e6, f"merging ({method.name}, MB)") as advance,
        _a_core_for_the_writer(),
        WriteBehind(ShardedWriter(tmp, plan, parse_size(config.output.shard_size))) as writer,
    ):
        for planned in plan:
            if planned.name not in params:  # integer buffers are copied from the reference
                source = _FileSource(planned.name, inputs, planned.dtype)
                for c in range(source.chunks()):
                    writer.write(planned.name, reference.read_rows(planned.name, *source.bounds(c)))
            else:
                source = _FileSource(planned.name, inputs, compute)
                for chunk in merge_chunks(method, source, params[planned.name]):
                    writer.write(planned.name, chunk.to(out_dtype))
            advance(planned.nbytes / 1e6)
        files = writer.finish()
    count = sum(p.numel for p in (reference.tensors[n] for n in names))
    return MergeReport(tmp, method.name, "model", len(plan), count, _dtype_name(out_dtype), 0.0, files)


def _merge_adapter(config: MergeConfig, inputs: _Inputs, tmp: Path, progress: bool) -> MergeReport:
    """Merge the adapters' deltas weight by weight and re-factor each merged delta to `output.rank`: from the
    stacked factors when the method's merge is a weighted sum of the deltas (`MergeMethod.task_vector_weights`),
    else by an SVD of the merged delta."""
    from safetensors.torch import save_file

    base = inputs.reference
    names = sorted({name for pairs in inputs.pairs for name in pairs})
    layers = _layer_count(base.folder, list(base.tensors))
    rank = config.output.rank
    assert rank is not None
    tensors: dict[str, torch.Tensor] = {}
    tail = energy = 0.0
    worst = 0.0
    method = config.method()
    params = {name: tensor_parameters(config, name, layers, deltas=True) for name in names}
    with progress_bar(progress, len(names), f"merging adapters ({method.name})") as advance:
        for name in names:
            weights = method.task_vector_weights(params[name]) if method.task_vector_weights else None
            if weights is None:
                source = _FileSource(name, inputs, torch.float32)
                delta = torch.cat(list(merge_chunks(method, source, params[name], relative=True)))
                factors = lora.refactor(delta, rank)
            else:  # an input without this weight adds nothing to the sum
                terms = [(p[name], c) for p, c in zip(inputs.pairs, weights, strict=True) if name in p]
                factors = lora.refactor_sum(terms, rank)
            pair = next(pairs[name] for pairs in inputs.pairs if name in pairs)
            tensors.update(lora.adapter_tensors(pair, factors))
            tail, energy = tail + factors.tail_energy, energy + factors.energy
            worst = max(worst, factors.relative_error)
            advance(1)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = {
        **inputs.adapter_configs[0],
        "r": rank,
        "lora_alpha": rank,  # scale 1: the factors hold the delta as it is
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "target_modules": sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names}),
        "base_model_name_or_path": config.base_model,
    }
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    relative = (tail / energy) ** 0.5 if energy > 0 else 0.0
    count = sum(t.numel() for t in tensors.values())
    return MergeReport(
        tmp, method.name, "adapter", len(tensors), count, "float32", 0.0, [ADAPTER_WEIGHTS], relative, worst, rank
    )


def _out_dtype(config: MergeConfig, reference: Checkpoint) -> torch.dtype:
    chosen = config.out_dtype or config.dtype
    if chosen:
        return getattr(torch, chosen)  # validated: float32, float64, bfloat16 or float16
    floating = [info.dtype for info in reference.tensors.values() if info.dtype.is_floating_point]
    return floating[0] if floating else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Output folder, config, tokenizer, card


def _tokenizer_folder(config: MergeConfig, inputs: _Inputs) -> Path:
    source = config.tokenizer_source or "base"
    if source == "base":
        return inputs.folders[config.base_model or config.models[0].model]
    if source not in inputs.folders:
        raise UserError(f"tokenizer_source '{source}' is neither 'base' nor one of the merged models")
    return inputs.folders[source]


def _describe(config: MergeConfig, inputs: _Inputs) -> list[dict[str, str]]:
    described = []
    for ref, folder in inputs.folders.items():
        if is_adapter_dir(folder):
            entries = describe_inputs([str(folder / ADAPTER_WEIGHTS), str(folder / ADAPTER_CONFIG)])
        elif Path(ref).is_dir():
            entries = describe_model(ref)
        else:
            entries = [{"hub_id": ref, "snapshot": str(folder)}]
        described.extend(entries)
    return described


def _finish(
    config: MergeConfig,
    inputs: _Inputs,
    tmp: Path,
    out: Path,
    report: MergeReport,
    described: Future[list[dict[str, str]]],
    config_text: str | None,
    began: float,
) -> MergeReport:
    if report.kind == "model":
        model_config = _model_config(inputs.reference.folder)
        model_config["dtype"] = report.out_dtype
        model_config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
        generation = inputs.reference.folder / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, tmp / generation.name)
    tokenizer = _tokenizer_folder(config, inputs)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, tmp / name)
    seconds = round(time.perf_counter() - began, 2)
    final = MergeReport(**{**report.__dict__, "out": out, "seconds": seconds})
    (tmp / "README.md").write_text(_card(config, final, described.result(), config_text), encoding="utf-8")
    return final


def _card(config: MergeConfig, report: MergeReport, inputs: list[dict[str, str]], config_text: str | None) -> str:
    merged = [m.model for m in config.inputs()]
    metadata: dict[str, Any] = {
        "library_name": "peft" if report.kind == "adapter" else "transformers",
        **({"base_model": config.base_model} if config.base_model and not Path(config.base_model).exists() else {}),
        "tags": ["seshu", "merge", config.merge_method],
        "seshu": {
            "command": CARD_COMMAND,
            "method": config.merge_method,
            "kind": report.kind,
            "dtype": report.out_dtype,
            "parameters": report.parameters,
            "seconds": report.seconds,
            **({"refactor_relative_error": report.refactor_error} if report.refactor_error is not None else {}),
            "config": config.model_dump(mode="json", exclude_defaults=True),
            "inputs": inputs,
        },
    }
    lines = [
        f"A {report.kind} merged with `seshu merge` ({config.merge_method}) from:",
        "",
        *(f"- `{ref}`" for ref in merged),
        "",
        f"Base: `{config.base_model}`." if config.base_model else "",
    ]
    if report.refactor_error is not None:
        lines.append(
            f"\nThe merged weight deltas were re-factored to rank {config.output.rank}; relative error "
            f"{report.refactor_error:.3g} overall, {report.worst_refactor_error:.3g} for the worst weight."
        )
    lines += ["", "Merge configuration:", "", "```yaml", (config_text or yaml.safe_dump(
        config.model_dump(mode="json", exclude_defaults=True), sort_keys=False)).strip(), "```"]  # fmt: skip
    return render_card(f"Merge: {config.merge_method}", metadata, "\n".join(lines))
