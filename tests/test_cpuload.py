"""The cores a process may use (affinity, cgroup quota) and whether other processes are using them
(runtime.core.cpuload), and the ONNX Runtime CPU backend's spin-wait that follows the load."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from edgepix.runtime.core import cpuinfo, cpuload
from edgepix.runtime.core.cpuload import CoreContention, read_busy_seconds

STAT = """cpu  1000 0 500 9000 10 0 0 0 0 0
cpu0 600 0 300 4000 5 0 0 0 0 0
cpu1 400 0 200 5000 5 0 0 20 0 0
intr 12345
"""


def test_busy_seconds_sum_the_busy_fields_of_the_cpus_asked_for(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    hz = cpuload.os.sysconf("SC_CLK_TCK")
    assert read_busy_seconds({0}, stat) == pytest.approx(900 / hz)  # user + system; idle and iowait are not busy
    assert read_busy_seconds({1}, stat) == pytest.approx(620 / hz)  # steal counts: another VM had the core
    assert read_busy_seconds(None, stat) == pytest.approx(1520 / hz)
    assert read_busy_seconds({7}, stat) is None
    assert read_busy_seconds(None, tmp_path / "missing") is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_contention_turns_on_and_off_with_hysteresis(tmp_path, monkeypatch):
    clock, own = FakeClock(), [0.0]
    monkeypatch.setattr(cpuload, "time", clock)
    monkeypatch.setattr(cpuload, "own_cpu_seconds", lambda: own[0])
    hz = cpuload.os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    busy = [0.0]

    def write() -> None:
        ticks = round(busy[0] * hz)
        stat.write_text(f"cpu  {ticks} 0 0 0 0 0 0 0\ncpu0 {ticks} 0 0 0 0 0 0 0\n")

    write()
    c = CoreContention(interval=1.0, busy_at=0.5, quiet_at=0.25, stat=stat)
    c.cpus = {0}

    def after(seconds: float, others: float, mine: float) -> bool:
        clock.now += seconds
        busy[0] += (others + mine) * seconds
        own[0] += mine * seconds
        write()
        return c.contended()

    assert after(1.0, others=0.1, mine=0.9) is False
    assert c.others == pytest.approx(0.1, abs=0.02)
    assert after(0.5, others=0.9, mine=0.1) is False  # not due yet: the last answer stands
    assert after(0.6, others=0.9, mine=0.1) is True  # over the 1.1 s since the last sample: 0.9 cores taken
    assert after(1.0, others=0.3, mine=0.7) is True  # between quiet_at and busy_at: stays on
    assert after(1.0, others=0.1, mine=0.9) is False
    assert after(1.0, others=0.4, mine=0.6) is False  # between the two: stays off


def test_a_process_keeping_a_core_busy_is_seen(tmp_path):
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        c = CoreContention(interval=0.3)
        time.sleep(0.5)  # the burner is running; this process sleeps
        assert c.contended() is True
        assert c.others >= 0.5
    finally:
        burner.kill()
        burner.wait()


def test_without_proc_stat_the_machine_reads_as_quiet(tmp_path):
    c = CoreContention(interval=0.0, stat=tmp_path / "missing")
    assert c.contended() is False and c.others == 0.0


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({}, None),
])
def test_cgroup_v2_quota(tmp_path, files, expected):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    (tmp_path / "fs" / "job").mkdir(parents=True)
    for name, text in files.items():
        (tmp_path / "fs" / "job" / name).write_text(text)
    assert cpuinfo.cgroup_cpu_quota(tmp_path / "fs", proc) == expected


def test_cgroup_v1_quota_read_at_the_mount_root_inside_a_container(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    root = tmp_path / "fs" / "cpu,cpuacct"  # the container sees its own cgroup at the mount's root
    root.mkdir(parents=True)
    (root / "cpu.cfs_quota_us").write_text("50000\n")
    (root / "cpu.cfs_period_us").write_text("100000\n")
    assert cpuinfo.cgroup_cpu_quota(tmp_path / "fs", proc) == 0.5
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpuinfo.cgroup_cpu_quota(tmp_path / "fs", proc) is None


def test_usable_cores_take_the_quota_rounded_up(monkeypatch):
    affinity = len(cpuinfo.os.sched_getaffinity(0))
    monkeypatch.setattr(cpuinfo, "cgroup_cpu_quota", lambda: 0.5)
    assert cpuinfo.usable_cores() == 1
    monkeypatch.setattr(cpuinfo, "cgroup_cpu_quota", lambda: 1000.0)
    assert cpuinfo.usable_cores() == affinity


def test_ort_cpu_runs_without_spin_wait_on_the_cores_left_while_they_are_contended(seg_onnx):
    from edgepix.runtime.backends.registry import load_backend

    def setting(session, key: str) -> str:
        return session.get_session_options().get_session_config_entry(key)

    b = load_backend(seg_onnx, "ort-cpu", threads=2)
    try:
        assert "adapting to the load" in b.description
        x = np.random.default_rng(0).random(tuple(d or 64 for d in b.inputs[0].shape), dtype=np.float32)
        quiet = b.infer({b.inputs[0].name: x})
        assert b._contended_session is None and setting(b.session_for_now(), "session.intra_op.allow_spinning") == "1"
        # as if another process kept one core busy (frozen there: no more sampling)
        b._contention.state, b._contention.others, b._contention._last = True, 0.9, None
        busy_session = b.session_for_now()
        assert busy_session is not b.session
        assert setting(busy_session, "session.intra_op.allow_spinning") == "0"
        assert busy_session.get_session_options().intra_op_num_threads == 1 == b._contended_threads
        busy = b.infer({b.inputs[0].name: x})
        for name in quiet:
            np.testing.assert_array_equal(quiet[name], busy[name])
        b._contention.state = False
        assert b.session_for_now() is b.session
    finally:
        b.close()
    fixed = load_backend(seg_onnx, "ort-cpu", adapt_to_load=False)
    try:
        assert fixed._contention is None and "adapting" not in fixed.description
    finally:
        fixed.close()


def test_spin_wait_must_be_a_bool(seg_onnx):
    from edgepix.runtime.backends.registry import load_backend
    from edgepix.runtime.core.errors import EdgepixError

    with pytest.raises(EdgepixError, match="option spin_wait: expected true or false"):
        load_backend(seg_onnx, "ort-cpu", spin_wait="yes")
