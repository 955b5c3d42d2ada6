"""Quiet or busy (benchmarks/load.py): the spinning child process runs for the whole block and is gone after it,
however the block ends."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgepix.benchmarks.load import Load, load_mode, one_core_busy
from edgepix.runtime.core.errors import EdgepixError

REPO = Path(__file__).resolve().parents[1]


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R running, S sleeping, Z zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _stopped(pid: int, within_s: float = 20.0) -> bool:
    """Whether the process ends (gone, or a zombie) before `within_s` seconds pass."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if _state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.05)
    return False


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


@needs_proc
def test_the_spinning_process_runs_during_the_block_and_is_reaped_after_it():
    with one_core_busy() as load:
        pid = load.process.pid
        assert load.busy and load.process.poll() is None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # it spins: its CPU time grows (a shared machine may hold it back)
            load.update()
            if load.cpu_s:
                break
            time.sleep(0.05)
        assert load.cpu_s > 0
    assert load.process.returncode is not None  # killed and waited for: no zombie left behind
    assert _state(pid) is None
    assert load.describe().startswith("busy: one core kept busy by a pure-Python spin loop in a child process, "
                                      "which used ")
    assert load.as_dict()["mode"] == "busy" and load.as_dict()["burner_wall_s"] > 0


@needs_proc
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_error_or_ctrl_c_inside_the_block_stops_the_spinning_process(error):
    with pytest.raises(error):
        with load_mode("busy") as load:
            pid = load.process.pid
            raise error()
    assert load.process.returncode is not None and _state(pid) is None


@needs_proc
def test_a_killed_benchmark_leaves_no_spinning_process_behind(tmp_path):
    """SIGKILL runs no cleanup: the child notices that its parent is gone and stops by itself."""
    code = ("import os, sys\n"
            "from edgepix.benchmarks.load import one_core_busy\n"
            "with one_core_busy() as load:\n"
            "    print(load.process.pid, flush=True)\n"
            "    os._exit(9)\n")  # no finally, no atexit: as after a SIGKILL
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 9, done.stderr
    assert _stopped(int(done.stdout.strip()))


def test_quiet_starts_nothing_and_an_unknown_mode_is_refused():
    with load_mode("quiet") as load:
        assert load == Load("quiet") and not load.busy
    assert load.describe() == "quiet (nothing else started by the benchmark)"
    with pytest.raises(EdgepixError, match="load mode must be one of quiet, busy, got 'loud'"):
        with load_mode("loud"):
            pass
