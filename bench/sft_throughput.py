"""Fine-tuning throughput and memory: `seshu sft` (lora, qlora, full) against the same training on trl + peft.

Command (about 25 minutes on 2 idle CPU cores with the defaults: 3 alternating attempts per side and method):
    python bench/sft_throughput.py [--methods lora qlora full] [--steps N] [--warmup N] [--preset base]
        [--seq-len 256] [--batch-size 4] [--repeats 3] [--no-gradient-checkpointing]
        [--out bench/results/sft_throughput.json]

The base model is a fresh llama at `--preset` (base: 768 wide, 12 layers) with a `--vocab-size` embedding table
(32000 by default, 124M parameters), saved with a BPE tokenizer trained on the bundled corpus. The data is the
bundled instruction sample (`seshu:instructions/*.jsonl`), tokenized once with `seshu.train.sft.build_datasets`
(i.e. `tokenize_conversation`: ids and answer mask): the training rows Seshu builds, and the direct side reads.

Each measurement runs in a fresh subprocess of this script (`--worker`), so that its peak memory is its own:
- **seshu**: `seshu.train.sft.run(recipe)` with a recipe of the method, seq_len, batch size and steps; validation
  and checkpoints pushed past the last step.
- **direct**: what a person writes on the libraries: `AutoModelForCausalLM.from_pretrained` (for qlora with the
  4-bit `BitsAndBytesConfig` Seshu uses, then `prepare_model_for_kbit_training`), `get_peft_model` with a
  `LoraConfig` of Seshu's default targets, r, alpha and dropout, and `trl.SFTTrainer` + `SFTConfig` with the
  recipe's batch size, steps, lr, schedule, warm-up, weight decay, clipping, optimizer, precision, seed and
  logging interval, on the very rows above. trl's own defaults differ from Seshu's in two places (it turns
  gradient checkpointing and bf16 on); the direct side sets them to the recipe's values, or it would not be the
  same training. Gradient checkpointing is on for both sides by default: without it the activations of a batch
  (the same for every method) dwarf what the methods differ in, the gradients and optimizer state. Like
  `seshu sft`, the direct side evaluates the validation rows and saves the adapter (or model) at the end.

Tokens/s is steady state on both sides, taken by the same TrainerCallback: from the end of step `warmup` to the
end of the last step, counting the real (non-padding) tokens of each step's batch (its attention mask, read by a
forward pre-hook on the model). Both sides read the same rows in the same order (checked: the rows' digest and
the tokens of every step must agree). Peak memory is the worker's `ru_maxrss` (the whole process: imports,
loading, training, the final evaluation and save); `train_peak_mb` is the peak from the start of training to its
end (Linux's VmHWM, reset when training starts).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from machine import (  # bench/machine.py: the benchmarks' shared look at the machine
    CpuMonitor,
    machine_record,
    wait_for_quiet,
)
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

METHODS = ("lora", "qlora", "full")
INSTRUCTIONS = tuple(f"seshu:instructions/{n}.jsonl" for n in ("instruct", "qa", "reasoning", "translation"))
CORPUS = ("seshu:corpus/en.txt", "seshu:corpus/hi.txt")
DEFAULT_OUT = Path(__file__).parent / "results" / "sft_throughput.json"
# bitsandbytes' CPU 4-bit kernels want every quantized projection's output width to be a multiple of 32.
QLORA_WIDTH_MULTIPLE = 32


# --------------------------------------------------------------------------------------------------
# Measuring (inside a worker)


def rows_digest(rows: Iterable[Sequence[int]]) -> str:
    """A digest of variable-length token rows, lengths included."""
    digest = hashlib.sha256()
    for row in rows:
        ids = np.asarray(row, dtype=np.int64)
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(ids.tobytes())
    return digest.hexdigest()[:16]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset Linux's VmHWM to the current RSS (so it measures a window); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class StepMeter(TrainerCallback):
    """Stamps every step's end with the real tokens of its batch (the attention mask, read by a forward pre-hook
    on the model), and records the loss, the train-window peak memory and the digest of the rows Trainer reads."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []
        self.tokens: list[int] = []  # attention-mask tokens per step (the throughput count)
        self.answer_tokens: list[int] = []  # tokens with a label (what the loss covers)
        self.rss: list[float | None] = []  # resident memory at each step's end
        # From one step's end to the next one's start: logging, callbacks, the dataloader and the collator.
        self.gaps: list[float] = []
        self.losses: dict[int, float] = {}
        self.digest: str | None = None
        self.threads: int | None = None
        self.rss_at_train_begin: float | None = None
        self.train_peak_mb: float | None = None
        self.foreign_cpu: float | None = None
        self._pending = [0, 0]
        self._monitor = CpuMonitor()

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and kwargs.get("attention_mask") is not None:
            self._pending[0] += int(kwargs["attention_mask"].sum())
            if kwargs.get("labels") is not None:
                self._pending[1] += int((kwargs["labels"] != -100).sum())

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        kwargs["model"].register_forward_pre_hook(self._count, with_kwargs=True)
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if dataset is not None:
            self.digest = rows_digest(dataset["input_ids"])
        self.threads = torch.get_num_threads()
        self.rss_at_train_begin = _status_mb("VmRSS") if reset_peak_rss() else None
        self.stamps.append(time.perf_counter())

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step > self.warmup:
            self.gaps.append(time.perf_counter() - self.stamps[-1])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            self._monitor.start()
        self.stamps.append(time.perf_counter())
        self.tokens.append(self._pending[0])
        self.answer_tokens.append(self._pending[1])
        self.rss.append(_status_mb("VmRSS"))
        self._pending = [0, 0]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = round(float(logs["loss"]), 4)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.foreign_cpu = self._monitor.stop()
        if self.rss_at_train_begin is not None:
            self.train_peak_mb = _status_mb("VmHWM")


def summarize(meter: StepMeter, warmup: int) -> dict[str, Any]:
    stamps, tokens = meter.stamps, meter.tokens
    if len(tokens) <= warmup:
        raise RuntimeError(f"only {len(tokens)} steps ran; need more than the {warmup} warm-up")
    seconds = stamps[-1] - stamps[warmup]
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "tokens_per_second": round(sum(tokens[warmup:]) / seconds, 1),
        "answer_tokens_per_second": round(sum(meter.answer_tokens[warmup:]) / seconds, 1),
        "timed_steps": len(tokens) - warmup,
        "median_step_seconds": round(statistics.median(steps[warmup:]), 3),
        "step_seconds": [round(s, 3) for s in steps],
        "median_seconds_between_steps": round(statistics.median(meter.gaps), 4) if meter.gaps else None,
        "step_tokens": tokens,
        "losses": meter.losses,
        "rows_digest": meter.digest,
        "torch_threads": meter.threads,
        "foreign_cpu": meter.foreign_cpu,
        "rss_at_train_begin_mb": meter.rss_at_train_begin,
        "step_rss_mb": meter.rss,
        "train_peak_mb": meter.train_peak_mb,
    }


# --------------------------------------------------------------------------------------------------
# The two contenders (each runs in its own worker process)


def seshu_side(recipe: Any, warmup: int) -> dict[str, Any]:
    from seshu.train import sft

    meter = StepMeter(warmup)
    result = sft.run(recipe, callbacks=[meter])
    if result.steps != recipe.train.max_steps:
        raise RuntimeError(f"seshu ran {result.steps} steps, expected {recipe.train.max_steps}")
    return {**summarize(meter, warmup), "trainable_parameters": result.trainable_parameters}


def direct_side(recipe: Any, warmup: int, rows_dir: Path) -> dict[str, Any]:
    """The same fine-tuning written on transformers, peft and trl, with Seshu's settings copied over."""
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from seshu.models.registry import ARCHS

    t, method, base = recipe.train, recipe.sft.method, recipe.model.init_from
    tokenizer = AutoTokenizer.from_pretrained(base)
    if method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if method != "full":
        lora = recipe.sft.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=0.05 if lora.dropout is None else lora.dropout,  # Seshu's default for nn.Linear targets
            target_modules=list(ARCHS[model.config.model_type].lora_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    args = SFTConfig(
        output_dir=str(Path(recipe.output_dir) / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=False,  # trl's default is True; the recipe trains in fp32
        gradient_checkpointing=t.gradient_checkpointing,  # trl's default is True
        max_length=t.seq_len,
        packing=False,
        logging_steps=t.log_every,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=t.seed,
        data_seed=t.seed,
    )
    meter = StepMeter(warmup)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.load_from_disk(str(rows_dir / "train")),
        eval_dataset=datasets.load_from_disk(str(rows_dir / "validation")),
        processing_class=tokenizer,
        callbacks=[meter],
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(Path(recipe.output_dir) / "final"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**summarize(meter, warmup), "trainable_parameters": trainable}


def worker_main(spec_path: Path) -> int:
    """Run one measurement as `spec_path` says and write its figures next to it (`<spec>.result.json`)."""
    from seshu.config import SFTRecipe, validate

    def measure(spec: dict[str, Any]) -> dict[str, Any]:
        recipe = validate(SFTRecipe, spec["recipe"], "benchmark recipe")
        torch.manual_seed(recipe.train.seed)
        if spec["side"] == "seshu":
            return seshu_side(recipe, spec["warmup"])
        return direct_side(recipe, spec["warmup"], Path(spec["rows_dir"]))

    return run_measurement(spec_path, measure)


def run_measurement(spec_path: Path, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """In a worker process: `measure` the spec at `spec_path`, add the process's wall time, peak memory and load,
    and write the figures next to it (`<spec>.result.json`)."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    transformers.logging.set_verbosity_error()
    imported = _status_mb("VmRSS")
    begin = time.perf_counter()
    figures = measure(spec)
    figures.update(
        wall_seconds=round(time.perf_counter() - begin, 1),
        peak_rss_mb=peak_rss_mb(),
        rss_after_imports_mb=imported,
        loadavg_after=os.getloadavg(),
    )
    spec_path.with_suffix(".result.json").write_text(json.dumps(figures), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------
# Data and base model (in the driver)


@dataclass
class Prepared:
    base_dir: Path
    rows_dir: Path
    parameters: int
    vocab_size: int
    tokenizer_size: int
    train_rows: int
    validation_rows: int
    rows_digest: str
    train_tokens: int
    answer_tokens: int


def make_recipe(args: argparse.Namespace, method: str, base: Path, out: Path) -> dict[str, Any]:
    """A Seshu SFT recipe (as a plain dict, so it can travel to a worker); every other setting is the default."""
    steps = args.warmup + args.steps
    return {
        "model": {"init_from": str(base)},
        "data": {"train": list(INSTRUCTIONS), "validation": 0.05},
        "train": {
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "max_steps": steps,
            # Past the last step: no evaluation or checkpoint inside the timed window.
            "eval_every": steps + 1,
            "save_every": steps + 1,
            "seed": args.seed,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "sft": {"method": method},
        "output_dir": str(out),
    }


def prepare(args: argparse.Namespace, work: Path) -> Prepared:
    """Build and save the base model with its tokenizer, and tokenize the instruction rows both sides train on."""
    from seshu.config import PretrainRecipe, SFTRecipe, validate
    from seshu.data.instructions import ensure_chat_template
    from seshu.data.pipeline import training_documents
    from seshu.models.registry import build_config, build_model, count_parameters, get_preset_arch
    from seshu.tokenizer import load_tokenizer, train_tokenizer
    from seshu.train import sft

    widths = get_preset_arch("llama", args.preset).presets[args.preset]
    if "qlora" in args.methods and any(widths[k] % QLORA_WIDTH_MULTIPLE for k in ("hidden_size", "intermediate_size")):
        raise SystemExit(
            f"--preset {args.preset}: qlora needs projection widths that are multiples of {QLORA_WIDTH_MULTIPLE} "
            "(bitsandbytes' CPU kernels); pick another preset or drop qlora from --methods"
        )
    corpus = validate(PretrainRecipe, {"data": {"train": list(CORPUS)}}, "corpus").data
    tokenizer = train_tokenizer(training_documents(corpus, args.seed), args.tokenizer_vocab, "bpe", seed=args.seed)
    tokenizer.model_max_length = args.seq_len
    config = build_config(
        "llama",
        args.preset,
        vocab_size=max(args.vocab_size, len(tokenizer)),
        context_length=args.seq_len,
        special_token_ids={
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        },
    )
    model = build_model(config, seed=args.seed)
    parameters = count_parameters(model)
    base = work / "base"
    model.save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    del model

    # The rows `seshu sft` builds from the recipe (held-out split included) are the rows the direct side reads.
    recipe = validate(SFTRecipe, make_recipe(args, "lora", base, work / "probe"), "benchmark recipe")
    sft_tokenizer = load_tokenizer(str(base))  # as `seshu sft` loads it
    if ensure_chat_template(sft_tokenizer):
        raise RuntimeError("the tokenizer lacks Seshu's chat tokens; both sides must start from the same vocabulary")
    train, validation = sft.build_datasets(recipe, sft_tokenizer, work / "data-cache")
    rows = work / "rows"
    train.save_to_disk(str(rows / "train"))
    validation.save_to_disk(str(rows / "validation"))
    masks = train["assistant_masks"]
    return Prepared(
        base_dir=base,
        rows_dir=rows,
        parameters=parameters,
        vocab_size=config.vocab_size,
        tokenizer_size=len(tokenizer),
        train_rows=len(train),
        validation_rows=len(validation),
        rows_digest=rows_digest(train["input_ids"]),
        train_tokens=sum(len(m) for m in masks),
        answer_tokens=sum(sum(m) for m in masks),
    )


# --------------------------------------------------------------------------------------------------
# Driver


def run_worker(side: str, method: str, args: argparse.Namespace, prepared: Prepared, work: Path, tag: str) -> dict:
    name = f"{method}-{side}-{tag}"
    spec = {
        "side": side,
        "warmup": args.warmup,
        "rows_dir": str(prepared.rows_dir),
        "recipe": make_recipe(args, method, prepared.base_dir, work / name),
    }
    return run_worker_process(__file__, spec, work / name, args.max_wait, prepared.rows_digest)


def run_worker_process(
    script: str, spec: dict[str, Any], stem: Path, max_wait: float, rows_digest: str
) -> dict[str, Any]:
    """Once the machine is quiet, run `script --worker` on `spec` (written to `<stem>.json`, its output logged to
    `<stem>.log`) in a fresh process; its figures, checked to come from the prepared rows (`rows_digest`)."""
    spec_path, log = stem.with_suffix(".json"), stem.with_suffix(".log")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    waited = wait_for_quiet(max_wait)
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(
            [sys.executable, script, "--worker", str(spec_path)], stdout=handle, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the {stem.name} worker failed (exit {done.returncode}):\n{tail}")
    figures: dict[str, Any] = json.loads(spec_path.with_suffix(".result.json").read_text(encoding="utf-8"))
    figures["waited_seconds"] = waited
    if figures["rows_digest"] != rows_digest:
        raise RuntimeError(
            f"the {spec['side']} side trained on other rows than were prepared; the comparison is unfair"
        )
    return figures


@dataclass
class Row:
    method: str
    parameters: int
    trainable_parameters: int
    seshu: dict[str, Any]
    direct: dict[str, Any]
    attempts: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return float(self.seshu["tokens_per_second"]) / float(self.direct["tokens_per_second"])

    def as_json(self) -> dict[str, Any]:
        same_batches = self.seshu["step_tokens"] == self.direct["step_tokens"]
        return {**asdict(self), "ratio_seshu_over_direct": round(self.ratio, 3), "same_batches": same_batches}


def alternate_sides(
    label: str, repeats: int, run: Callable[[str, int], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[float]]]:
    """`run(side, attempt)` for `repeats` attempts of each side, alternating; the median attempt of each side (the
    same training checked: equal trainable parameters) and every attempt's tokens/s."""
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "seshu": []}
    for attempt in range(repeats):
        for side in ("direct", "seshu"):  # alternating spreads a slow spell of the machine over both sides
            figures = run(side, attempt)
            runs[side].append(figures)
            print(
                f"[{label}] {side} {attempt + 1}/{repeats}: {figures['tokens_per_second']:,.0f} tok/s, peak "
                f"{figures['peak_rss_mb']:,.0f} MB (training {figures['train_peak_mb'] or 0:,.0f} MB), "
                f"foreign cpu {figures['foreign_cpu']}",
                flush=True,
            )
    # Even on an idle machine, single attempts of both sides scatter by about +-10%: the median attempt of each side
    # is the figure least moved by one lucky or unlucky run (the best of each would reward the luckier side).
    seshu, direct = median_attempt(runs["seshu"]), median_attempt(runs["direct"])
    if seshu["trainable_parameters"] != direct["trainable_parameters"]:
        raise RuntimeError(
            f"{label}: seshu trains {seshu['trainable_parameters']:,} parameters, the direct side "
            f"{direct['trainable_parameters']:,}; the two are not the same training"
        )
    attempts = {side: [f["tokens_per_second"] for f in figures] for side, figures in runs.items()}
    return seshu, direct, attempts


def bench_method(method: str, args: argparse.Namespace, prepared: Prepared, work: Path) -> Row:
    print(f"[{method}] {args.warmup} warm-up + {args.steps} timed steps, median of {args.repeats}", flush=True)
    seshu, direct, attempts = alternate_sides(
        method, args.repeats, lambda side, attempt: run_worker(side, method, args, prepared, work, str(attempt))
    )
    return Row(method, prepared.parameters, seshu["trainable_parameters"], seshu, direct, attempts)


def median_attempt(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The attempt with the median tokens/s (the lower middle one for an even count)."""
    ranked = sorted(attempts, key=lambda f: f["tokens_per_second"])
    return ranked[(len(ranked) - 1) // 2]


def print_table(rows: Sequence[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = (
        "method", "params", "trainable", "seshu tok/s", "direct tok/s", "seshu/direct",
        "seshu peak MB", "direct peak MB", "seshu train MB", "direct train MB",
    )  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.parameters / 1e6:.1f}M",
            f"{r.trainable_parameters / 1e6:.2f}M",
            f"{r.seshu['tokens_per_second']:,.0f}",
            f"{r.direct['tokens_per_second']:,.0f}",
            f"{r.ratio:.2f}",
            f"{r.seshu['peak_rss_mb']:,.0f}",
            f"{r.direct['peak_rss_mb']:,.0f}",
            f"{r.seshu['train_peak_mb'] or 0:,.0f}",
            f"{r.direct['train_peak_mb'] or 0:,.0f}",
        )
    console = Console(width=150)
    console.print(table)
    console.print(
        "tok/s: real (non-padding) tokens per second after the warm-up. peak MB: the worker process's ru_maxrss "
        "(load, train, final eval and save);\ntrain MB: peak resident memory from the start of training to its end."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=16, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--preset", default="base", help="llama size preset (>= 100M parameters at base)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000, help="rows of the model's embedding table")
    parser.add_argument("--tokenizer-vocab", type=int, default=8000, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="attempts per side, alternating; the median attempt is reported"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on both sides (default on: it leaves activations small, so the methods' own memory shows)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=120.0, help="seconds to wait for other processes to go quiet before each run"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    transformers.logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="seshu-sft-bench-") as tmp:
        work = Path(tmp)
        prepared = prepare(args, work)
        print(
            f"base: llama-{args.preset}, {prepared.parameters:,} parameters (vocab {prepared.vocab_size}, "
            f"tokenizer {prepared.tokenizer_size}); data: {prepared.train_rows} training conversations, "
            f"{prepared.train_tokens:,} tokens ({prepared.answer_tokens:,} in answers)",
            flush=True,
        )
        for method in args.methods:
            rows.append(bench_method(method, args, prepared, work))

    threads = torch.get_num_threads()
    print_table(rows, f"SFT throughput, llama-{args.preset}, fp32, {threads} threads, batch {args.batch_size} x "
                f"<= {args.seq_len} tokens")  # fmt: skip
    import peft
    import trl

    report = {
        "benchmark": "sft_throughput",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/sft_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "methods": args.methods,
            "arch": "llama",
            "preset": args.preset,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "warmup_steps_untimed": args.warmup,
            "timed_steps": args.steps,
            "seed": args.seed,
            "repeats": args.repeats,
            "max_wait": args.max_wait,
            "precision": "fp32",
            "recipe_train": "SFTRecipe defaults otherwise: lr 2e-4, cosine, 10 LR warm-up steps, weight decay 0, "
            "clip 1.0, adamw_torch, log every 10 steps",
            "gradient_checkpointing": args.gradient_checkpointing,
            "lora": "Seshu's defaults: r 16, alpha 32, dropout 0.05, the registry's llama targets",
            "qlora": "nf4, double quantization, compute and storage dtype float32",
            "tokens_per_second_window": "end of the last warm-up step to the end of the last step; "
            "real tokens = attention-mask sum of each step's batch",
            "peak_memory": "peak_rss_mb = ru_maxrss of the worker process; train_peak_mb = VmHWM reset at "
            "on_train_begin, read at on_train_end",
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "bitsandbytes": _version("bitsandbytes"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "torch_threads": threads,
            **machine_record(started, load_start),
        },
        "model": {
            "arch": "llama",
            "preset": args.preset,
            "parameters": prepared.parameters,
            "vocab_size": prepared.vocab_size,
            "tokenizer_size": prepared.tokenizer_size,
        },
        "data": {
            "sources": list(INSTRUCTIONS),
            "train_rows": prepared.train_rows,
            "validation_rows": prepared.validation_rows,
            "rows_digest": prepared.rows_digest,
            "train_tokens": prepared.train_tokens,
            "answer_tokens": prepared.answer_tokens,
        },
        "results": [row.as_json() for row in rows],
        "notes": [
            "Both sides run in fresh worker processes; peak memory is per process.",
            "The direct side sets gradient_checkpointing and bf16 as the recipe does (trl's defaults are True for "
            "both), or it would not be the same training.",
            "Each side's figures are its median attempt by tokens/s; `attempts` lists every attempt's tokens/s.",
            "foreign_cpu: share of all cores used by other processes while timing (0 = machine otherwise idle).",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
