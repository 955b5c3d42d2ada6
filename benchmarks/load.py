"""Quiet or busy: the load a benchmark runs under, one mechanism for `bench --peers`, `bench stream` and the zoo.

A quiet run starts nothing besides what it measures. A busy run (`--busy`) first starts a second process that keeps
one core busy for the whole run: a pure-Python spin loop (`while True: pass`) in a child interpreter, started before
the runtimes load and warm up, and killed and reaped on every way out of the run (normal end, an error, Ctrl-C).
That is the load a small edge box sees when a camera reader, an encoder or a second model shares it, and unlike
whatever else happens to run on a shared machine it is the same on every run, so loaded numbers can be reproduced
and compared. Runtimes whose worker threads spin, or which pin one thread per core, suffer most from it.

The child starts in a session of its own, so a Ctrl-C in the terminal reaches only the benchmark, which then kills
it; and it checks every few milliseconds whether its parent is still the one that started it, so even a benchmark
killed with SIGKILL does not leave it spinning.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edgepix.runtime.core.errors import EdgepixError

MODES = ("quiet", "busy")

# The burner: tell the parent it runs, then spin in pure Python; between bursts of about ten milliseconds, stop
# once the parent is gone (re-parented: getppid changes).
_SPIN = """\
import os, sys
parent = os.getppid()
sys.stdout.write("spinning\\n")
sys.stdout.flush()
while os.getppid() == parent:
    for _ in range(200_000):
        pass
"""


@dataclass
class Load:
    """The load a run is under: `mode` quiet or busy, and for busy the burner's process."""

    mode: str
    process: subprocess.Popen | None = None
    started: float = 0.0  # time.monotonic() when the burner was running
    cpu_s: float | None = None  # the burner's CPU time, read when it stops (Linux: /proc)
    wall_s: float | None = None

    @property
    def busy(self) -> bool:
        return self.mode == "busy"

    def update(self) -> None:
        """Read the burner's CPU time so far (it keeps running)."""
        if self.process is not None and self.started:
            self.cpu_s = _cpu_seconds(self.process.pid)
            self.wall_s = time.monotonic() - self.started

    def describe(self) -> str:
        """One line for reports: quiet, or busy with how much CPU the burner took so far (`update`)."""
        if not self.busy:
            return "quiet (nothing else started by the benchmark)"
        text = "busy: one core kept busy by a pure-Python spin loop in a child process"
        if self.cpu_s is not None and self.wall_s:
            text += f", which used {self.cpu_s / self.wall_s:.2f} cores over {self.wall_s:.0f} s"
        return text

    def as_dict(self) -> dict:
        return {"mode": self.mode, "description": self.describe(), "burner_cpu_s": self.cpu_s,
                "burner_wall_s": self.wall_s}


def _cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU time from /proc (Linux); None elsewhere or when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def one_core_busy() -> Iterator[Load]:
    """Keep one core busy with a spinning child process until the block ends, however it ends."""
    process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SPIN], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    load = Load("busy", process)
    try:
        if process.stdout.readline() != b"spinning\n":  # it runs before anything is measured
            raise EdgepixError(f"--busy: the spinning child process did not start (exit status {process.wait()})")
        load.started = time.monotonic()
        yield load
    finally:
        if process.poll() is None:
            load.update()
        process.kill()
        process.wait()
        process.stdout.close()


@contextlib.contextmanager
def load_mode(mode: str) -> Iterator[Load]:
    """`quiet` (nothing started) or `busy` (`one_core_busy`) for the block."""
    if mode not in MODES:
        raise EdgepixError(f"load mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "quiet":
        yield Load("quiet")
        return
    with one_core_busy() as load:
        yield load
