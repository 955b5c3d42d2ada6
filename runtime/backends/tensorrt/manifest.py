"""TensorRT engine manifests, device facts, compatibility checks and the engine cache. No TensorRT needed.

A serialized TensorRT engine only runs with the TensorRT version that built it and on the GPU model (compute
capability) it was built for. edgepix writes a manifest `<engine>.json` beside every engine it builds:

    {"manifest_version": 1, "spec": {...ModelSpec...}, "tensorrt": "10.3.0", "cuda": "12.6", "gpu": "Orin",
     "compute_capability": "8.7", "onnx_sha256": "...", "onnx": "model.fp16.onnx", "precision": "fp16",
     "profiles": [{"input": "images", "min": [1, 3, 512, 512], "opt": [...], "max": [...]}],
     "io": [{"name": "images", "mode": "input", "dtype": "float32", "shape": [-1, 3, 512, 512]}, ...],
     "built": "2025-01-01T12:00:00+00:00", "builder": {...build options...}, "cache_key": "...", "edgepix": "0.1.0"}

Everything here is plain Python and JSON, so `edgepix doctor --engines DIR` and `edgepix info` can say whether an
engine loads on this machine without importing TensorRT, and the runtime can refuse a mismatched engine with one
line that names both sides instead of TensorRT's deserialization error.

Engine cache: `cache_key()` hashes what determines the engine (ONNX bytes, TensorRT version and the CUDA major it
was built for, GPU and compute capability, precision, profiles and the options that change the plan);
`cached_engine()` finds a previous build.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core import boundedjson
from ...core.errors import ModelFormatError, SpecError
from ...core.fileio import atomic_write_text
from ...core.formats import ENGINE_SUFFIXES
from ...description.spec import ModelSpec

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".json"
ENGINE_SUFFIX = ".engine"

# Where engines are cached unless --cache says otherwise.
CACHE_ENV = "EDGEPIX_ENGINE_CACHE"


# ---- profiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization-profile entry: the min / opt / max shape TensorRT accepts for one input."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            value = tuple(getattr(self, name))
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value):
                raise SpecError(f"profile {self.input!r} {name}: expected positive integer dims, got {list(value)}")
            object.__setattr__(self, name, value)
        if not len(self.min) == len(self.opt) == len(self.max):
            raise SpecError(f"profile {self.input!r}: min/opt/max have different ranks: "
                            f"{list(self.min)}, {list(self.opt)}, {list(self.max)}")
        for i, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                raise SpecError(f"profile {self.input!r} dim {i}: needs min <= opt <= max, got {lo}, {mid}, {hi}")

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def describe(self) -> str:
        if self.static:
            return f"{self.input} {_dims(self.opt)}"
        return f"{self.input} min {_dims(self.min)} opt {_dims(self.opt)} max {_dims(self.max)}"

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Any) -> ProfileShapes:
        if not isinstance(data, dict) or set(data) != {"input", "min", "opt", "max"}:
            raise SpecError(f"profile: expected an object with input, min, opt, max; got {data!r}")
        if not isinstance(data["input"], str) or not all(isinstance(data[k], list) for k in ("min", "opt", "max")):
            raise SpecError(f"profile: input must be a string and min/opt/max lists, got {data!r}")
        return cls(data["input"], tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def select_profile(profiles: Sequence[Sequence[ProfileShapes]], shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The index of the first optimization profile that accepts every input shape, or None."""
    for index, profile in enumerate(profiles):
        by_name = {p.input: p for p in profile}
        if all(name in by_name and by_name[name].contains(shape) for name, shape in shapes.items()):
            return index
    return None


# ---- device facts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What an engine depends on, here: TensorRT and CUDA versions, GPU name and compute capability.

    Any field is None when it could not be found (no TensorRT, no GPU, no CUDA)."""

    tensorrt: str | None
    cuda: str | None
    gpu: str | None
    compute_capability: str | None  # "8.7"

    def describe(self) -> str:
        trt = f"TensorRT {self.tensorrt}" if self.tensorrt else "no TensorRT"
        if self.gpu:
            return f"{trt} on {self.gpu} (sm {self.compute_capability})"
        return f"{trt}, no NVIDIA GPU"


def tensorrt_version() -> str | None:
    """The installed TensorRT's version without importing it (pip metadata), importing only as a fallback.

    JetPack installs TensorRT's Python bindings from Debian packages, which may lack pip metadata."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_lean"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt  # noqa: PLC0415 (lazy by design)
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def tensorrt_cuda_variant() -> str | None:
    """Which CUDA major the installed TensorRT wheels were built for ("cu12", "cu13"), from their pip names.

    TensorRT ships the same version number built for CUDA 12 and for CUDA 13 (`tensorrt-cu12-bindings`,
    `tensorrt-cu13-bindings`; the bare `tensorrt` installs the CUDA 13 build); an engine from one is not an engine
    from the other. None when no pip metadata says (JetPack's Debian packages)."""
    from importlib import metadata

    found = []
    for cu in ("cu13", "cu12", "cu11"):
        for dist in (f"tensorrt-{cu}-bindings", f"tensorrt-{cu}", f"tensorrt-{cu}-libs"):
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            found.append(cu)
            break
    return "+".join(found) or None  # both builds installed side by side: say so rather than guess


def _cudart():
    """cuda-python's runtime module (`cuda.bindings.runtime` in cuda-python >= 12.6, `cuda.cudart` before)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
                continue
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _cuda_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def gpu_facts_from_cuda(device: int = 0) -> tuple[str, str, str] | None:
    """(GPU name, compute capability "M.m", CUDA runtime version) through cuda-python, or None."""
    cudart = _cudart()
    if cudart is None:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count or device >= count:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return None
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    err, runtime = cudart.cudaRuntimeGetVersion()
    return name.strip(), f"{props.major}.{props.minor}", _cuda_version_string(runtime) if int(err) == 0 else ""


def gpu_facts_from_smi(device: int = 0) -> tuple[str, str] | None:
    """(GPU name, compute capability) from nvidia-smi, or None."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    rows = [line.rsplit(",", 1) for line in out.splitlines() if line.count(",") >= 1]
    if device >= len(rows):
        return None
    name, cc = rows[device]
    return name.strip(), cc.strip()


def running_device_facts(device: int = 0) -> DeviceFacts:
    """This machine's TensorRT, CUDA and GPU (cuda-python first, nvidia-smi as a fallback)."""
    trt = tensorrt_version()
    cuda = gpu_facts_from_cuda(device)
    if cuda is not None:
        name, cc, runtime = cuda
        return DeviceFacts(trt, runtime or None, name, cc)
    smi = gpu_facts_from_smi(device)
    if smi is not None:
        return DeviceFacts(trt, None, smi[0], smi[1])
    return DeviceFacts(trt, None, None, None)


# ---- the manifest --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDesc:
    """An engine I/O tensor as built: name, "input"/"output", numpy dtype name, shape (-1 for dynamic dims)."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any) -> TensorDesc:
        if not isinstance(data, dict) or set(data) != {"name", "mode", "dtype", "shape"}:
            raise SpecError(f"io: expected an object with name, mode, dtype, shape; got {data!r}")
        if not isinstance(data["name"], str) or not isinstance(data["dtype"], str):
            raise SpecError(f"io: name and dtype must be strings, got {data['name']!r}, {data['dtype']!r}")
        if data["mode"] not in ("input", "output"):
            raise SpecError(f"io {data['name']!r}: mode must be 'input' or 'output', got {data['mode']!r}")
        shape = data["shape"]
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) for d in shape):
            raise SpecError(f"io {data['name']!r}: shape must be a list of integers, got {shape!r}")
        return cls(data["name"], data["mode"], data["dtype"], tuple(shape))


@dataclass(frozen=True)
class EngineManifest:
    spec: ModelSpec
    tensorrt: str
    cuda: str | None
    gpu: str
    compute_capability: str
    onnx_sha256: str
    precision: str
    profiles: tuple[tuple[ProfileShapes, ...], ...]  # one tuple of per-input shapes per optimization profile
    built: str  # ISO 8601 UTC
    builder: dict[str, Any] = field(default_factory=dict)  # the build options, as recorded (JSON values)
    onnx: str | None = None  # the ONNX it was built from, relative to the engine's folder when beside it
    io: tuple[TensorDesc, ...] = ()
    cache_key: str = ""
    edgepix: str = ""
    manifest_version: int = MANIFEST_VERSION

    # ---- JSON ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": self.manifest_version,
            "spec": self.spec.to_dict(),
            "tensorrt": self.tensorrt,
            "cuda": self.cuda,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "onnx_sha256": self.onnx_sha256,
            "onnx": self.onnx,
            "precision": self.precision,
            "profiles": [[p.to_dict() for p in profile] for profile in self.profiles],
            "io": [t.to_dict() for t in self.io],
            "built": self.built,
            "builder": dict(self.builder),
            "cache_key": self.cache_key,
            "edgepix": self.edgepix,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest") -> EngineManifest:
        if not isinstance(data, dict):
            raise ModelFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ModelFormatError(f"{source}: unknown key {unknown[0]!r} (valid keys: {', '.join(names)})")
        required = ("spec", "tensorrt", "gpu", "compute_capability", "onnx_sha256", "precision", "profiles", "built")
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelFormatError(f"{source}: missing key {missing[0]!r}; rebuild the engine with edgepix export")
        version = data.get("manifest_version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise ModelFormatError(f"{source}: manifest_version {version!r}, this edgepix reads {MANIFEST_VERSION}; "
                                   "upgrade edgepix or rebuild the engine")
        for key in ("tensorrt", "gpu", "compute_capability", "onnx_sha256", "precision", "built"):
            if not isinstance(data[key], str) or not data[key]:
                raise ModelFormatError(f"{source}: {key}: expected a non-empty string, got {data[key]!r}")
        if not isinstance(data["profiles"], list) or not all(isinstance(p, list) for p in data["profiles"]):
            raise ModelFormatError(f"{source}: profiles: expected a list of lists, got {data['profiles']!r}")
        if not isinstance(data.get("builder", {}), dict):
            raise ModelFormatError(f"{source}: builder: expected an object, got {data['builder']!r}")
        if not isinstance(data.get("io", []), list):
            raise ModelFormatError(f"{source}: io: expected a list, got {data['io']!r}")
        for key in ("cuda", "onnx", "cache_key", "edgepix"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ModelFormatError(f"{source}: {key}: expected a string or null, got {data[key]!r}")
        try:
            spec = ModelSpec.from_dict(data["spec"])
            profiles = tuple(tuple(ProfileShapes.from_dict(p) for p in profile) for profile in data["profiles"])
            io = tuple(TensorDesc.from_dict(t) for t in data.get("io", []))
        except SpecError as e:
            raise ModelFormatError(f"{source}: {e}") from e
        return cls(spec=spec, tensorrt=data["tensorrt"], cuda=data.get("cuda"), gpu=data["gpu"],
                   compute_capability=data["compute_capability"], onnx_sha256=data["onnx_sha256"],
                   precision=data["precision"], profiles=profiles, built=data["built"],
                   builder=dict(data.get("builder", {})), onnx=data.get("onnx"), io=io,
                   cache_key=str(data.get("cache_key", "")), edgepix=str(data.get("edgepix", "")),
                   manifest_version=version)

    # ---- convenience ---------------------------------------------------------------------------------

    @property
    def device(self) -> DeviceFacts:
        return DeviceFacts(self.tensorrt, self.cuda, self.gpu, self.compute_capability)

    def onnx_path(self, engine_path: str | os.PathLike) -> Path | None:
        """The ONNX the engine was built from (resolved against the engine's folder), or None if not recorded."""
        if not self.onnx:
            return None
        p = Path(self.onnx)
        return p if p.is_absolute() else Path(engine_path).parent / p


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def manifest_path(engine_path: str | os.PathLike) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + MANIFEST_SUFFIX)


def write_manifest(engine_path: str | os.PathLike, manifest: EngineManifest) -> Path:
    path = manifest_path(engine_path)
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> EngineManifest:
    """Read the manifest of an engine (give the engine or the manifest itself)."""
    path = Path(path)
    if path.suffix != MANIFEST_SUFFIX:
        path = manifest_path(path)
    if not path.exists():
        engine = path.with_name(path.name[: -len(MANIFEST_SUFFIX)])
        raise ModelFormatError(f"{engine.name}: no manifest {path.name} beside the engine; edgepix cannot tell "
                               "which TensorRT and GPU it was built for: rebuild it with `edgepix export "
                               "MODEL.onnx --format engine`")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from e
    # Bounded (depth, number sizes, UTF-8): a manifest copied over a flaky link or crafted fails with one line.
    data = boundedjson.loads(text, what=str(path), error=ModelFormatError,
                             hint="rebuild the engine with `edgepix export MODEL.onnx --format engine`")
    return EngineManifest.from_dict(data, source=str(path))


# ---- compatibility -------------------------------------------------------------------------------------


def _version_tuple(v: str | None, n: int = 3) -> tuple[int, ...]:
    parts = re.findall(r"\d+", v or "")
    return tuple(int(p) for p in parts[:n])


@dataclass(frozen=True)
class Compatibility:
    """Whether an engine can be deserialized here: `problem` (one line) when not, plus non-fatal `warnings`."""

    problem: str | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_compatibility(manifest: EngineManifest, here: DeviceFacts, *, engine_name: str = "engine",
                        rebuild_hint: str | None = None) -> Compatibility:
    """Compare what the engine was built for with this machine.

    TensorRT refuses plans from another TensorRT version (major.minor.patch) and from another compute capability
    (unless built hardware-compatible, which the manifest records as builder["hardware_compatibility"]). A
    different GPU model with the same compute capability loads but may run slower: a warning. So does a different
    CUDA major version.
    """
    hint = rebuild_hint or f"rebuild it here with --rebuild (from {manifest.onnx or 'its ONNX'})"
    built = manifest.device.describe()
    if not here.tensorrt:
        return Compatibility(f"{engine_name} was built with {built}, but TensorRT is not installed here "
                             "(pip install 'edgepix[gpu]'; on Jetson it comes with JetPack)")
    if not here.gpu:
        return Compatibility(f"{engine_name} was built with {built}, but this machine has no NVIDIA GPU that "
                             f"CUDA can see ({here.describe()}); run it on a GPU, or run the ONNX with ort-cpu")
    if _version_tuple(manifest.tensorrt) != _version_tuple(here.tensorrt):
        return Compatibility(f"{engine_name} was built with {built}; this machine runs {here.describe()}: TensorRT "
                             f"loads engines only from its own version; {hint}")
    hw = str(manifest.builder.get("hardware_compatibility", "none")).lower()
    same_cc = manifest.compute_capability == here.compute_capability
    if not same_cc and not (hw == "ampere_plus" and _version_tuple(here.compute_capability, 2) >= (8, 0)):
        return Compatibility(f"{engine_name} was built with {built}; this machine runs {here.describe()}: an engine "
                             f"built for compute capability {manifest.compute_capability} cannot run on "
                             f"{here.compute_capability}; {hint}")
    warnings = []
    if manifest.gpu != here.gpu:
        warnings.append(f"{engine_name} was built on {manifest.gpu}, this is {here.gpu} (same compute capability "
                        f"{here.compute_capability}): it loads, but kernels were tuned for the other GPU; "
                        "rebuild for best speed")
    if manifest.cuda and here.cuda and _version_tuple(manifest.cuda, 1) != _version_tuple(here.cuda, 1):
        warnings.append(f"{engine_name} was built with CUDA {manifest.cuda}, this machine has CUDA {here.cuda}")
    return Compatibility(None, tuple(warnings))


# ---- cache ---------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$EDGEPIX_ENGINE_CACHE, else $XDG_CACHE_HOME/edgepix/engines, else ~/.cache/edgepix/engines."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgepix" / "engines"


def cache_key(*, onnx_sha256: str, tensorrt: str, gpu: str, compute_capability: str, precision: str,
              profiles: Iterable[Iterable[ProfileShapes]], options: Mapping[str, Any] | None = None,
              tensorrt_cuda: str = "") -> str:
    """A stable hex digest of everything that determines the engine.

    `options` are the build options that change the plan (DLA core, optimization level, INT8 mode, hardware
    compatibility); workspace size and the timing cache only change how long the build takes, so they are left out.
    `tensorrt_cuda` tells the CUDA 12 and CUDA 13 builds of one TensorRT version apart (`tensorrt_cuda_variant`).
    """
    payload = {
        "onnx_sha256": onnx_sha256, "tensorrt": tensorrt, "gpu": gpu, "compute_capability": compute_capability,
        "precision": precision, "profiles": [[p.to_dict() for p in profile] for profile in profiles],
        "options": dict(sorted((options or {}).items())),
    }
    if tensorrt_cuda:  # only when known, so keys made without it (JetPack, older manifests) stay the same
        payload["tensorrt_cuda"] = tensorrt_cuda
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def cache_entry_name(model_name: str, precision: str, compute_capability: str, tensorrt: str, key: str) -> str:
    """e.g. `fastscnn-fp16-sm87-trt10.3.0-3f2a9c1b7d4e.engine`: readable, and unique by the key."""
    cc = compute_capability.replace(".", "")
    return f"{_slug(model_name)}-{precision}-sm{cc}-trt{_slug(tensorrt)}-{key[:12]}{ENGINE_SUFFIX}"


def cached_engine(cache_dir: str | os.PathLike, name: str, key: str) -> Path | None:
    """The cached engine with this name whose manifest records `key`, or None (missing, partial, or stale)."""
    path = Path(cache_dir) / name
    if not path.is_file() or not manifest_path(path).is_file():
        return None
    try:
        manifest = read_manifest(path)
    except ModelFormatError:
        return None
    return path if manifest.cache_key == key else None


# ---- folders of engines (doctor) ------------------------------------------------------------------------




@dataclass(frozen=True)
class EngineStatus:
    path: Path
    loads: bool
    detail: str


def scan_engines(folder: str | os.PathLike, here: DeviceFacts) -> list[EngineStatus]:
    """For each engine in `folder` (not recursive): can it load on this machine, and why not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"--engines expects a folder of engines, got {folder} "
                               + ("(a file)" if folder.exists() else "(not found)"))
    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in ENGINE_SUFFIXES and p.is_file()):
        try:
            manifest = read_manifest(path)
        except ModelFormatError as e:
            out.append(EngineStatus(path, False, str(e)))
            continue
        verdict = check_compatibility(manifest, here, engine_name=path.name)
        if verdict.ok:
            detail = (f"{manifest.spec.model_name} {manifest.precision}, built with {manifest.device.describe()}"
                      + ("; " + "; ".join(verdict.warnings) if verdict.warnings else ""))
            out.append(EngineStatus(path, True, detail))
        else:
            out.append(EngineStatus(path, False, verdict.problem or ""))
    return out
