"""Run the torch-free runtime on an aarch64 (ARM64) userland on an x86-64 Linux machine, under qemu-user emulation.

    sudo .venv/bin/python -m edgepix.benchmarks.aarch64_run [--root DIR] [--frames N] [--skip-tests]

1. Host tools: Debian's qemu-user-static, binfmt-support and debootstrap (installed with apt-get when missing),
   and binfmt_misc registered for aarch64 ELF files, so that every aarch64 program, the test suite's
   `python -m edgepix` subprocesses included, runs through qemu.
2. A Debian arm64 userland (minbase + python3) made with `debootstrap --foreign` and finished with its second
   stage inside the chroot, under emulation. It lives in `--root` (default $EDGEPIX_AARCH64_ROOT or
   /var/cache/edgepix-aarch64), never in the repository, and is reused by later runs.
3. aarch64 wheels from PyPI of numpy, opencv-python-headless and onnxruntime (the versions this machine's
   environment has, where it has them) and pytest, installed into the userland's site-packages by the host's pip
   (`--platform ... --only-binary=:all: --target`), and this repository installed editable there (no
   dependencies), so the emulated Python imports the working tree.
4. Under emulation, in a chroot with the repository mounted at its own path: `edgepix doctor`; the test files
   that import nothing of the train extra at module level (tests of them that reach `import torch` are reported
   as skipped by `edgepix.benchmarks.aarch64_pytest`; the few with wall-clock deadlines sized for a native CPU,
   `SPEED_BOUND_TESTS`, are deselected; failures caused only by emulation are rerun on the host, natively, to show
   they pass there); `edgepix segment` of a synthetic video with a
   segmentation model trained and exported here, on the host (INT8 with the class map in the graph, as in
   `make demo`); and the class maps the FP32 and INT8 models give on the same scenes, compared with the host's.
5. A report (`report.json` in `--root`) with each step's wall time; the same segment run natively on the host
   gives the emulation's slowdown. Emulated speed says nothing about a real ARM CPU: this is a correctness run.

/sys is not mounted in the chroot: under qemu-user an aarch64 process reads the x86 host's /proc/cpuinfo, and
ONNX Runtime's bundled cpuinfo library crashes (SIGSEGV) when it then also finds the host's CPU lists in /sys;
without them it logs that it cannot read them and runs with its defaults.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("EDGEPIX_AARCH64_ROOT", "/var/cache/edgepix-aarch64"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
                 "debootstrap": "debootstrap"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
WORK = "/srv/edgepix-aarch64"  # inside the userland: model, video, outputs
# Distribution name on PyPI -> the distributions in this environment whose version it should match.
WHEELS = {"numpy": ("numpy",), "onnxruntime": ("onnxruntime",),
          "opencv-python-headless": ("opencv-python-headless", "opencv-python")}
TEST_WHEELS = ("pytest", "pytest-timeout")
# Builds the small ONNX models many runtime tests make in their fixtures; the runtime itself never imports it.
TEST_MODEL_WHEELS = {"onnx": ("onnx",)}
# Module-level imports that put a test file outside the runtime-only install.
TRAIN_EXTRA_IMPORTS = ("torch", "torchvision", "onnx", "onnxscript", "onnxslim", "transformers", "safetensors",
                       "edgepix.train", "edgepix.export")
# Runs a command in the userland: /proc, /dev and the repository (at its own path) mounted, no /sys (see the module
# docstring), a clean environment. Run inside `unshare --mount`, so the mounts end with it.
MOUNT_AND_CHROOT = (
    'set -e; root=$0 repo=$1 cwd=$2; shift 2; mount -t proc proc "$root/proc"; mount --bind /dev "$root/dev"; '
    'mkdir -p "$root$repo"; mount --bind "$repo" "$root$repo"; '
    'exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin '
    'HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 /bin/sh -c \'cd "$0" && exec "$@"\' "$cwd" "$@"'
)


class RunError(RuntimeError):
    """A step of the emulated run failed; the message says which and why."""


# ---- can it run here -------------------------------------------------------------------------------------------


def emulated() -> bool:
    """True where aarch64 programs need qemu (any host but an ARM64 one)."""
    return platform.machine().lower() not in ("aarch64", "arm64")


def cannot_run_reason() -> str | None:
    """Why the emulated run cannot happen on this machine, in one line; None when it can."""
    if sys.platform != "linux":
        return f"needs Linux (chroot, binfmt_misc); this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot and mounts); run it with sudo"
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"needs {' '.join(missing)} and there is no apt-get to install them"
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / coreutils)"
    if emulated() and not BINFMT.is_dir():
        return "the kernel has no binfmt_misc (/proc/sys/fs/binfmt_misc), so aarch64 programs cannot be run"
    return None


# ---- host tools and binfmt ---------------------------------------------------------------------------------------


def run(argv: list[str], *, timeout: float = 1800, what: str = "") -> subprocess.CompletedProcess:
    """Run a host command; a failure raises RunError with the command and the end of its output."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # apt-get and debootstrap never ask
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        raise RunError(f"{what or argv[0]} failed (exit {r.returncode}): {' '.join(argv)}\n" + "\n".join(tail))
    return r


def install_host_tools() -> list[str]:
    """apt-get install the missing host tools (one `apt-get update` first); returns the packages installed."""
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None})
    if missing:
        run(["apt-get", "update", "-qq"], what="apt-get update")
        run(["apt-get", "install", "-y", "-qq", *missing], what="apt-get install")
    return missing


def enable_binfmt() -> str:
    """Mount binfmt_misc when it is not, and register qemu for aarch64 ELF files; returns the registration."""
    if not (BINFMT / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], what="mounting binfmt_misc")
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"], what="registering qemu-aarch64 with binfmt_misc")
    text = entry.read_text()
    if not text.startswith("enabled"):
        raise RunError(f"binfmt_misc has qemu-aarch64 but it is disabled: update-binfmts --enable qemu-aarch64\n{text}")
    return text


def binfmt_interpreter(registration: str) -> tuple[str, bool]:
    """The interpreter path of a binfmt_misc entry and whether the kernel keeps it open (flag F)."""
    fields = dict(line.split(" ", 1) for line in registration.splitlines() if " " in line)
    return fields["interpreter"].strip(), "F" in fields.get("flags:", "")


# ---- the userland ----------------------------------------------------------------------------------------------


def build_rootfs(rootfs: Path, registration: str | None) -> bool:
    """Make the Debian arm64 userland unless it is there already; False when it was reused.

    It is built in `<rootfs>.partial` and renamed when complete, so an interrupted build is never taken for one."""
    if (rootfs / "usr/bin/python3").exists():
        return False
    partial = rootfs.with_name(rootfs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    foreign = ["--foreign"] if emulated() else []
    run(["debootstrap", "--arch=arm64", *foreign, "--variant=minbase", "--include=python3", SUITE, str(partial),
         MIRROR], what="debootstrap (first stage)")
    if emulated():
        interpreter, kept_open = binfmt_interpreter(registration or "")
        if not kept_open:  # the kernel opens the interpreter inside the chroot: it must exist there
            inside = partial / interpreter.lstrip("/")
            inside.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(interpreter), inside)
        run(["chroot", str(partial), "/debootstrap/debootstrap", "--second-stage"],
            what="debootstrap (second stage, emulated)")
    partial.rename(rootfs)
    return True


def chroot_command(rootfs: Path, argv: list[str], *, cwd: str = WORK) -> list[str]:
    """The host command that runs `argv` in the userland, in a private mount namespace (the mounts go with it)."""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", MOUNT_AND_CHROOT,
            str(rootfs), str(REPO), cwd, *argv]


def in_userland(rootfs: Path, argv: list[str], *, timeout: float,
                cwd: str = WORK) -> tuple[subprocess.CompletedProcess, float]:
    """Run `argv` in the userland; (the finished process, its wall time in seconds)."""
    start = time.perf_counter()
    r = subprocess.run(chroot_command(rootfs, argv, cwd=cwd), capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - start


def userland_python(rootfs: Path) -> tuple[str, str]:
    """The userland's Python version ("3.11") and glibc version ("2.36")."""
    r = run(["chroot", str(rootfs), "/usr/bin/python3", "-c",
             "import sys, platform; print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.libc_ver()[1])"],
            what="the userland's python3")
    python, glibc = r.stdout.split()
    return python, glibc


def host_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def wheel_requirements(*, with_onnx: bool) -> list[str]:
    """numpy, OpenCV and ONNX Runtime (and onnx, for test models) at this environment's versions (the latest where
    it has none), and pytest."""
    pinned = []
    for name, here in {**WHEELS, **(TEST_MODEL_WHEELS if with_onnx else {})}.items():
        version = host_version(here)
        pinned.append(f"{name}=={version}" if version else name)
    return pinned + list(TEST_WHEELS)


def install_wheels(rootfs: Path, python: str, glibc: str, *, with_onnx: bool) -> dict[str, str]:
    """Install the aarch64 wheels and this repository (editable) into the userland's site-packages."""
    site = rootfs / f"usr/local/lib/python{python}/dist-packages"
    minor = int(glibc.split(".")[1])  # manylinux_2_N wheels need glibc 2.N or newer
    platforms = ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, minor + 1)]
    target = [f"--python-version={python}", "--implementation=cp", f"--abi=cp{python.replace('.', '')}",
              "--only-binary=:all:", *(f"--platform={p}" for p in platforms)]
    requirements = wheel_requirements(with_onnx=with_onnx)
    wanted = "\n".join(requirements)
    stamp = site / ".edgepix-wheels"
    if not (stamp.exists() and stamp.read_text() == wanted):
        # A fresh folder each time: --target never removes what an earlier install put there (onnx, say).
        shutil.rmtree(site, ignore_errors=True)
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--target", str(site),
             *target, *requirements], what="pip install of the aarch64 wheels")
        stamp.write_text(wanted)
    # The editable install maps edgepix.runtime to REPO/runtime etc.; the repository is mounted at the same path.
    run([sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--no-deps", "--no-build-isolation",
         "--no-warn-conflicts", "--target", str(site), "-e", str(REPO)],
        what="editable install of edgepix into the userland")
    versions = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        versions[name.lower().replace("_", "-")] = version
    names = [*WHEELS, *(TEST_MODEL_WHEELS if with_onnx else ()), *TEST_WHEELS, "edgepix"]
    return {name: versions.get(name, "absent") for name in names}


# ---- which tests need only the runtime --------------------------------------------------------------------------


def _module_level_imports(path: Path) -> set[str]:
    """Modules a test file imports when it is collected: top-level imports (inside top-level `if`/`try` too) and
    `pytest.importorskip("name")` calls at module level."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, (ast.If, ast.Try)):
            pending.extend([*node.body, *node.orelse, *getattr(node, "finalbody", [])])
            pending.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
        elif isinstance(node, (ast.Expr, ast.Assign)):
            for call in ast.walk(node.value):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "importorskip" and call.args
                        and isinstance(call.args[0], ast.Constant)):
                    found.add(str(call.args[0].value))
    return found


def runtime_only_test_files(tests: Path, *, installed: tuple[str, ...] = ()) -> tuple[list[Path], dict[str, str]]:
    """(test files that collect without the train extra, {left-out file: why}). A file is left out when it, or a
    helper module of the test folder it imports, imports torch, onnx, edgepix.train or edgepix.export at module
    level; `installed` names those the userland has all the same (onnx, for the tests' models)."""
    local = {p.stem: p for p in tests.glob("*.py")}
    imports = {name: _module_level_imports(path) for name, path in local.items()}
    absent = [name for name in TRAIN_EXTRA_IMPORTS if name not in installed]

    def needs(name: str, seen: frozenset[str]) -> str | None:
        for module in sorted(imports[name]):
            if any(module == extra or module.startswith(extra + ".") for extra in absent):
                return module
            if module in local and module not in seen:
                why = needs(module, seen | {module})
                if why:
                    return f"{why} (through {module}.py)"
        return None

    selected, left_out = [], {}
    for name in sorted(n for n in local if n.startswith("test_")):
        why = needs(name, frozenset({name}))
        if why:
            left_out[f"{name}.py"] = f"imports {why}"
        else:
            selected.append(local[name])
    return selected, left_out


# ---- the test run and its report ---------------------------------------------------------------------------------

# ONNX Runtime's bundled cpuinfo library prints this (and eight more lines) to stderr in every process it starts in
# under qemu-user: /proc/cpuinfo is the x86 host's and /sys is not mounted (see the module docstring). Tests that
# count a command's stderr lines then fail under emulation only; they are rerun on the host to show it.
EMULATION_NOISE = "Error in cpuinfo:"
# Tests with wall-clock deadlines sized for a native CPU; emulation runs the pipeline tens of times slower.
SPEED_BOUND_TESTS = {
    "tests/test_stream_reliability.py::test_sixty_silent_connections_do_not_starve_a_viewer_or_the_statistics":
        "compares a viewer's frame rate before and during 60 bad connections within seconds",
    "tests/test_stream_sinks.py::test_slow_and_vanishing_clients_never_hold_up_the_pipeline":
        "expects 150 frames of 640x480 through the pipeline within 30 s",
}


@dataclass
class TestOutcome:
    passed: int = 0
    failed: list[dict] = field(default_factory=list)  # {"id", "message", "emulation_only", "passes_on_host"}
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> tests
    files: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # test file -> why it was not run
    deselected: dict[str, str] = field(default_factory=dict)  # test id -> why it was not run
    wall_s: float = 0.0

    @property
    def skipped_train_extra(self) -> int:
        return sum(n for reason, n in self.skipped.items() if "needs the train extra" in reason)


def _node_id(classname: str, name: str) -> str:
    """pytest's node id from a JUnit classname ("tests.test_x" or "tests.test_x.TestY") and test name."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (REPO / path).exists():
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def read_junit(path: Path) -> TestOutcome:
    """Counts, skip reasons and failures from a pytest --junitxml file."""
    outcome = TestOutcome()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        node = _node_id(case.get("classname", ""), case.get("name", ""))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            text = (bad.get("message") or "") + "\n" + (bad.text or "")
            outcome.failed.append({"id": node, "message": (bad.get("message") or "").splitlines()[0][:300],
                                   "emulation_only": EMULATION_NOISE in text, "passes_on_host": None})
        elif skipped is not None:
            reason = re.sub(r"^Skipped: ", "", skipped.get("message") or "")
            outcome.skipped[reason] = outcome.skipped.get(reason, 0) + 1
        else:
            outcome.passed += 1
    return outcome


def run_tests(rootfs: Path, *, with_onnx: bool, timeout: float) -> TestOutcome:
    """The runtime-only test files under emulation; failures caused only by emulation are rerun on the host."""
    files, left_out = runtime_only_test_files(REPO / "tests", installed=tuple(TEST_MODEL_WHEELS) if with_onnx else ())
    junit = f"{WORK}/pytest.xml"
    (rootfs / junit.lstrip("/")).unlink(missing_ok=True)
    r, wall = in_userland(rootfs, ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "-p", "edgepix.benchmarks.aarch64_pytest", f"--junitxml={junit}",
                                   *(f"--deselect={test}" for test in SPEED_BOUND_TESTS),
                                   *(str(f.relative_to(REPO)) for f in files)], cwd=str(REPO), timeout=timeout)
    if not (rootfs / junit.lstrip("/")).exists():
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-20:])
        raise RunError(f"pytest under emulation wrote no report:\n{tail}")
    outcome = read_junit(rootfs / junit.lstrip("/"))
    outcome.files = [f.name for f in files]
    outcome.left_out = left_out
    outcome.deselected = dict(SPEED_BOUND_TESTS)
    outcome.wall_s = wall
    suspects = [f["id"] for f in outcome.failed if f["emulation_only"]]
    if suspects:  # the same tests on the host, where ONNX Runtime is quiet
        host = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *suspects],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        passed_here = set(re.findall(r"^PASSED (\S+)", host.stdout, re.MULTILINE))
        for f in outcome.failed:
            if f["emulation_only"]:
                f["passes_on_host"] = f["id"] in passed_here
    return outcome


# ---- the model, the video and the segment run --------------------------------------------------------------------


def prepare_models(work: Path, *, video_frames: int, video_size: tuple[int, int]) -> dict[str, Path]:
    """On the host: a fastscnn trained briefly on synthetic 128x128 scenes, exported to FP32 ONNX and to INT8 with
    the class map in the graph, and a moving synthetic video. Reused when present (delete `work` to remake)."""
    from edgepix.benchmarks.stream_bound import make_video

    work.mkdir(parents=True, exist_ok=True)
    paths = {"fp32": work / "fastscnn128.onnx", "int8": work / "fastscnn128.int8.argmax.onnx",
             "video": work / f"scene_{video_size[0]}x{video_size[1]}_{video_frames}.mp4"}
    edgepix = [sys.executable, "-m", "edgepix", "-q"]
    checkpoint = work / "run" / "best.pt"
    if not checkpoint.exists():
        run([*edgepix, "train", "seg", "--data", "synthetic", "--synthetic-n", "512", "--model", "fastscnn",
             "--imgsz", "128", "--epochs", "3", "--out", str(work / "run"), "--exist-ok"], what="edgepix train seg")
    if not paths["fp32"].exists():
        run([*edgepix, "export", str(checkpoint), "--format", "onnx", "--out", str(paths["fp32"])],
            what="edgepix export (onnx)")
    if not paths["int8"].exists():
        run([*edgepix, "export", str(checkpoint), "--format", "onnx-int8", "--argmax", "--out", str(paths["int8"])],
            what="edgepix export (onnx-int8)")
    if not paths["video"].exists():
        make_video(paths["video"], frames=video_frames, size=video_size)
    return paths


def segment_command(python: str, model: str, video: str, sink: str, stats: str) -> list[str]:
    return [python, "-m", "edgepix", "segment", model, "--source", video, "--sink", sink, "--stats", stats]


def summary_of(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("segmented ")]
    return lines[-1] if lines else ""


def count_frames(video: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(video))
    n = 0
    while capture.read()[0]:
        n += 1
    capture.release()
    return n


def run_segment(rootfs: Path, paths: dict[str, Path], *, timeout: float) -> dict:
    """`edgepix segment` of the video under emulation, then the same command natively on the host."""
    inside = {name: "/" + str(p.relative_to(rootfs)) for name, p in paths.items()}
    sink, stats = f"{WORK}/segmented_aarch64.mp4", f"{WORK}/segment_stats_aarch64.json"
    for leftover in (sink, stats):
        (rootfs / leftover.lstrip("/")).unlink(missing_ok=True)
    command = segment_command("python3", inside["int8"], inside["video"], sink, stats)
    r, wall = in_userland(rootfs, command, timeout=timeout)
    result = {"command": " ".join(command), "exit": r.returncode, "wall_s": wall,
              "summary": summary_of(r.stdout + r.stderr), "video_frames": count_frames(paths["video"])}
    if r.returncode != 0:
        result["error"] = "\n".join((r.stdout + r.stderr).strip().splitlines()[-10:])
        return result
    result["frames_written"] = count_frames(rootfs / sink.lstrip("/"))
    result["stats_frames"] = json.loads((rootfs / stats.lstrip("/")).read_text())["frames"]
    host_sink, host_stats = paths["video"].with_name("segmented_host.mp4"), paths["video"].with_name("stats_host.json")
    start = time.perf_counter()
    host = subprocess.run(segment_command(sys.executable, str(paths["int8"]), str(paths["video"]), str(host_sink),
                                          str(host_stats)), capture_output=True, text=True, timeout=timeout)
    result["host_wall_s"] = time.perf_counter() - start
    result["host_summary"] = summary_of(host.stdout + host.stderr)
    return result


def write_class_maps(model: Path, out: Path, *, scenes: int = 16, size: int = 160) -> None:
    """The class maps `model` gives on fixed synthetic scenes (seeds 900000...), saved as one uint8 .npy array;
    run on both machines to compare the aarch64 kernels' answers with the x86 ones."""
    import numpy as np

    from edgepix.runtime import Segmenter
    from edgepix.runtime.data.synthetic import SceneConfig, make_scene

    config = SceneConfig(size=(size, size))
    with Segmenter.load(model, "ort-cpu") as segmenter:
        maps = [segmenter.segment(make_scene(900_000 + i, config)[0]).class_map for i in range(scenes)]
    np.save(out, np.stack(maps).astype(np.uint8))


def class_map_agreement(rootfs: Path, paths: dict[str, Path], *, timeout: float) -> dict[str, float]:
    """Share of pixels whose class is the same under emulation as on the host, per model."""
    import numpy as np

    agreement = {}
    for name in ("fp32", "int8"):
        arm, host = paths[name].with_suffix(".aarch64.npy"), paths[name].with_suffix(".host.npy")
        for stale in (arm, host):
            stale.unlink(missing_ok=True)
        inside = "/" + str(paths[name].relative_to(rootfs))
        r, _ = in_userland(rootfs, ["python3", "-m", "edgepix.benchmarks.aarch64_run", "--class-maps", inside,
                                    "/" + str(arm.relative_to(rootfs))], timeout=timeout)
        if r.returncode != 0:
            raise RunError(f"class maps under emulation failed:\n{r.stderr.strip()[-2000:]}")
        write_class_maps(paths[name], host)
        agreement[name] = float((np.load(arm) == np.load(host)).mean())
    return agreement


# ---- the whole run -----------------------------------------------------------------------------------------------

# Below these shares of equal pixels the aarch64 kernels disagree with the x86 ones beyond rounding.
AGREEMENT_FLOOR = {"fp32": 0.995, "int8": 0.99}


def host_description() -> dict[str, str]:
    from edgepix.runtime.core.cpuinfo import cpu_features, usable_cores

    qemu = shutil.which("qemu-aarch64-static")
    version = run([qemu, "--version"]).stdout.splitlines()[0] if qemu else "none (native aarch64)"
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    return {"cpu": f"{cpu_features().model}, {usable_cores()} cores ({platform.machine()})", "qemu": version,
            "load_1_5_15": " ".join(load)}


def run_everything(root: Path, args: argparse.Namespace) -> dict:
    """Every step in order; returns the report (a RunError stops the run)."""
    report: dict = {"root": str(root), "wall_s": {}, "host": host_description()}
    wall = report["wall_s"]
    start = time.perf_counter()
    report["installed_host_packages"] = install_host_tools()
    registration = enable_binfmt() if emulated() else None
    rootfs = root / "rootfs"
    t = time.perf_counter()
    report["rootfs_built_now"] = build_rootfs(rootfs, registration)
    wall["rootfs"] = time.perf_counter() - t
    python, glibc = userland_python(rootfs)
    report["userland"] = {"debian": SUITE, "python": python, "glibc": glibc}
    t = time.perf_counter()
    report["wheels"] = install_wheels(rootfs, python, glibc, with_onnx=not args.no_onnx)
    wall["wheels"] = time.perf_counter() - t
    t = time.perf_counter()
    width, height = (int(v) for v in args.size.split("x"))
    paths = prepare_models(rootfs / WORK.lstrip("/"), video_frames=args.frames, video_size=(width, height))
    wall["model_and_video_on_host"] = time.perf_counter() - t
    doctor, wall["doctor"] = in_userland(rootfs, ["python3", "-m", "edgepix", "doctor"], timeout=args.timeout)
    report["doctor"] = {"exit": doctor.returncode, "output": doctor.stdout}
    if not args.skip_tests:
        outcome = run_tests(rootfs, with_onnx=not args.no_onnx, timeout=args.timeout)
        report["tests"] = {**asdict(outcome), "skipped_train_extra": outcome.skipped_train_extra}
        wall["tests"] = outcome.wall_s
    report["segment"] = run_segment(rootfs, paths, timeout=args.timeout)
    wall["segment"] = report["segment"]["wall_s"]
    t = time.perf_counter()
    report["class_map_agreement"] = class_map_agreement(rootfs, paths, timeout=args.timeout)
    wall["class_map_agreement"] = time.perf_counter() - t
    wall["total"] = time.perf_counter() - start
    report["problems"] = problems(report)
    return report


def problems(report: dict) -> list[str]:
    """What went wrong, one line each; empty when the run passed."""
    found = []
    if report["doctor"]["exit"] != 0:
        found.append(f"edgepix doctor exited {report['doctor']['exit']}")
    for failure in report.get("tests", {}).get("failed", []):
        if not (failure["emulation_only"] and failure["passes_on_host"]):
            found.append(f"test failed under emulation: {failure['id']}: {failure['message']}")
    seg = report["segment"]
    if seg["exit"] != 0:
        found.append(f"edgepix segment exited {seg['exit']}: {seg.get('error', '')}")
    elif not (seg["frames_written"] == seg["stats_frames"] == seg["video_frames"]):
        found.append(f"edgepix segment: video has {seg['video_frames']} frames, stats say {seg['stats_frames']}, "
                     f"the output has {seg['frames_written']}")
    for name, share in report["class_map_agreement"].items():
        if share < AGREEMENT_FLOOR[name]:
            found.append(f"{name} class maps agree with the host's on {share:.4f} of pixels "
                         f"(expected >= {AGREEMENT_FLOOR[name]})")
    return found


def format_report(report: dict) -> str:
    wall = report["wall_s"]
    lines = [f"host: {report['host']['cpu']}; load {report['host']['load_1_5_15']}; {report['host']['qemu']}",
             f"userland: Debian {report['userland']['debian']} arm64, Python {report['userland']['python']}, "
             f"glibc {report['userland']['glibc']} in {report['root']}/rootfs "
             f"({'built' if report['rootfs_built_now'] else 'reused'}: {wall['rootfs']:.0f} s)",
             "wheels: " + ", ".join(f"{k} {v}" for k, v in report["wheels"].items()) + f" ({wall['wheels']:.0f} s)"]
    cpu = [line for line in report["doctor"]["output"].splitlines() if line.startswith(("platform", "cpu"))]
    lines.append(f"model and video made on the host: {wall['model_and_video_on_host']:.0f} s")
    lines += [f"doctor ({wall['doctor']:.0f} s):", *(f"  {line}" for line in cpu)]
    if "tests" in report:
        tests = report["tests"]
        emulation_only = [f for f in tests["failed"] if f["emulation_only"] and f["passes_on_host"]]
        lines.append(f"tests ({wall['tests']:.0f} s, {len(tests['files'])} files, {len(tests['left_out'])} left out "
                     f"as needing the train extra at import, {len(tests['deselected'])} speed-bound tests "
                     f"deselected): {tests['passed']} passed, {len(tests['failed'])} failed "
                     f"({len(emulation_only)} only under emulation, passing on the host), "
                     f"{sum(tests['skipped'].values())} skipped ({tests['skipped_train_extra']} need the train extra)")
        lines += [f"  failed: {f['id']}{' (emulation only)' if f in emulation_only else ''}" for f in tests["failed"]]
    seg = report["segment"]
    lines.append(f"segment ({wall['segment']:.0f} s emulated, {seg.get('host_wall_s', 0):.1f} s on the host): "
                 f"{seg['summary']}")
    lines.append("class maps equal to the host's: " + ", ".join(
        f"{name} {share:.4f}" for name, share in report["class_map_agreement"].items()))
    lines.append(f"total {wall['total']:.0f} s; " + ("OK" if not report["problems"] else
                                                      "PROBLEMS:\n  " + "\n  ".join(report["problems"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepix.benchmarks.aarch64_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                   help="folder for the userland, its wheels and the report, outside the repository "
                        "(default $EDGEPIX_AARCH64_ROOT or /var/cache/edgepix-aarch64)")
    p.add_argument("--frames", type=int, default=90, help="frames in the segmented video (default 90)")
    p.add_argument("--size", default="320x240", help="the video's WxH (default 320x240)")
    p.add_argument("--skip-tests", action="store_true", help="only doctor, segment and the class-map comparison")
    p.add_argument("--no-onnx", action="store_true",
                   help="leave the onnx package out of the userland: the tests that build their models with it "
                        "are then skipped as needing the train extra")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each emulated step")
    p.add_argument("--class-maps", nargs=2, type=Path, metavar=("MODEL", "OUT"),
                   help="(used by the run itself) write MODEL's class maps on the comparison scenes to OUT.npy")
    args = p.parse_args(argv)
    if args.class_maps:
        write_class_maps(*args.class_maps)
        return 0
    reason = cannot_run_reason()
    if reason:
        print(f"aarch64 run: cannot run here: {reason}", file=sys.stderr)
        return 1
    root = args.root.resolve()
    if root == REPO or REPO in root.parents:
        p.error(f"--root {root} is inside the repository; give a folder outside it")
    from edgepix.runtime.core.fileio import atomic_write_text

    try:
        report = run_everything(root, args)
    except (RunError, subprocess.TimeoutExpired) as e:
        print(f"aarch64 run: {e}", file=sys.stderr)
        return 1
    atomic_write_text(root / "report.json", json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"report: {root / 'report.json'}")
    return 0 if not report["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
