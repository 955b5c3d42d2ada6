"""ARM64: CPU features read right where /proc/cpuinfo describes another CPU (an emulated process), from the
kernel's hardware-capability bits; the affinity call guarded; the choice of runtime-only test files and the pytest
plugin of the emulated run; and, opt-in (EDGEPIX_AARCH64_RUN=1, several minutes), the run itself:
`python -m edgepix.benchmarks.aarch64_run` on a Debian arm64 userland under qemu-user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from edgepix.benchmarks import aarch64_run
from edgepix.benchmarks.aarch64_pytest import missing_train_module
from edgepix.runtime.core import cpuinfo
from edgepix.runtime.core.cpuinfo import AT_HWCAP, AT_HWCAP2, features_from_hwcaps, parse_proc_cpuinfo

# The first processor of an x86 host's /proc/cpuinfo, which is what an aarch64 process sees under qemu-user 7.2.
X86_HOST = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_vnni avx_vnni avx512_bf16
"""
JETSON_ORIN = """processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
"""
# AT_HWCAP words, bit by bit from arch/arm64/include/uapi/asm/hwcap.h: the Orin's Features line above (bits 0-12,
# lrcpc 15, dcpop 16, asimddp 20) and a Cortex-A72's "fp asimd evtstrm crc32 cpuid" (bits 0, 1, 2, 7, 11).
ORIN_HWCAP = 0x1FFF | 1 << 15 | 1 << 16 | 1 << 20
CORTEX_A72_HWCAP = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 7 | 1 << 11
# What qemu-aarch64 7.2's default CPU ("max") passes to a process.
QEMU_MAX = {AT_HWCAP: 0xECFFFFFB, AT_HWCAP2: 0x7F877FFF}


def test_an_emulated_aarch64_process_ignores_the_hosts_x86_flags():
    cpu = parse_proc_cpuinfo(X86_HOST, "aarch64")
    assert cpu.known == frozenset() and cpu.flags == frozenset()
    assert all(present is None for _, present in cpu.features())
    assert cpu.cpuinfo_family == "x86" and cpu.emulated and cpu.model != "AMD EPYC"
    # and the reverse: an x86 process translated on an ARM machine
    translated = parse_proc_cpuinfo(JETSON_ORIN, "x86_64")
    assert translated.known == frozenset() and translated.emulated and translated.cpuinfo_family == "arm"
    native = parse_proc_cpuinfo(JETSON_ORIN, "aarch64")
    assert not native.emulated and native.cpuinfo_family == "arm"


def test_hardware_capability_bits_give_the_same_features_as_the_features_line():
    from_bits = features_from_hwcaps({AT_HWCAP: ORIN_HWCAP, AT_HWCAP2: 0}, "aarch64")
    from_text = parse_proc_cpuinfo(JETSON_ORIN, "aarch64")
    assert from_bits.features() == from_text.features()
    assert dict(from_bits.features()) == {"NEON": True, "dot-product": True, "I8MM": False, "FP16-arithmetic": True,
                                          "SVE": False}
    assert from_bits.source == "getauxval(AT_HWCAP)" and from_bits.fast_int8 is True
    a72 = features_from_hwcaps({AT_HWCAP: CORTEX_A72_HWCAP, AT_HWCAP2: 0}, "aarch64")
    assert dict(a72.features())["NEON"] is True and a72.fast_int8 is False and a72.fp16_arithmetic is False
    # without an AT_HWCAP2 entry, I8MM is unknown rather than absent
    old_kernel = features_from_hwcaps({AT_HWCAP: ORIN_HWCAP}, "aarch64")
    assert dict(old_kernel.features())["I8MM"] is None and old_kernel.fast_int8 is True


def test_an_emulated_aarch64_process_reads_its_features_from_the_auxiliary_vector(monkeypatch):
    monkeypatch.setattr(cpuinfo.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpuinfo, "_read_proc_cpuinfo", lambda: X86_HOST)
    monkeypatch.setattr(cpuinfo, "read_hwcaps", lambda: dict(QEMU_MAX))
    cpuinfo.cpu_features.cache_clear()
    try:
        cpu = cpuinfo.cpu_features()
    finally:
        cpuinfo.cpu_features.cache_clear()
    assert dict(cpu.features()) == {"NEON": True, "dot-product": True, "I8MM": True, "FP16-arithmetic": True,
                                    "SVE": True}
    assert cpu.emulated and cpu.int8_advice() == "INT8 has a fast path here (dot-product, I8MM)"
    assert cpu.describe().startswith("NEON yes, dot-product yes, I8MM yes, FP16-arithmetic yes, SVE yes (from "
                                     "getauxval(AT_HWCAP)); /proc/cpuinfo describes an x86 CPU")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getauxval is a Linux C library function")
def test_this_process_has_hardware_capability_words():
    words = cpuinfo.read_hwcaps()
    assert words is not None and AT_HWCAP in words  # every Linux architecture passes AT_HWCAP
    if cpuinfo.platform.machine() == "aarch64":
        assert words[AT_HWCAP] >> 1 & 1  # asimd: every ARMv8-A CPU has it


def test_usable_cores_survives_a_refused_affinity_call(monkeypatch):
    def refused(pid):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(cpuinfo.os, "sched_getaffinity", refused, raising=False)
    assert cpuinfo.usable_cores() == (os.cpu_count() or 1)


def test_test_files_that_import_the_train_extra_at_module_level_are_left_out(tmp_path):
    files = {
        "helper.py": "import torch\n",
        "test_through_helper.py": "from helper import x\n",
        "test_importorskip.py": "import pytest\nonnx = pytest.importorskip('onnx')\n",
        "test_export_api.py": "try:\n    from edgepix.export.pipeline import run\nexcept ImportError:\n    pass\n",
        "test_lazy.py": "def test_x():\n    import torch\n",
        "test_runtime.py": "import numpy\nfrom edgepix.runtime.description.spec import ModelSpec\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    selected, left_out = aarch64_run.runtime_only_test_files(tmp_path)
    assert [p.name for p in selected] == ["test_lazy.py", "test_runtime.py"]
    assert left_out == {"test_export_api.py": "imports edgepix.export.pipeline",
                        "test_importorskip.py": "imports onnx",
                        "test_through_helper.py": "imports torch (through helper.py)"}
    selected_with_onnx, _ = aarch64_run.runtime_only_test_files(tmp_path, installed=("onnx",))
    assert [p.name for p in selected_with_onnx] == ["test_importorskip.py", "test_lazy.py", "test_runtime.py"]
    real_selected, real_left_out = aarch64_run.runtime_only_test_files(REPO / "tests")
    assert "test_spec.py" in {p.name for p in real_selected} and "test_export.py" in real_left_out


def test_the_plugin_skips_only_what_a_missing_train_extra_stops(tmp_path):
    assert missing_train_module(ModuleNotFoundError("No module named 'torch.nn'", name="torch.nn")) == "torch"
    assert missing_train_module(ModuleNotFoundError("No module named 'ray'", name="ray")) is None
    assert missing_train_module(ImportError("cannot import name 'x' from 'onnx'", name="onnx")) is None
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.fixture
        def model():
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

        def test_fixture_needs_onnx(model):
            pass

        def test_body_needs_torch():
            raise ModuleNotFoundError("No module named 'torch'", name="torch")

        def test_other_missing_module_fails():
            raise ModuleNotFoundError("No module named 'ray'", name="ray")

        def test_passes():
            assert 1 + 1 == 2
    """))
    junit = tmp_path / "junit.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                        "edgepix.benchmarks.aarch64_pytest", f"--junitxml={junit}", "test_sample.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    outcome = aarch64_run.read_junit(junit)
    assert outcome.passed == 1 and outcome.skipped_train_extra == 2
    assert [f["id"].rpartition("::")[2] for f in outcome.failed] == ["test_other_missing_module_fails"]
    assert outcome.failed[0]["emulation_only"] is False


def test_the_run_says_why_it_cannot_run(monkeypatch):
    reason = aarch64_run.cannot_run_reason()
    assert reason is None or (reason and "\n" not in reason)
    if sys.platform == "linux":
        monkeypatch.setattr(aarch64_run.os, "geteuid", lambda: 1000)
        assert aarch64_run.cannot_run_reason() == "needs root (debootstrap, chroot and mounts); run it with sudo"


def test_the_userland_is_never_put_in_the_repository():
    r = subprocess.run([sys.executable, "-m", "edgepix.benchmarks.aarch64_run", "--root", str(REPO / "rootfs")],
                       capture_output=True, text=True, timeout=60)
    reason = aarch64_run.cannot_run_reason()
    if reason:  # the reason comes first, in one line
        assert r.returncode == 1 and r.stderr.strip() == f"aarch64 run: cannot run here: {reason}"
    else:
        assert r.returncode == 2 and "is inside the repository" in r.stderr
    assert not (REPO / "rootfs").exists()


@pytest.mark.slow
def test_the_runtime_on_an_emulated_aarch64_userland():
    """The whole run: about 8.5 minutes on 2 busy cores the first time (the userland is built), 3 to 9 after."""
    if os.environ.get("EDGEPIX_AARCH64_RUN") != "1":
        pytest.skip("the emulated aarch64 run takes several minutes (qemu-user runs it tens of times slower than "
                    "native); set EDGEPIX_AARCH64_RUN=1 to run it here, or run sudo .venv/bin/python -m "
                    "edgepix.benchmarks.aarch64_run")
    reason = aarch64_run.cannot_run_reason()
    if reason:
        pytest.skip(f"the emulated aarch64 run cannot run here: {reason}")
    root = Path(os.environ.get("EDGEPIX_AARCH64_ROOT", aarch64_run.DEFAULT_ROOT))
    r = subprocess.run([sys.executable, "-m", "edgepix.benchmarks.aarch64_run", "--root", str(root)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    assert report["problems"] == []
    cpu = next(line for line in report["doctor"]["output"].splitlines() if line.startswith("cpu "))
    assert "NEON yes" in cpu and "dot-product yes" in cpu and "FP16-arithmetic yes" in cpu
    tests = report["tests"]
    assert tests["passed"] >= 100 and "test_spec.py" in tests["files"]
    seg = report["segment"]
    assert seg["summary"].startswith(f"segmented {seg['video_frames']} frames from 1 stream")
    assert seg["frames_written"] == seg["video_frames"]
