"""Measured backend choices for `auto`: what `edgepix tune MODEL` found fastest for a model on this machine.

`auto` otherwise tries the backends in a fixed order (GPU ones first, then ort-cpu, then opencv). On a CPU that
order is not always right: OpenVINO ran a Fast-SCNN file faster than ONNX Runtime on some x86 machines, ONNX
Runtime faster on others (docs/benchmarks.md). `edgepix tune` times every backend that can run the file, on the same
input and threads, and records the winner here; `load_backend(path, "auto")` then tries that backend first, on
this machine only, for this exact file only.

The profile is one JSON file (`$EDGEPIX_PROFILE`, else `~/.cache/edgepix/profile.json`; `EDGEPIX_PROFILE=off`
disables it). An entry is keyed by the model file's sha256 and a fingerprint of the machine (CPU model and
instruction sets, usable cores, architecture), so a copied profile, a changed model or a new CPU never applies a
measurement made elsewhere. A damaged profile is ignored with a warning, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from ..core.boundedjson import loads
from ..core.cpuinfo import cpu_features, usable_cores
from ..core.errors import InputError, SpecError
from ..core.fileio import atomic_write_text

log = logging.getLogger(__name__)

PROFILE_ENV = "EDGEPIX_PROFILE"
FORMAT = 1
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once


def profile_path() -> Path | None:
    """Where the profile lives, or None when `EDGEPIX_PROFILE=off`."""
    value = os.environ.get(PROFILE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "edgepix" / "profile.json"


def machine_fingerprint() -> str:
    """What a measurement depends on besides the model: the CPU and what this process may use of it."""
    cpu = cpu_features()
    features = ",".join(f"{label}={present}" for label, present in cpu.features())
    text = f"{platform.machine()}|{cpu.model}|{features}|cores={usable_cores()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def entry_key(model: str | os.PathLike) -> str:
    return f"{model_digest(model)}@{machine_fingerprint()}"


def read_profile(path: Path | None = None) -> dict[str, Any]:
    """The profile's entries ({} when there is none, it is disabled, or it cannot be read)."""
    path = path or profile_path()
    if path is None or not path.is_file():
        return {}
    try:
        data = loads(path.read_bytes(), what=f"profile {path}", error=SpecError)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise SpecError(f"profile {path}: expected {{'format': {FORMAT}, 'entries': {{...}}}}")
        return data["entries"]
    except (OSError, SpecError) as e:
        log.warning("ignoring the backend profile (%s); `edgepix tune MODEL` writes a new one", e)
        return {}


def preferred_backend(model: str | os.PathLike) -> str | None:
    """The backend `edgepix tune` measured fastest for this file on this machine, or None."""
    entries = read_profile()
    if not entries:
        return None
    try:
        entry = entries.get(entry_key(model))
    except OSError:
        return None
    backend = entry.get("backend") if isinstance(entry, dict) else None
    return backend if isinstance(backend, str) else None


def record(model: str | os.PathLike, backend: str, measurements: dict[str, Any], *,
           path: Path | None = None) -> Path:
    """Store `backend` as the choice for `model` on this machine (with what was measured); returns the file."""
    path = path or profile_path()
    if path is None:
        raise InputError(f"{PROFILE_ENV}=off: the backend profile is disabled; unset it to record a choice")
    entries = read_profile(path)
    entries[entry_key(model)] = {"backend": backend, "model": str(model), "machine": machine_fingerprint(),
                                 "cpu": cpu_features().model, "cores": usable_cores(),
                                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "measurements": measurements}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, "entries": entries}, indent=2) + "\n")
    return path
