"""The facts a benchmark number depends on: CPU, cores and threads, OS, library versions, GPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("numpy", "opencv-python", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "torch",
             "tensorrt", "onnx")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    }
    if "onnxruntime" in sys.modules:
        env["onnxruntime_providers"] = sys.modules["onnxruntime"].get_available_providers()
    return env


def describe(env: dict) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    gpu = env["gpu"] or "no GPU"
    threads = f", {env['threads']} threads" if env.get("threads") else ""
    return f"{env['cpu']} ({env['cores']} cores{threads}), {env['os']}, Python {env['python']}, {packages}; {gpu}"
