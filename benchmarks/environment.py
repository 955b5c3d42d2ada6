"""The facts a benchmark number depends on: CPU, cores and threads, OS, library versions, GPU."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from edgepix.runtime.core.cpuinfo import cpu_features, usable_cores

_PACKAGES = ("numpy", "opencv-python", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "openvino",
             "torch", "tensorrt", "onnx")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return out.splitlines()[0] if out else None


def environment(*, threads: int | None = None) -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    env = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "threads": threads,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "packages": versions,
        "gpu": gpu_name(),
        # The instruction sets that decide INT8/FP16 speed: the same file is 1.5x faster in INT8 on one CPU and
        # not at all on another.
        "cpu_features": {label: present for label, present in cpu_features().features()},
        "cpu_fast_int8": cpu_features().fast_int8,
    }
    if "onnxruntime" in sys.modules:
        env["onnxruntime_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return env


def describe(env: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    gpu = env["gpu"] or "no GPU"
    threads = f", {env['threads']} threads" if env.get("threads") else ""
    isa = [label for label, present in env.get("cpu_features", {}).items() if present]
    isa_text = f", {' '.join(isa)}" if isa else ""
    return (f"{env['cpu']} ({env['cores']} cores{threads}{isa_text}), {env['os']}, Python {env['python']}, "
            f"{packages}; {gpu}")
