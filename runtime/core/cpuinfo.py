"""The CPU's instruction sets that decide INT8 and FP16 speed, read once, torch-free.

Also the one place that says how many cores this process may use (`usable_cores`).

The same INT8 file runs 1.5x faster than FP32 on one CPU and barely faster on another: ONNX Runtime's and
OpenVINO's integer kernels are fast only where the CPU has an int8 dot-product instruction, VNNI (AVX-512 VNNI or
AVX-VNNI) or AMX on x86, the dot-product extension (`asimddp`) on ARM. Without it, U8S8 multiplies widen to 16
bits and the gain over FP32 mostly disappears. FP16 arithmetic on the CPU needs AVX-512-FP16 (x86) or
`fphp`/`asimdhp` (ARM); elsewhere FP16 files are converted back to FP32 as they run.

Linux (and so every Jetson and Raspberry Pi) names the features in /proc/cpuinfo ("flags" on x86, "Features" on
ARM). Only the line of this process's own architecture counts: an aarch64 process emulated on an x86 host (qemu-user,
as in benchmarks/aarch64_run.py) reads the host's /proc/cpuinfo, whose x86 "flags" say nothing about the ARM CPU it
runs on. A 64-bit ARM process without a "Features" line reads the kernel's (or the emulator's) hardware-capability
bits instead, getauxval(AT_HWCAP/AT_HWCAP2), from which Linux prints that line. Elsewhere numpy's own CPU detection
is the fallback; it does not know AVX-VNNI or AMX, which then read as unknown rather than absent. `edgepix doctor`,
`edgepix export --format onnx-int8` and the benchmark reports use this module.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# (label shown to users, Linux flag names; any one present means the feature is there)
X86_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AVX2", ("avx2",)),
    ("AVX-512", ("avx512f",)),
    ("AVX-512-VNNI", ("avx512_vnni",)),
    ("AVX-VNNI", ("avx_vnni",)),
    ("AMX-INT8", ("amx_int8",)),
    ("AVX-512-BF16", ("avx512_bf16",)),
    ("AVX-512-FP16", ("avx512_fp16",)),
)
ARM_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NEON", ("asimd", "neon")),  # "asimd" on 64-bit kernels, "neon" on 32-bit ones
    ("dot-product", ("asimddp",)),
    ("I8MM", ("i8mm",)),  # int8 matrix multiply (Armv8.6)
    ("FP16-arithmetic", ("fphp", "asimdhp")),
    ("SVE", ("sve",)),
)

# The Linux name of each aarch64 hardware-capability bit edgepix reports (arch/arm64/include/uapi/asm/hwcap.h):
# (auxv entry, bit, flag). AT_HWCAP is 16 and AT_HWCAP2 26 in <elf.h>.
AT_HWCAP, AT_HWCAP2 = 16, 26
_AARCH64_HWCAPS = (
    (AT_HWCAP, 1, "asimd"), (AT_HWCAP, 9, "fphp"), (AT_HWCAP, 10, "asimdhp"), (AT_HWCAP, 20, "asimddp"),
    (AT_HWCAP, 22, "sve"), (AT_HWCAP2, 13, "i8mm"),
)

# numpy's names (numpy._core._multiarray_umath.__cpu_features__) -> the Linux flag they stand for.
_NUMPY_NAMES = {
    "AVX2": "avx2", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16",
    "AVX512FP16": "avx512_fp16", "ASIMD": "asimd", "NEON": "neon", "ASIMDDP": "asimddp", "ASIMDHP": "asimdhp",
    "FPHP": "fphp", "SVE": "sve",
}


def _family(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if machine.startswith(("aarch64", "arm")):
        return "arm"
    return "other"


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers. `known` holds the flags the source can tell about at all (present or absent)."""

    machine: str  # platform.machine(): x86_64, aarch64, ...
    model: str
    flags: frozenset[str]
    known: frozenset[str]
    source: str  # "/proc/cpuinfo", "getauxval(AT_HWCAP)", "numpy", or "none"
    # The family /proc/cpuinfo describes when it is not this process's own: the process runs under emulation.
    cpuinfo_family: str = ""

    @property
    def family(self) -> str:
        return _family(self.machine)

    def has(self, *names: str) -> bool | None:
        """True when any of the flags is present, False when the source says all are absent, None when unknown."""
        if any(n in self.flags for n in names):
            return True
        if all(n in self.known for n in names):
            return False
        return None

    def features(self) -> list[tuple[str, bool | None]]:
        """(label, present) for the instruction sets that matter on this CPU family."""
        table = X86_FEATURES if self.family == "x86" else ARM_FEATURES if self.family == "arm" else ()
        return [(label, self.has(*flags)) for label, flags in table]

    @property
    def fast_int8(self) -> bool | None:
        """Whether INT8 convolutions have a fast path here: VNNI or AMX on x86, dot-product on ARM."""
        if self.family == "x86":
            answers = [self.has("avx512_vnni"), self.has("avx_vnni"), self.has("amx_int8")]
        elif self.family == "arm":
            answers = [self.has("asimddp"), self.has("i8mm")]
        else:
            return None
        if any(a is True for a in answers):
            return True
        return False if all(a is False for a in answers) else None

    @property
    def fp16_arithmetic(self) -> bool | None:
        if self.family == "x86":
            return self.has("avx512_fp16")
        if self.family == "arm":
            return self.has("fphp", "asimdhp")
        return None

    def describe(self) -> str:
        """One line, e.g. 'AVX2 yes, AVX-512 yes, AVX-512 VNNI yes, ... (from /proc/cpuinfo)'."""
        parts = [f"{label} {_word(present)}" for label, present in self.features()]
        if not parts:
            return f"no instruction-set report for {self.machine} CPUs"
        line = ", ".join(parts) + f" (from {self.source})"
        if self.emulated:
            line += (f"; /proc/cpuinfo describes an {self.cpuinfo_family} CPU: this {self.machine} process runs "
                     "under emulation, so its speed says nothing about a real device")
        return line

    @property
    def emulated(self) -> bool:
        """True when /proc/cpuinfo describes another CPU family than the one this process is built for."""
        return bool(self.cpuinfo_family) and self.cpuinfo_family != self.family

    def int8_advice(self) -> str:
        """What INT8 can be expected to do here, in one sentence."""
        if self.fast_int8 is True:
            fast = ("AVX-512-VNNI", "AVX-VNNI", "AMX-INT8", "dot-product", "I8MM")
            present = [label for label, there in self.features() if there and label in fast]
            return f"INT8 has a fast path here ({', '.join(present)})"
        if self.fast_int8 is None:
            return "whether INT8 has a fast path here is unknown (instruction sets not readable)"
        if self.family == "x86":
            return ("no VNNI or AMX: INT8 (U8S8) runs on AVX2 integer kernels and gains little over FP32 here, or "
                    "loses (a 512x512 Fast-SCNN ran at 0.81x its FP32 speed on an AVX2-only AMD EPYC); ship the "
                    "FP32 file unless python -m edgepix.benchmarks.int8_matrix shows otherwise")
        return ("no dot-product instructions (asimddp): INT8 gains little over FP32 here; measure with "
                "python -m edgepix.benchmarks.int8_matrix")


def _word(present: bool | None) -> str:
    return "yes" if present is True else "no" if present is False else "unknown"


# The /proc/cpuinfo key that lists a CPU's features -> the family whose features it lists.
_CPUINFO_FLAG_KEYS = {"flags": "x86", "features": "arm"}


def parse_proc_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """Read /proc/cpuinfo text: the first processor's flags (x86 "flags", ARM "Features") and model name.

    Only the key of `machine`'s family is read. When the text carries the other family's key instead (an aarch64
    process emulated on an x86 host sees the host's "flags"), nothing is known, and `cpuinfo_family` names the
    family the text describes."""
    family = _family(machine)
    flags: set[str] = set()
    model = ""
    described = ""  # the family of the first feature list in the text
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in _CPUINFO_FLAG_KEYS:
            described = described or _CPUINFO_FLAG_KEYS[key]
            if _CPUINFO_FLAG_KEYS[key] == family and not flags:
                flags = set(value.split())
        elif key in ("model name", "hardware", "processor") and not model and not value.strip().isdigit():
            model = value.strip()
    if described and described != family:
        model = ""  # the model name is the other CPU's
    table = X86_FEATURES if family == "x86" else ARM_FEATURES if family == "arm" else ()
    # Linux lists every feature the kernel knows that the CPU has; one it does not list is absent. Without a
    # flags line at all (some containers), nothing is known.
    known = {name for _, names in table for name in names} if flags else set()
    return CpuFeatures(machine=machine, model=model or platform.processor() or machine, flags=frozenset(flags),
                       known=frozenset(known), source="/proc/cpuinfo", cpuinfo_family=described)


def read_hwcaps() -> dict[int, int] | None:
    """This process's AT_HWCAP and AT_HWCAP2 words from getauxval (Linux C libraries); None where there is none.

    An entry the kernel (or emulator) did not pass is left out, so a zero word means "none of these features"."""
    try:
        getauxval = ctypes.CDLL(None, use_errno=True).getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    words = {}
    for entry in (AT_HWCAP, AT_HWCAP2):
        ctypes.set_errno(0)
        value = getauxval(entry)
        if value or ctypes.get_errno() != errno.ENOENT:
            words[entry] = value
    return words or None


def features_from_hwcaps(words: dict[int, int], machine: str, *, cpuinfo_family: str = "") -> CpuFeatures:
    """An aarch64 CPU's features from its AT_HWCAP/AT_HWCAP2 words (the bits Linux prints as "Features")."""
    flags = {flag for entry, bit, flag in _AARCH64_HWCAPS if words.get(entry, 0) >> bit & 1}
    known = {flag for entry, _, flag in _AARCH64_HWCAPS if entry in words}
    if "asimd" in known:
        known.add("neon")  # 64-bit kernels call NEON "asimd" and never list "neon"
    return CpuFeatures(machine=machine, model=platform.processor() or machine, flags=frozenset(flags),
                       known=frozenset(known), source="getauxval(AT_HWCAP)", cpuinfo_family=cpuinfo_family)


def _from_numpy(machine: str) -> CpuFeatures:
    try:  # numpy's detection is an internal table; treat its absence as "nothing known"
        from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as numpy_features
        except ImportError:
            numpy_features = {}
    flags = {flag for name, flag in _NUMPY_NAMES.items() if numpy_features.get(name)}
    known = {flag for name, flag in _NUMPY_NAMES.items() if name in numpy_features}
    return CpuFeatures(machine=machine, model=platform.processor() or machine, flags=frozenset(flags),
                       known=frozenset(known), source="numpy" if numpy_features else "none")


def _read_proc_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux, or /proc not mounted
        return None


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (read once per process)."""
    machine = platform.machine() or "unknown"
    text = _read_proc_cpuinfo()
    found = parse_proc_cpuinfo(text, machine) if text is not None else None
    if found is not None and found.known:
        return found
    cpuinfo_family = found.cpuinfo_family if found is not None else ""
    if machine.lower() in ("aarch64", "arm64"):
        words = read_hwcaps()
        if words is not None:
            return features_from_hwcaps(words, machine, cpuinfo_family=cpuinfo_family)
    fallback = _from_numpy(machine)
    return dataclasses.replace(fallback, cpuinfo_family=cpuinfo_family) if cpuinfo_family else fallback


@functools.lru_cache(maxsize=1)
def warn_if_int8_is_slow_here() -> bool:
    """Log one warning (once per process) when this CPU has no fast INT8 path; True when it warned."""
    features = cpu_features()
    if features.fast_int8 is False:
        log.warning("this CPU (%s) has %s", features.model, features.int8_advice())
        return True
    return False


def usable_cores() -> int:
    """The cores this process may use: its affinity mask (a `taskset` or cpuset limit) and, tighter where set, the
    CPU quota of its cgroup (a container's `--cpus`, a Kubernetes limit), rounded up to whole cores. The machine's
    total counts only where neither is set: sizing thread pools by it oversubscribes a container (a 2-core quota
    on a 64-core host gives ONNX Runtime 32 threads fighting over 2 cores)."""
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # Linux only (not macOS or Windows)
        try:
            cores = len(os.sched_getaffinity(0)) or 1
        except OSError:  # some emulators and sandboxes refuse the call
            pass
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-6)))
    return cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period), None where there is none or it cannot be
    read. cgroup v2: `cpu.max` ("max 100000" or "200000 100000"); v1: `cpu.cfs_quota_us` (-1: none) over
    `cpu.cfs_period_us`. Each is looked for in the process's own cgroup folder and at the mount's root (inside a
    container the root is the container's own cgroup)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v2_path, v1_path = None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_path = (parts[1], parts[2])
    candidates: list[tuple[Path, str]] = []
    if v2_path is not None:
        candidates += [(root / v2_path.lstrip("/"), "v2"), (root, "v2")]
    if v1_path is not None:
        for mount in (v1_path[0], "cpu", "cpu,cpuacct"):
            candidates += [(root / mount / v1_path[1].lstrip("/"), "v1"), (root / mount, "v1")]
    for folder, version in candidates:
        try:
            if version == "v2":
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                if quota == "max":
                    return None
                return int(quota) / int(period)
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            if quota_us <= 0:
                return None
            return quota_us / int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return None
