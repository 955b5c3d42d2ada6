"""How much of this process's cores other processes are using now, read from the kernel's CPU counters.

Inference runtimes spin their worker threads between operators (ONNX Runtime does by default): on idle cores that
saves the wake-up latency of every parallel operator, but when other processes share the cores a spinning thread
burns the time slice another thread needs, and a parallel operator waits for its slowest, de-scheduled worker.
Measured on a 2-core AMD EPYC with a 256x256 Fast-SCNN (docs/benchmarks.md, "Busy machines"): with one core kept
busy by another process, spin-wait on took 6.2 ms p50 but 14.7 ms p90, spin-wait off 7.6 ms p50 and 8.8 ms p90;
on idle cores spin-wait on was 4.4 ms and off 5.4 ms. Neither setting wins both, so the ONNX Runtime CPU backend
asks `CoreContention` before each run which one the machine calls for.

Linux's /proc/stat counts, per CPU, the time spent busy (user, nice, system, irq, softirq, and steal: time a
hypervisor gave to another virtual machine); this process's own CPU time comes from `os.times()`. Over an interval
on the CPUs this process may run on, (busy - own) / wall is the number of cores other processes (or other virtual
machines) took. Sampling reads one small file at most every `interval` seconds (~30 us), from the thread that runs
inference, so nothing runs in the background. Where /proc/stat is missing (macOS, Windows, some sandboxes) the
machine reads as quiet, which is ONNX Runtime's own default behaviour.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: the fields of a /proc/stat cpu line that count as busy: user nice system idle iowait irq softirq steal
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def read_busy_seconds(cpus: set[int] | None, stat: Path = Path("/proc/stat")) -> float | None:
    """Busy CPU seconds since boot, summed over `cpus` (None: all of them), or None where /proc/stat cannot be
    read."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ticks = 0
    found = False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            values = [int(v) for v in fields]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        ticks += sum(values[i] for i in _BUSY_FIELDS if i < len(values))
        found = True
    return ticks / hz if found else None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CoreContention:
    """Whether other processes are using this process's cores, with hysteresis.

    `contended()` samples at most every `interval` seconds; the answer turns True when others used at least
    `busy_at` cores over the last interval and back to False when they used less than `quiet_at`, so a short
    burst does not flip it back and forth. Thread-safe: a thread that finds another one sampling keeps the last
    answer.
    """

    def __init__(self, *, interval: float = 0.5, busy_at: float = 0.5, quiet_at: float = 0.25,
                 stat: Path = Path("/proc/stat")) -> None:
        if not 0 <= quiet_at <= busy_at:
            raise ValueError(f"expected 0 <= quiet_at <= busy_at, got {quiet_at}, {busy_at}")
        self.interval, self.busy_at, self.quiet_at, self.stat = interval, busy_at, quiet_at, stat
        try:
            self.cpus: set[int] | None = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = None
        self.others = 0.0  # cores other processes used over the last interval
        self.state = False
        self._lock = threading.Lock()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        busy = read_busy_seconds(self.cpus, self.stat)
        return None if busy is None else (time.monotonic(), busy, own_cpu_seconds())

    def contended(self) -> bool:
        if self._last is None or time.monotonic() - self._last[0] < self.interval:
            return self.state
        if not self._lock.acquire(blocking=False):
            return self.state
        try:
            now = self._read()
            if now is None or now[0] - self._last[0] < self.interval:
                return self.state
            wall = now[0] - self._last[0]
            self.others = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall)
            self._last = now
            if self.state and self.others < self.quiet_at:
                self.state = False
            elif not self.state and self.others >= self.busy_at:
                self.state = True
            return self.state
        finally:
            self._lock.release()
