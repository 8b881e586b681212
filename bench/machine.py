"""The machine a benchmark runs on: its CPU, and how busy other processes keep it. Shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class CpuMonitor:
    """How much of the machine's CPU went to *other* processes during a window (another developer's tests, say).

    Reads /proc/stat (busy time of all cores) and subtracts this process's own CPU time; 0.0 is an otherwise idle
    machine, 1.0 means every core was busy with someone else. None where /proc/stat does not exist.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except OSError:
            return None
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        busy = self._busy_seconds()
        self._start = None if busy is None else (time.perf_counter(), busy, self._own_seconds())

    def stop(self) -> float | None:
        busy = self._busy_seconds()
        if self._start is None or busy is None:
            return None
        wall = time.perf_counter() - self._start[0]
        foreign = (busy - self._start[1]) - (self._own_seconds() - self._start[2])
        return round(max(0.0, foreign) / (wall * (os.cpu_count() or 1)), 3)


def wait_for_quiet(max_wait: float, threshold: float = 0.1, sample: float = 2.0) -> float:
    """Wait (at most `max_wait` seconds) until other processes use under `threshold` of the machine over a
    `sample`-second look; returns the seconds waited. `foreign_cpu` in the results says whether it stayed quiet."""
    begin = time.perf_counter()
    monitor = CpuMonitor()
    while True:
        monitor.start()
        time.sleep(sample)
        foreign = monitor.stop()
        waited = time.perf_counter() - begin
        if foreign is None or foreign < threshold or waited >= max_wait:
            return round(waited - sample, 1)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_record(started: datetime, load_start: tuple[float, float, float]) -> dict[str, Any]:
    """For a benchmark's JSON (`environment`): the CPU it ran on, the load average at its start and end, and how
    long it took since `started` (UTC)."""
    return {
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
    }
