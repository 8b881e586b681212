"""Pretraining throughput: `seshu pretrain` against a plain PyTorch loop, in tokens/s and MFU.

Command (about 16 minutes on 2 idle CPU cores: 6 for the three archs, 10 for the Mamba scans; --no-mamba-scan
skips those, --compile adds the torch.compile rows, about 6 more):
    python bench/pretrain_throughput.py [--archs llama mixtral mamba] [--steps N] [--warmup N]
        [--seq-len 256] [--batch-size 8] [--precision auto|fp32|bf16] [--compile]
        [--no-mamba-scan | --scan-steps 50] [--out bench/results/pretrain_throughput.json]

Seshu trains with its defaults (`--precision`: its `train.precision`, `auto` unless told otherwise: bf16 mixed
precision on hardware that computes bf16 natively). Its peers are a plain PyTorch loop in fp32 and, when Seshu
trains in bf16, the same loop under bf16 autocast (float32 weights and AdamW, as one writes mixed precision by
hand). All train the same model (`seshu.train.pretrain.prepare_model`: same arch, preset, seed and model code) on
the same packed blocks (`build_block_datasets` over the bundled English + Hindi corpus, with a tokenizer trained
once) with the same training math: AdamW with the recipe's lr, betas, eps and weight decay (none on biases and
norms, as Trainer does), the recipe's LR schedule, gradient clipping at `train.max_grad_norm` (1.0 by default)
and no KV cache (Trainer turns it off). The plain loop is what a person would write by hand: full batches of
blocks already in one tensor, forward, backward, clip, step, zero_grad. Seshu is
`seshu.train.pretrain.run(recipe)`, i.e. transformers' Trainer with Seshu's collator, callbacks and run log.

They run interleaved, step for step: a TrainerCallback takes a timestamp at each of Seshu's `on_step_end` and
then runs one step of each plain loop. Seshu's step time is from the end of the last plain step to its next
`on_step_end` (so Trainer's logging, dataloader and collator are inside it), each plain step's is its own. On a
machine shared with other work (someone's test run) a slow spell then hits all sides alike, and the ratios stay
meaningful even when the absolute figures do not. Tokens/s counts the steps after the warm-up (start-up,
dataset building, compilation, the final evaluation and save are outside), with each step's real token count.
The two plain loops start from the same weights and see the same batches, so the largest difference between
their loss curves says how far bf16 moves training.

MFU = 6 * N * tokens/s / ceiling, where N is the parameter count (tied embeddings once; for a mixture of experts the
*active* parameters: everything outside the experts plus experts * top_k / num_experts) and the ceiling is the
GFLOP/s of a large square matmul in the side's precision, measured in this run with the same thread count. 6N counts
the matmuls of the linear layers only: it leaves out attention scores (up to 12 * layers * seq_len * hidden per
token, 12% more at the small preset with seq_len 256, half that with the causal mask skipped) and Mamba's selective
scan, so it understates the work; all sides get the same N.

The Mamba scan comparison (on by default) compares the selective scans that can train the Mamba preset: Seshu's
chunked scan (what Seshu builds, `seshu.models.mamba`) against mambapy's parallel scan (what transformers runs on a
CPU without Seshu: the same weights loaded into a plain `MambaForCausalLM`). Both are plain loops over the same
batches from the same initial weights, interleaved step for step (which goes first alternates); the table gives
their tokens/s and ratio, and the largest difference between their two loss curves over `--scan-steps` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    get_scheduler,
)
from transformers.trainer_pt_utils import get_parameter_names

from seshu import assets
from seshu.config import PretrainRecipe, validate
from seshu.data.pipeline import build_block_datasets, training_documents
from seshu.models.mamba import scan_path
from seshu.models.registry import count_parameters
from seshu.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from seshu.train import pretrain
from seshu.train.precision import resolve_precision

CORPUS = ("seshu:corpus/en.txt", "seshu:corpus/hi.txt")
DEFAULT_OUT = Path(__file__).parent / "results" / "pretrain_throughput.json"
# Mamba trains at a third of a Llama's speed on 2 cores, so it gets fewer steps than the transformers.
DEFAULT_STEPS = {"llama": 30, "mixtral": 30, "mamba": 12}
DEFAULT_WARMUP = {"llama": 3, "mixtral": 3, "mamba": 2}
CEILING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# With --compile the first steps compile the graph (tens of seconds): they must fall inside the warm-up.
COMPILE_EXTRA_WARMUP = 3
# Parameter names Trainer exempts from weight decay (transformers 5, Trainer.get_decay_parameter_names).
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


# --------------------------------------------------------------------------------------------------
# The machine: its matmul ceiling and how busy other processes keep it


def matmul_ceiling(n: int = 2048, reps: int = 8, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of an n x n @ n x n matmul (2 n^3 flops) in `dtype` at the current torch thread count: best and
    median."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {
        "n": n,
        "reps": reps,
        "gflops_best": round(max(rates), 1),
        "gflops_median": round(statistics.median(rates), 1),
    }


# --------------------------------------------------------------------------------------------------
# Data and models


@dataclass
class Blocks:
    tensor: torch.Tensor  # (num_blocks, seq_len), int64
    digest: str
    tokenizer_dir: Path
    vocab_size: int
    padding_tokens: int
    stream_tokens: int  # tokens of the training documents as packing lays them out, before cutting into blocks


def block_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def prepare_blocks(work: Path, seq_len: int, vocab_size: int, seed: int) -> Blocks:
    """Train the tokenizer once, save it for the recipes, and pack the training blocks both sides read."""
    data = make_recipe("llama", "small", work, work / "tokenizer", seq_len, 8, 1, 0, seed, False, "fp32").data
    tokenizer = train_tokenizer(training_documents(data, seed), vocab_size, "bpe", seed=seed)
    save_tokenizer(tokenizer, work / "tokenizer")
    train, _ = build_block_datasets(data, tokenizer, seq_len, seed, work / "data-cache")
    rows = np.asarray(train.with_format("numpy")["input_ids"], dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != seq_len:
        raise RuntimeError(f"packing gave blocks of shape {rows.shape}, expected (n, {seq_len})")
    ids = tokenizer(list(training_documents(data, seed)), add_special_tokens=False, verbose=False)["input_ids"]
    per_doc = 1 + int(tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id)
    return Blocks(
        tensor=torch.from_numpy(rows),
        digest=block_digest(rows),
        tokenizer_dir=work / "tokenizer",
        vocab_size=len(tokenizer),
        padding_tokens=int((rows == tokenizer.pad_token_id).sum()),
        stream_tokens=sum(len(x) + per_doc for x in ids if x),
    )


def make_recipe(
    arch: str,
    preset: str,
    out: Path,
    tokenizer_dir: Path,
    seq_len: int,
    batch_size: int,
    max_steps: int,
    warmup: int,
    seed: int,
    compile_model: bool,
    precision: str,
) -> PretrainRecipe:
    raw = {
        "model": {"arch": arch, "preset": preset},
        "tokenizer": {"path": str(tokenizer_dir)},
        # One validation block: the run's final evaluation is not what is measured.
        "data": {"train": [assets.resolve(p) for p in CORPUS], "validation": 0.05, "max_eval_blocks": 1},
        "train": {
            "seq_len": seq_len,
            "batch_size": batch_size,
            "max_steps": max_steps,
            "warmup_steps": warmup,
            # Past the last step: no evaluation or checkpoint inside the timed window.
            "eval_every": max_steps + 1,
            "save_every": max_steps + 1,
            "compile": compile_model,
            "precision": precision,
            "seed": seed,
        },
        "output_dir": str(out),
    }
    recipe: PretrainRecipe = validate(PretrainRecipe, raw, "benchmark recipe")
    return recipe


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters one token passes through: for a mixture of experts, the experts count top_k / num_experts."""
    total = count_parameters(model)
    experts = getattr(model.config, "num_local_experts", None)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return total
    expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return round(total - expert + expert * top_k / experts)


def trainer_batch_sizes(num_blocks: int, batch_size: int) -> list[int]:
    """Blocks per step over one epoch of Trainer's dataloader (it keeps the short last batch: drop_last=False)."""
    sizes = [batch_size] * (num_blocks // batch_size)
    return sizes + ([num_blocks % batch_size] if num_blocks % batch_size else [])


# --------------------------------------------------------------------------------------------------
# The two contenders


class PlainLoop:
    """The hand-written baseline: same model, data and training math, nothing else. `step()` times itself."""

    def __init__(
        self,
        recipe: PretrainRecipe,
        tokenizer: PreTrainedTokenizerBase,
        blocks: torch.Tensor,
        model: PreTrainedModel | None = None,
        precision: str = "fp32",
    ) -> None:
        """`model`: train this one instead of the recipe's (the Mamba scan's peer: the same weights, another scan).
        `precision`: fp32, or bf16 under `torch.autocast` around the forward, as one writes mixed precision by
        hand (float32 weights and optimizer, as Trainer keeps them)."""
        t = recipe.train
        self.precision = precision
        self.model = model if model is not None else pretrain.prepare_model(recipe, tokenizer)
        # A training loop has no use for a KV cache, and Trainer turns it off (config.use_cache = args.use_cache).
        # Left on, Llama and Mixtral build a DynamicCache in every forward: a dozen more cats and their backward.
        self.model.config.use_cache = False
        self.model.train()
        decayed = set(get_parameter_names(self.model, [torch.nn.LayerNorm], _NO_DECAY_PATTERNS))
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decayed], "weight_decay": t.weight_decay},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = get_scheduler(
            t.scheduler, self.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps
        )
        self.forward: Callable[..., Any] = torch.compile(self.model) if t.compile else self.model
        self.max_grad_norm = t.max_grad_norm
        self.batches = self._full_batches(blocks, t.batch_size, t.seed)
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    @staticmethod
    def _full_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Shuffled full batches forever, reshuffled each epoch."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(blocks), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield blocks[order[start : start + batch_size]]

    def step(self) -> None:
        start = time.perf_counter()
        batch = next(self.batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.forward(input_ids=batch, labels=batch).loss  # Mixtral's includes the router's aux loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)
        self.tokens.append(batch.numel())
        self.losses.append(loss.item())


class Interleave(TrainerCallback):
    """Times each of Seshu's steps and runs one step of each plain loop after it, so all meet the same machine.

    Each step also gets the share of the CPU other processes took meanwhile, and before each timed pair it waits
    (out of a budget of `max_wait` seconds in all) for the machine to go quiet. It also checks that Trainer reads
    the benchmark's very blocks and notes Trainer's thread count.
    """

    def __init__(self, plains: list[PlainLoop], warmup: int, sizes: list[int], seq_len: int, max_wait: float) -> None:
        self.plains = plains
        self.warmup = warmup
        self.sizes = sizes
        self.seq_len = seq_len
        self.wait_budget = max_wait
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.foreign: list[float | None] = []
        self.plain_foreign: list[list[float | None]] = [[] for _ in plains]
        # From the end of the previous step (and its plain step) to the start of this one: Trainer's logging,
        # the dataloader and the collator.
        self.gaps: list[float] = []
        self.monitor = CpuMonitor()
        self.digest: str | None = None
        self.threads: int | None = None
        self.began = self.ended = self._resume = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if dataset is not None:
            self.digest = block_digest(np.asarray(dataset.with_format("numpy")["input_ids"]))
        self.threads = torch.get_num_threads()
        self.monitor.start()
        self.began = self._resume = time.perf_counter()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step >= self.warmup:
            self.gaps.append(time.perf_counter() - self._resume)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.foreign.append(self.monitor.stop())
        self.seconds.append(now - self._resume)
        self.tokens.append(self.sizes[(state.global_step - 1) % len(self.sizes)] * self.seq_len)
        for plain, foreign in zip(self.plains, self.plain_foreign, strict=True):
            self.monitor.start()
            plain.step()
            foreign.append(self.monitor.stop())
        if state.global_step >= self.warmup and state.global_step < state.max_steps and self.wait_budget > 0:
            self.wait_budget -= wait_for_quiet(self.wait_budget, sample=1.0)
        self.monitor.start()
        self._resume = self.ended = time.perf_counter()


# A step during which other processes took more than this share of the CPU does not count as quiet.
QUIET = 0.1


@dataclass
class Side:
    tokens_per_second: float  # over the quiet pairs when there are enough of them, else over all timed steps
    tokens_per_second_all_steps: float
    mfu: float
    median_step_seconds: float
    step_seconds: list[float]  # each timed step, for spotting stalls
    step_foreign_cpu: list[float | None]  # share of the CPU other processes took during each timed step
    warmup_step_seconds: list[float]  # compilation shows here

    @classmethod
    def of(
        cls,
        seconds: list[float],
        tokens: list[int],
        foreign: list[float | None],
        warmup: int,
        chosen: list[int],
        flops_per_token: float,
        ceiling: float,
    ) -> Side:
        rate = sum(tokens[i] for i in chosen) / sum(seconds[i] for i in chosen)
        return cls(
            tokens_per_second=round(rate, 1),
            tokens_per_second_all_steps=round(sum(tokens[warmup:]) / sum(seconds[warmup:]), 1),
            mfu=round(flops_per_token * rate / (ceiling * 1e9), 4),
            median_step_seconds=round(statistics.median(seconds[warmup:]), 4),
            step_seconds=[round(s, 3) for s in seconds[warmup:]],
            step_foreign_cpu=foreign[warmup:],
            warmup_step_seconds=[round(s, 3) for s in seconds[:warmup]],
        )


@dataclass
class Row:
    arch: str
    preset: str
    compile: bool
    parameters: int
    active_parameters: int
    warmup_steps: int
    timed_steps: int
    # "quiet pairs": only the timed steps where neither side saw other processes take over QUIET of the CPU
    # (used when at least a third of the pairs were quiet); "all steps" otherwise.
    basis: str
    quiet_pairs: int
    seshu_precision: str  # what `train.precision` (--precision) trained Seshu in here
    plain: Side  # the plain fp32 loop
    seshu: Side
    ratio_seshu_over_plain: float
    # The median over timed steps of (seshu step rate / the following plain step's rate): robust to a burst of load.
    ratio_median_of_pairs: float
    # The plain loop in Seshu's precision (bf16 autocast), when that is not fp32: the same-precision peer.
    plain_same_precision: Side | None
    ratio_seshu_over_plain_same_precision: float | None
    ratio_median_of_pairs_same_precision: float | None
    # The two plain loops train from the same weights on the same batches: how far bf16 moves the loss curve.
    max_abs_loss_difference_same_precision_vs_fp32: float | None
    foreign_cpu: float | None  # mean share of all cores other processes used while timing
    loadavg_after: tuple[float, float, float]
    seshu_extra: dict[str, Any] = field(default_factory=dict)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 3) if known else None


def bench_arch(
    arch: str,
    args: argparse.Namespace,
    blocks: Blocks,
    tokenizer: PreTrainedTokenizerBase,
    ceilings: dict[str, float],
    compile_model: bool,
    work: Path,
) -> Row:
    steps = args.steps or DEFAULT_STEPS.get(arch, 20)
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP.get(arch, 3)
    sizes = trainer_batch_sizes(len(blocks.tensor), args.batch_size)
    if compile_model:
        # Compilation happens in the first steps, and again at Trainer's first short batch (the last of an epoch),
        # where the batch dimension turns dynamic. Both are one-off costs: the warm-up covers them (and the
        # warm-up step times, kept in the JSON, show them).
        warmup += COMPILE_EXTRA_WARMUP
        if sizes[-1] != args.batch_size:
            warmup = max(warmup, len(sizes) + 1)
    tag = f"{arch}-{args.preset}{' +compile' if compile_model else ''}"
    recipe = make_recipe(
        arch, args.preset, work / tag.replace(" +", "-"), blocks.tokenizer_dir, args.seq_len, args.batch_size,
        warmup + steps, warmup, args.seed, compile_model, args.precision,
    )  # fmt: skip
    precision = resolve_precision(args.precision)
    plains = [PlainLoop(recipe, tokenizer, blocks.tensor)]
    if precision != "fp32":
        plains.append(PlainLoop(recipe, tokenizer, blocks.tensor, precision=precision))
    print(
        f"[{tag}] {warmup} warm-up + {steps} timed steps; seshu in {precision}, interleaved with the plain loop in "
        + " and ".join(p.precision for p in plains),
        flush=True,
    )
    waited = wait_for_quiet(args.max_wait)
    total, active = count_parameters(plains[0].model), active_parameters(plains[0].model)
    timer = Interleave(plains, warmup, sizes, args.seq_len, args.max_wait)
    called = time.perf_counter()
    result = pretrain.run(recipe, callbacks=[timer])
    returned = time.perf_counter()
    if result.steps != warmup + steps:
        raise RuntimeError(f"seshu ran {result.steps} steps, expected {warmup + steps}")
    if timer.digest != blocks.digest:
        raise RuntimeError("seshu trained on other blocks than the plain loop; the comparison would be unfair")

    timed = range(warmup, warmup + steps)
    quiet = [
        i for i in timed if max(timer.foreign[i] or 0.0, *(f[i] or 0.0 for f in timer.plain_foreign)) <= QUIET
    ]  # fmt: skip
    chosen = quiet if len(quiet) >= max(2, steps / 3) else list(timed)
    seshu_side = Side.of(
        timer.seconds, timer.tokens, timer.foreign, warmup, chosen, 6 * active, ceilings[precision]
    )  # fmt: skip
    plain_sides = [
        Side.of(p.seconds, p.tokens, f, warmup, chosen, 6 * active, ceilings[p.precision])
        for p, f in zip(plains, timer.plain_foreign, strict=True)
    ]

    def median_of_pairs(plain: PlainLoop) -> float:
        pairs = [(timer.tokens[i] / timer.seconds[i]) / (plain.tokens[i] / plain.seconds[i]) for i in chosen]
        return round(statistics.median(pairs), 3)

    same = plains[1] if len(plains) > 1 else None
    same_side = plain_sides[1] if len(plain_sides) > 1 else None
    row = Row(
        arch=arch,
        preset=args.preset,
        compile=compile_model,
        parameters=total,
        active_parameters=active,
        warmup_steps=warmup,
        timed_steps=steps,
        basis="quiet pairs" if chosen is quiet else "all steps",
        quiet_pairs=len(quiet),
        seshu_precision=precision,
        plain=plain_sides[0],
        seshu=seshu_side,
        ratio_seshu_over_plain=round(seshu_side.tokens_per_second / plain_sides[0].tokens_per_second, 3),
        ratio_median_of_pairs=median_of_pairs(plains[0]),
        plain_same_precision=same_side,
        ratio_seshu_over_plain_same_precision=(
            round(seshu_side.tokens_per_second / same_side.tokens_per_second, 3) if same_side else None
        ),
        ratio_median_of_pairs_same_precision=median_of_pairs(same) if same else None,
        max_abs_loss_difference_same_precision_vs_fp32=(
            max(abs(a - b) for a, b in zip(plains[0].losses, same.losses, strict=True)) if same else None
        ),
        foreign_cpu=_mean([*timer.foreign[warmup:], *(x for f in timer.plain_foreign for x in f[warmup:])]),
        loadavg_after=os.getloadavg(),
        seshu_extra={
            "waited_for_quiet_seconds": round(waited + args.max_wait - timer.wait_budget, 1),
            "startup_seconds": round(timer.began - called, 1),  # tokenizer, model, dataset, Trainer set-up
            "teardown_seconds": round(returned - timer.ended, 1),  # final evaluation, save, card and plot
            "torch_threads_in_trainer": timer.threads,
            "median_seconds_between_steps": round(statistics.median(timer.gaps), 4),
            "max_seconds_between_steps": round(max(timer.gaps), 4),
            "short_batches_timed": sum(1 for i in chosen if timer.tokens[i] < args.batch_size * args.seq_len),
        },
    )
    same_text = ""
    if same_side:
        ratio = row.ratio_seshu_over_plain_same_precision
        same_text = f", plain {precision} {same_side.tokens_per_second:,.0f} tok/s (ratio {ratio:.2f})"
    print(
        f"[{tag}] plain fp32 {plain_sides[0].tokens_per_second:,.0f} tok/s, seshu {seshu_side.tokens_per_second:,.0f} "
        f"tok/s (ratio {row.ratio_seshu_over_plain:.2f}){same_text}; over {row.basis}: {len(chosen)} of {steps}; "
        f"other processes took {row.foreign_cpu} of the CPU",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------------------------------
# Mamba: Seshu's chunked scan against mambapy's parallel scan


@dataclass
class ScanRow:
    preset: str
    warmup_steps: int
    timed_steps: int
    paths: dict[str, str]  # side -> the scan that trained it (seshu.models.mamba.scan_path)
    tokens_per_second: dict[str, float]  # over the timed steps
    ratio_seshu_over_mambapy: float
    ratio_median_of_pairs: float  # median over timed steps of the two sides' step-rate ratio
    losses: dict[str, list[float]]  # every step's training loss, warm-up included
    max_abs_loss_difference: float
    foreign_cpu: float | None


def bench_mamba_scan(
    args: argparse.Namespace, blocks: Blocks, tokenizer: PreTrainedTokenizerBase, work: Path
) -> ScanRow:
    """Seshu's Mamba (chunked scan) and the same weights in a plain transformers Mamba (mambapy), trained side by
    side by the plain loop on the same batches, interleaved step for step."""
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP["mamba"]
    steps = args.scan_steps
    recipe = make_recipe(
        "mamba", args.preset, work / "mamba-scan", blocks.tokenizer_dir, args.seq_len, args.batch_size,
        warmup + steps, warmup, args.seed, False, "fp32",
    )  # fmt: skip
    seshu_side = PlainLoop(recipe, tokenizer, blocks.tensor)
    plain_model = AutoModelForCausalLM.from_config(seshu_side.model.config)
    plain_model.load_state_dict(seshu_side.model.state_dict())
    sides = {"seshu": seshu_side, "mambapy": PlainLoop(recipe, tokenizer, blocks.tensor, model=plain_model)}
    paths = {name: scan_path(side.model, "cpu") or "?" for name, side in sides.items()}
    print(f"[mamba scan] {warmup} warm-up + {steps} timed steps: {paths['seshu']} vs {paths['mambapy']}", flush=True)
    wait_for_quiet(args.max_wait)
    monitor, foreign = CpuMonitor(), []
    for step in range(warmup + steps):
        monitor.start()
        for name in ("seshu", "mambapy") if step % 2 == 0 else ("mambapy", "seshu"):
            sides[name].step()
        foreign.append(monitor.stop())
    rates = {
        name: round(sum(side.tokens[warmup:]) / sum(side.seconds[warmup:]), 1) for name, side in sides.items()
    }  # fmt: skip
    pairs = [sides["mambapy"].seconds[i] / sides["seshu"].seconds[i] for i in range(warmup, warmup + steps)]
    losses = {name: side.losses for name, side in sides.items()}
    row = ScanRow(
        preset=args.preset,
        warmup_steps=warmup,
        timed_steps=steps,
        paths=paths,
        tokens_per_second=rates,
        ratio_seshu_over_mambapy=round(rates["seshu"] / rates["mambapy"], 3),
        ratio_median_of_pairs=round(statistics.median(pairs), 3),
        losses=losses,
        max_abs_loss_difference=max(abs(a - b) for a, b in zip(*losses.values(), strict=True)),
        foreign_cpu=_mean(foreign[warmup:]),
    )
    print(
        f"[mamba scan] seshu {rates['seshu']:,.0f} tok/s, mambapy {rates['mambapy']:,.0f} tok/s, "
        f"ratio {row.ratio_seshu_over_mambapy:.2f}; loss curves differ by at most {row.max_abs_loss_difference:.2g}",
        flush=True,
    )
    return row


def print_scan_table(row: ScanRow, threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Mamba-{row.preset} training scans, fp32, {threads} threads, plain loop, same batches")
    for name in ("scan", "tok/s", "vs mambapy", "loss at step 1", f"loss at step {len(row.losses['seshu'])}"):
        table.add_column(name, justify="left" if name == "scan" else "right")
    for side in ("seshu", "mambapy"):
        table.add_row(
            row.paths[side],
            f"{row.tokens_per_second[side]:,.0f}",
            f"{row.tokens_per_second[side] / row.tokens_per_second['mambapy']:.2f}",
            f"{row.losses[side][0]:.4f}",
            f"{row.losses[side][-1]:.4f}",
        )
    console = Console(width=132)
    console.print(table)
    console.print(
        f"Largest difference between the two loss curves over {len(row.losses['seshu'])} steps: "
        f"{row.max_abs_loss_difference:.2g}. Median of the per-step speed ratios: {row.ratio_median_of_pairs:.2f}. "
        f"Other processes took {'?' if row.foreign_cpu is None else f'{row.foreign_cpu:.0%}'} of the CPU."
    )


# --------------------------------------------------------------------------------------------------
# Driver


def print_table(rows: Sequence[Row], ceilings: dict[str, float], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    peaks = ", ".join(f"{k} {v}" for k, v in ceilings.items())
    table = Table(title=f"Pretraining throughput, {threads} threads; matmul ceilings (GFLOP/s): {peaks}")
    columns = (
        "arch", "params (active)", "seshu in", "plain fp32 tok/s", "seshu tok/s", "seshu / plain fp32",
        "plain same-prec. tok/s", "seshu / same-prec.", "MFU plain fp32", "MFU seshu",
    )  # fmt: skip
    for name in (*columns, "other load", "steps"):
        table.add_column(name, justify="left" if name == "arch" else "right")
    for r in rows:
        params = f"{r.parameters / 1e6:.2f}M"
        if r.active_parameters != r.parameters:
            params += f" ({r.active_parameters / 1e6:.2f}M)"
        table.add_row(
            f"{r.arch}-{r.preset}{' +compile' if r.compile else ''}",
            params,
            r.seshu_precision,
            f"{r.plain.tokens_per_second:,.0f}",
            f"{r.seshu.tokens_per_second:,.0f}",
            f"{r.ratio_seshu_over_plain:.2f}",
            f"{r.plain_same_precision.tokens_per_second:,.0f}" if r.plain_same_precision else "-",
            f"{r.ratio_seshu_over_plain_same_precision:.2f}" if r.ratio_seshu_over_plain_same_precision else "-",
            f"{r.plain.mfu:.1%}",
            f"{r.seshu.mfu:.1%}",
            "?" if r.foreign_cpu is None else f"{r.foreign_cpu:.0%}",
            f"{r.quiet_pairs if r.basis == 'quiet pairs' else r.timed_steps}/{r.timed_steps}"
            + (" quiet" if r.basis == "quiet pairs" else " all"),
        )
    console = Console(width=132)
    console.print(table)
    console.print(
        "MFU = 6 x params x tokens/s / the matmul ceiling of the side's precision; a mixture of experts counts its\n"
        "active parameters (in brackets). 6N leaves out attention scores and Mamba's scan, so MFU understates the\n"
        "work, for every side. same-prec.: the plain loop under bf16 autocast, when Seshu trains in bf16.\n"
        "other load: share of the CPU other processes took while timing. steps: the timed steps the figures\n"
        "come from: only those where no side saw other load over 10% (quiet), when a third or more were."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--archs", nargs="*", default=["llama", "mixtral", "mamba"], help="none: the Mamba scans only")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30, mamba 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 3, mamba 2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also measure both sides with torch.compile")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="Seshu's train.precision (default: auto, its default); the plain loop runs in fp32, and also in bf16 "
        "when Seshu does",
    )
    parser.add_argument(
        "--mamba-scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare Seshu's Mamba scan with mambapy's, same batches (default: on)",
    )
    parser.add_argument("--scan-steps", type=int, default=50, help="timed steps of the Mamba scans (default: 50)")
    parser.add_argument(
        "--max-wait", type=float, default=60.0, help="seconds to wait for other processes to go quiet before each arch"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    threads = torch.get_num_threads()
    wait_for_quiet(args.max_wait)
    ceiling = {name: matmul_ceiling(dtype=dtype) for name, dtype in CEILING_DTYPES.items()}
    for name, c in ceiling.items():
        print(f"{name} matmul ceiling: {c['gflops_best']} GFLOP/s (median {c['gflops_median']}), {threads} threads")

    rows: list[Row] = []
    scan_row: ScanRow | None = None
    with tempfile.TemporaryDirectory(prefix="seshu-bench-") as tmp:
        work = Path(tmp)
        blocks = prepare_blocks(work, args.seq_len, args.vocab_size, args.seed)
        tokenizer = load_tokenizer(str(blocks.tokenizer_dir))
        print(
            f"data: {len(blocks.tensor)} blocks of {args.seq_len} tokens, vocab {blocks.vocab_size}, "
            f"{blocks.padding_tokens} padding tokens",
            flush=True,
        )
        for compile_model in (False, True) if args.compile else (False,):
            for arch in args.archs:
                best = {name: c["gflops_best"] for name, c in ceiling.items()}
                rows.append(bench_arch(arch, args, blocks, tokenizer, best, compile_model, work))
        if args.mamba_scan:
            scan_row = bench_mamba_scan(args, blocks, tokenizer, work)
    wait_for_quiet(args.max_wait)
    ceiling_end = {name: matmul_ceiling(dtype=dtype) for name, dtype in CEILING_DTYPES.items()}
    # Other processes can only slow the matmul down: the better of the two measurements is the ceiling.
    used = {name: max(ceiling[name]["gflops_best"], ceiling_end[name]["gflops_best"]) for name in ceiling}
    for row in rows:
        sides = [(row.plain, "fp32"), (row.seshu, row.seshu_precision)]
        if row.plain_same_precision:
            sides.append((row.plain_same_precision, row.seshu_precision))
        for side, precision in sides:
            side.mfu = round(6 * row.active_parameters * side.tokens_per_second / (used[precision] * 1e9), 4)

    if rows:
        print_table(rows, used, threads)
    if scan_row:
        print_scan_table(scan_row, threads)
    sizes = trainer_batch_sizes(len(blocks.tensor), args.batch_size)
    report = {
        "benchmark": "pretrain_throughput",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/pretrain_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "tokens_per_step": args.seq_len * args.batch_size,
            "seshu_precision": resolve_precision(args.precision),
            "plain_loop": "AdamW (recipe lr, betas, eps; weight decay as Trainer applies it), recipe LR schedule, "
            "clip_grad_norm_ at train.max_grad_norm, use_cache off, full shuffled batches from one tensor",
            "timing": "plain and seshu interleaved step by step; tokens/s over the steps after the warm-up",
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "torch_threads": threads,
            **machine_record(started, load_start),
        },
        "matmul_ceiling": {
            name: {**c, "gflops_best_at_end": ceiling_end[name]["gflops_best"], "gflops_used": used[name]}
            for name, c in ceiling.items()
        },
        "data": {
            "corpus": list(CORPUS),
            "vocab_size": blocks.vocab_size,
            "blocks": len(blocks.tensor),
            "block_digest": blocks.digest,
            "packed_tokens": blocks.tensor.numel(),
            "padding_tokens": blocks.padding_tokens,
            "padding_fraction": blocks.padding_tokens / blocks.tensor.numel(),
            "tail_tokens_dropped": blocks.stream_tokens - blocks.tensor.numel(),
            "trainer_short_batch_blocks": sizes[-1] if sizes[-1] != args.batch_size else None,
        },
        "results": [asdict(row) for row in rows],
        "mamba_scan": asdict(scan_row) if scan_row else None,
        "notes": [
            "MFU = 6 * active parameters * tokens/s / matmul ceiling of the side's precision "
            "(best GFLOP/s of 2048^3 matmuls in that dtype at the same thread count, the better of start and end).",
            "plain_same_precision: the plain loop with bf16 autocast around the forward (float32 weights and AdamW); "
            "it and the fp32 plain loop train the same model code as Seshu, its MoE experts under autocast included.",
            "Mixture of experts: active = non-expert parameters + expert parameters * top_k / num_experts.",
            "6N leaves out attention-score FLOPs and Mamba's selective scan.",
            "foreign_cpu: share of all cores other processes used while timing (0 = machine otherwise idle).",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
