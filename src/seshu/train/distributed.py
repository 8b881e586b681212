"""Several processes, one run: what Seshu does before the Trainer exists (train a tokenizer, build the data cache,
write the recipe) happens once, on the main process, while the others wait and then reuse it; only the main
process logs and writes.

The processes are those `torchrun` or `accelerate launch` starts. accelerate's `PartialState` reads their
environment and joins the process group the Trainer then trains in; in a single process every function here is
a plain call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from transformers import TrainingArguments

from seshu.models.loading import default_device

T = TypeVar("T")

# How long the other processes wait for the main one to train a tokenizer or build a data cache. Those take
# minutes to hours at real scale (BPE on 2M documents, a few billion tokens packed on one core), far past the
# 30 minutes (the Trainer's `ddp_timeout`) a training collective gets before it is declared hung.
WAIT_TIMEOUT = timedelta(hours=24)


def on_cpu() -> bool:
    """Whether training runs on the CPU: no GPU here, or `accelerate launch --cpu` (ACCELERATE_USE_CPU)."""
    return default_device() == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")


def state() -> PartialState:
    """This process's place in the run (rank, number of processes, device), joining the launcher's process
    group on first use (gloo on CPUs, NCCL on GPUs) with the timeout the Trainer would give it."""
    return PartialState(cpu=on_cpu(), timeout=timedelta(seconds=TrainingArguments.ddp_timeout))


def is_main_process() -> bool:
    return bool(state().is_main_process)


@contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first; the others wait for it, then run it (reusing what it wrote).

    accelerate's own `main_process_first` waits on the training process group, whose timeout is too short for a
    tokenizer or a cache (see `WAIT_TIMEOUT`). A failure on the main process leaves the others waiting until the
    launcher stops them, which it does as soon as one process exits with an error.
    """
    main = is_main_process()
    if not main:
        _wait_for_everyone()
    yield
    if main:
        _wait_for_everyone()


def from_main_process(make: Callable[[], T]) -> T:
    """`make()` computed on the main process alone and sent (pickled) to the others, which wait for it."""
    if state().num_processes == 1:
        return make()
    box = [make() if is_main_process() else None]
    dist.broadcast_object_list(box, src=0, group=_waiting_group())
    return box[0]  # type: ignore[return-value]  # filled in by the broadcast


def _wait_for_everyone() -> None:
    if state().num_processes > 1:
        dist.barrier(group=_waiting_group())


@functools.cache
def _waiting_group() -> dist.ProcessGroup:
    """A gloo group over every process, with `WAIT_TIMEOUT`, made once (by every process at the same point: the
    first wait, which precedes the Trainer). gloo waits on the CPU, so no GPU collective is held open."""
    return dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
