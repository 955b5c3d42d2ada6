"""Measured backend choices for `auto`: what `edgepix tune MODEL` found fastest for a model on this machine.

`auto` otherwise tries the backends in a fixed order (GPU ones first, then ort-cpu, then opencv). On a CPU that
order is not always right: OpenVINO ran a Fast-SCNN file faster than ONNX Runtime on some x86 machines, ONNX
Runtime faster on others (docs/benchmarks.md). `edgepix tune` times every backend that can run the file, on the same
input and threads, and records the winner here; `load_backend(path, "auto")` then tries that backend first, only
where the measurement still holds.

The profile is one JSON file (`$EDGEPIX_PROFILE`, else `~/.cache/edgepix/profile.json`; `EDGEPIX_PROFILE=off`
disables it), written whole through the one file writer (runtime.core.fileio). Each entry records its key, what
decides the measurement (`measurement_key`): the model file's sha256; the CPU (architecture, model, instruction sets,
usable cores); the GPU's name, if any; the versions of the backends' libraries (ONNX Runtime, OpenVINO, TensorRT,
OpenCV); and the thread count it was measured at. `auto` uses an entry only when its key equals this machine's now,
at the threads asked for (`threads=`, `--threads`; else the usable cores, `tune`'s default): a copied profile, a
changed model, a new CPU or GPU or a library upgrade never applies a measurement made under other conditions. When
the file has entries for the model but none matches, `auto` keeps its fixed order and says once per model, in one
line, what changed and to run `edgepix tune` again.

Bounded: at most MAX_ENTRIES entries, kept in the file oldest first; recording a new one drops the oldest beyond
the cap (re-measuring under the same key replaces the entry and makes it the newest). A damaged profile, or one an
older edgepix wrote, is ignored with a warning, never fatal, and the next `tune` rewrites it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..core.boundedjson import loads
from ..core.cpuinfo import cpu_features, usable_cores
from ..core.errors import InputError, SpecError
from ..core.fileio import atomic_write_text

log = logging.getLogger(__name__)

PROFILE_ENV = "EDGEPIX_PROFILE"
FORMAT = 2  # 1: keyed on the CPU only (no GPU, library versions or threads)
MAX_ENTRIES = 256  # a few hundred model x machine x threads measurements; the oldest go first
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once
_STALE_SAID: set[str] = set()  # model digests whose stale entries were reported (once per process)

#: the libraries the backends run on: (name in the key, import name, the distributions that install it)
BACKEND_LIBRARIES = (
    ("onnxruntime", "onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                                    "onnxruntime-directml")),
    ("openvino", "openvino", ("openvino",)),
    ("tensorrt", "tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu11")),
    ("opencv", "cv2", ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                       "opencv-contrib-python-headless")),
)


def profile_path() -> Path | None:
    """Where the profile lives, or None when `EDGEPIX_PROFILE=off`."""
    value = os.environ.get(PROFILE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "edgepix" / "profile.json"


def library_version(module: str, distributions: tuple[str, ...]) -> str | None:
    """The installed version of a backend library, None when it is not installed. From the package metadata (no
    import); a system package without pip metadata (Debian's python3-opencv) by its `__version__` when it is
    already imported, else "unknown"."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    loaded = sys.modules.get(module)
    if loaded is not None:
        return str(getattr(loaded, "__version__", "unknown"))
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "unknown" if found else None


def library_versions() -> dict[str, str | None]:
    return {name: library_version(module, dists) for name, module, dists in BACKEND_LIBRARIES}


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The first GPU's name (nvidia-smi; a Jetson's board model, which has no nvidia-smi details), else None.
    Read once per process."""
    from .tensorrt.manifest import gpu_facts_from_smi

    facts = gpu_facts_from_smi()
    if facts is not None:
        return facts[0]
    try:
        board = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None
    return board if "jetson" in board.lower() or "nvidia" in board.lower() else None


def model_digest(path: str | os.PathLike) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def measurement_key(model: str | os.PathLike, *, threads: int) -> dict[str, Any]:
    """What decides a measurement of `model` at `threads` threads on this machine now (see the module docstring)."""
    cpu = cpu_features()
    return {"model_sha256": model_digest(model), "arch": platform.machine(), "cpu": cpu.model,
            "cpu_features": [label for label, present in cpu.features() if present], "cores": usable_cores(),
            "gpu": gpu_name(), "libraries": library_versions(), "threads": threads}


def entry_id(key: dict[str, Any]) -> str:
    """The entry's name in the file: a digest of its whole key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def read_profile(path: Path | None = None) -> dict[str, Any]:
    """The profile's entries, oldest first ({} when there is none, it is disabled, or it cannot be read)."""
    path = path or profile_path()
    if path is None or not path.is_file():
        return {}
    try:
        data = loads(path.read_bytes(), what=f"profile {path}", error=SpecError)
        if isinstance(data, dict) and data.get("format") == 1:
            raise SpecError(f"profile {path} was written by an older edgepix (format 1, keyed on the CPU only)")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise SpecError(f"profile {path}: expected {{'format': {FORMAT}, 'entries': {{...}}}}")
        return data["entries"]
    except (OSError, SpecError) as e:
        log.warning("ignoring the backend profile (%s); `edgepix tune MODEL` writes a new one", e)
        return {}


def _entry_key(entry: Any) -> dict[str, Any] | None:
    key = entry.get("key") if isinstance(entry, dict) else None
    return key if isinstance(key, dict) else None


def preferred_backend(model: str | os.PathLike, *, threads: int | None = None) -> str | None:
    """The backend `edgepix tune` measured fastest for this file on this machine as it is now, at `threads`
    threads (None: the usable cores), or None."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        return None  # not a thread count: the backend's options check says so when it loads
    entries = read_profile()
    if not entries:
        return None
    try:
        digest = model_digest(model)
    except OSError:
        return None
    mine = [e for e in entries.values() if (_entry_key(e) or {}).get("model_sha256") == digest]
    if not mine:
        return None
    now = measurement_key(model, threads=threads or usable_cores())
    for entry in reversed(mine):  # newest first
        if entry["key"] == now:
            backend = entry.get("backend")
            if "runs" in entry:  # a sibling file's backend: preferred_sibling's answer, not this file's
                return None
            return backend if isinstance(backend, str) else None
    if digest not in _STALE_SAID:
        _STALE_SAID.add(digest)
        closest = min(mine, key=lambda e: len(_differences(e["key"], now)))
        log.warning("backend profile: %s was measured by `edgepix tune` with %s; auto keeps its default order: run "
                    "`edgepix tune %s%s` again", Path(model).name, "; ".join(_differences(closest["key"], now)),
                    Path(model).name, f" --threads {now['threads']}" if closest["key"].get("threads") !=
                    now["threads"] else "")
    return None


def _differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between an entry's key and this machine's, e.g. 'onnxruntime 1.31.0 (now 1.32.0)'."""
    out = []
    for field in ("arch", "cpu", "cpu_features", "cores", "gpu", "threads"):
        if then.get(field) != now[field]:
            out.append(f"{field} {_show(then.get(field))} (now {_show(now[field])})")
    libraries = then.get("libraries") if isinstance(then.get("libraries"), dict) else {}
    for name, version in now["libraries"].items():
        if libraries.get(name) != version:
            out.append(f"{name} {_show(libraries.get(name))} (now {_show(version)})")
    return out or ["another key"]


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def record(model: str | os.PathLike, backend: str, measurements: dict[str, Any], *, threads: int | None = None,
           path: Path | None = None, runs: str | os.PathLike | None = None) -> Path:
    """Store `backend` as the choice for `model` at `threads` threads (None: the usable cores, `tune`'s default) on
    this machine as it is now (with what was measured), keeping the newest MAX_ENTRIES entries; returns the file.
    `runs`: the file the backend runs when it is not `model` itself (the `.tflite` exported beside an `.onnx`
    file from the same checkpoint, for `litert`); its sha256 is recorded so that only that very file is used."""
    path = path or profile_path()
    if path is None:
        raise InputError(f"{PROFILE_ENV}=off: the backend profile is disabled; unset it to record a choice")
    key = measurement_key(model, threads=threads or usable_cores())
    name = entry_id(key)
    entries = {k: e for k, e in read_profile(path).items() if _entry_key(e) is not None and k != name}
    entries[name] = {"backend": backend, "model": str(model), "key": key,
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "measurements": measurements}
    if runs is not None:
        entries[name]["runs"] = {"name": Path(runs).name, "sha256": model_digest(runs)}
    for old in list(entries)[:max(0, len(entries) - MAX_ENTRIES)]:
        del entries[old]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, "entries": entries}, indent=2) + "\n")
    _STALE_SAID.discard(key["model_sha256"])
    return path


def preferred_sibling(model: str | os.PathLike, *, threads: int | None = None) -> tuple[Path, str] | None:
    """(file, backend) when `edgepix tune` measured another file beside `model`, exported from the same checkpoint
    and gated against it (the `.tflite` beside an `.onnx` on LiteRT), fastest for it on this machine as it is now,
    at `threads` threads; None otherwise, or when that file has changed since."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        return None
    entries = read_profile()
    if not entries:
        return None
    try:
        now = measurement_key(model, threads=threads or usable_cores())
    except OSError:
        return None
    for entry in reversed(list(entries.values())):
        if not isinstance(entry, dict) or entry.get("key") != now:
            continue
        runs, backend = entry.get("runs"), entry.get("backend")
        if not isinstance(runs, dict) or not isinstance(backend, str):
            return None
        sibling = Path(model).with_name(str(runs.get("name", "")))
        try:
            same = sibling.is_file() and sibling.parent == Path(model).parent and model_digest(sibling) == runs.get(
                "sha256")
        except OSError:
            same = False
        if not same:
            log.info("the profile's choice for %s ran %s, which is gone or has changed; run edgepix tune again",
                     Path(model).name, sibling.name)
            return None
        return sibling, backend
    return None
