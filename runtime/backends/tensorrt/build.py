"""Build TensorRT engines from ONNX with the tensorrt Python API (TensorRT 10 and 11). Torch-free.

This is the core that both `edgepix export --format engine` (export/tensorrt.py) and the runtime's
`tensorrt` backend (`rebuild=True`, on the device, from the ONNX beside the engine) use. It lives in the runtime
because a Jetson that must rebuild an engine has TensorRT but no PyTorch.

Precision, per the TensorRT documentation:
- TensorRT 11 networks are always strongly typed: BuilderFlag.FP16/INT8 and implicit INT8 calibration
  (IInt8Calibrator, `config.int8_calibrator`) were removed. FP16 engines come from an FP16 ONNX, INT8 engines from
  a Q/DQ ONNX (explicit quantization, symmetric S8S8).
- TensorRT 10 builds the same strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED; EXPLICIT_BATCH is
  deprecated and ignored), and still has the weak-typing flags: FP16 from an FP32 ONNX with BuilderFlag.FP16, and
  implicit INT8 from an FP32 ONNX with BuilderFlag.INT8 and an IInt8EntropyCalibrator2 (older JetPack releases).
- Explicit quantization is built strongly typed, without precision flags ("precision-control build flags are not
  required and should not be specified").
- DLA (Jetson AGX/NX): on TensorRT 10 a DLA build needs the FP16 or INT8 flag; DLA is not supported by TensorRT
  11.0-11.4 (the builder reports no DLA cores there).

Engines go to a cache keyed by what determines them (see `manifest.cache_key`) and are copied to the
requested path with a manifest `<engine>.json`; both are written atomically. An implicit-INT8 engine also gets its
calibration table beside it (`<engine>.calib`), so that a rebuild on the device can replay it.

The build runs on the CUDA device the options name (made current first). Implicit INT8 calibrates at the
calibration profile's OPT shape, so the calibration images are fed in batches of the OPT batch size. Cache files are
conveniences: failing to read or write a timing cache or calibration table is a warning, never a lost build, and a
rebuild uses this machine's cache folder rather than paths recorded on the build machine.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import BackendError, DependencyError, EdgepixError, ExportError
from ...core.fileio import atomic_output, atomic_write_bytes
from ...description.spec import ModelSpec, Precision
from .manifest import (
    DeviceFacts,
    EngineManifest,
    ProfileShapes,
    TensorDesc,
    cache_entry_name,
    cache_key,
    cached_engine,
    default_cache_dir,
    file_sha256,
    manifest_path,
    now_iso,
    running_device_facts,
    tensorrt_cuda_variant,
    write_manifest,
)

log = logging.getLogger("edgepix.tensorrt")

INSTALL_HINT = "install it with: pip install 'edgepix[gpu]' (on Jetson, TensorRT comes with JetPack)"


def import_tensorrt():
    """`import tensorrt`, or a one-line DependencyError that says how to install it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise DependencyError(f"TensorRT engines need the Python package 'tensorrt', which is not installed here "
                              f"({e}); {INSTALL_HINT}") from e


def trt_major(version: str) -> int:
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else 0


# ---- options -------------------------------------------------------------------------------------------


class Int8Mode(str, enum.Enum):
    QDQ = "qdq"  # explicit quantization from a Q/DQ ONNX (TensorRT 10 and 11)
    CALIBRATE = "calibrate"  # implicit quantization with IInt8EntropyCalibrator2 (TensorRT <= 10 only)


@dataclass(frozen=True, kw_only=True)
class EngineBuildOptions:
    """How to build one engine. The precision path is planned from these and the ONNX (see `plan_precision`)."""

    precision: Precision = Precision.FP16
    int8_mode: Int8Mode = Int8Mode.QDQ
    workspace_mb: int | None = None  # builder workspace pool limit; None: TensorRT's default (device memory)
    opt_level: int | None = None  # builder optimization level 0..5; None: TensorRT's default (3)
    timing_cache: Path | None = None  # read before and written after the build: later builds skip kernel timing
    dla_core: int | None = None  # run on this DLA core, with GPU fallback for layers DLA lacks
    device: int = 0  # CUDA device
    progress_interval_s: float = 15.0  # how often a long build logs where it is
    calibration_cache: Path | None = None  # implicit INT8: read/written by the calibrator

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _enum(Precision, "precision", self.precision))
        object.__setattr__(self, "int8_mode", _enum(Int8Mode, "int8_mode", self.int8_mode))
        if self.workspace_mb is not None and (_not_int(self.workspace_mb) or self.workspace_mb < 1):
            raise ExportError(f"--workspace: expected a positive number of MB, got {self.workspace_mb!r}")
        if self.opt_level is not None and (_not_int(self.opt_level) or not 0 <= self.opt_level <= 5):
            raise ExportError(f"--opt-level: expected 0..5 (TensorRT's builder optimization level), "
                              f"got {self.opt_level!r}")
        if self.dla_core is not None and (_not_int(self.dla_core) or self.dla_core < 0):
            raise ExportError(f"--dla-core: expected a DLA core index >= 0, got {self.dla_core!r}")
        if _not_int(self.device) or self.device < 0:
            raise ExportError(f"device: expected a CUDA device index >= 0, got {self.device!r}")
        if not self.progress_interval_s > 0:
            raise ExportError(f"progress_interval_s: expected > 0, got {self.progress_interval_s!r}")
        for name in ("timing_cache", "calibration_cache"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def record(self) -> dict[str, Any]:
        """The options as JSON values, for the manifest. Cache paths are made absolute: a path relative to the
        build's working directory would mean another file wherever the manifest is read."""
        return {"precision": self.precision.value, "int8_mode": self.int8_mode.value,
                "workspace_mb": self.workspace_mb, "opt_level": self.opt_level,
                "timing_cache": str(self.timing_cache.absolute()) if self.timing_cache else None,
                "dla_core": self.dla_core, "device": self.device, "hardware_compatibility": "none",
                "calibration_cache": str(self.calibration_cache.absolute()) if self.calibration_cache else None}

    def key_options(self) -> dict[str, Any]:
        """The options that change the engine itself (part of the cache key)."""
        return {"int8_mode": self.int8_mode.value if self.precision is Precision.INT8 else None,
                "opt_level": self.opt_level, "dla_core": self.dla_core, "hardware_compatibility": "none"}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EngineBuildOptions:
        """Options from a manifest's "builder" record (what `rebuild` uses)."""
        known = {"precision", "int8_mode", "workspace_mb", "opt_level", "timing_cache", "dla_core", "device",
                 "calibration_cache"}
        kwargs = {k: v for k, v in record.items() if k in known}
        return cls(**kwargs)


def _not_int(v: Any) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def _enum(enum_type: type[enum.Enum], name: str, value: Any) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_type)
        raise ExportError(f"{name}: expected one of {valid}, got {value!r}") from None


# ---- precision planning (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionPlan:
    strongly_typed: bool
    flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members to set
    calibrate: bool  # implicit INT8 with a calibrator
    summary: str


def _is_trt_qdq(spec: ModelSpec) -> bool:
    q = (spec.quantization or "").upper()
    return "QDQ" in q and "S8S8" in q


def plan_precision(requested: Precision, onnx_spec: ModelSpec, tensorrt_major: int, *, dla: bool = False,
                   int8_mode: Int8Mode = Int8Mode.QDQ) -> PrecisionPlan:
    """How to build `requested` precision from an ONNX whose spec says `onnx_spec.precision`, on this TensorRT.

    Raises ExportError with what to do when the combination cannot work (e.g. FP16 from an FP32 ONNX on 11)."""
    have = onnx_spec.precision
    weak_ok = tensorrt_major <= 10
    if requested is Precision.FP32:
        if have is not Precision.FP32:
            raise ExportError(f"--precision fp32 needs an FP32 ONNX; this ONNX is {have.value}: give the FP32 ONNX "
                              "or the checkpoint")
        if dla:
            raise ExportError("--dla-core: DLA runs FP16 and INT8 only; use --precision fp16 or int8")
        return PrecisionPlan(True, (), False, "FP32, strongly typed")
    if requested is Precision.FP16:
        if have is Precision.FP16:
            if dla and weak_ok:
                return PrecisionPlan(False, ("FP16",), False, "FP16 ONNX, BuilderFlag.FP16 (DLA on TensorRT 10)")
            return PrecisionPlan(True, (), False, "FP16 ONNX, strongly typed")
        if have is Precision.FP32:
            if not weak_ok:
                raise ExportError(f"TensorRT {tensorrt_major} has no FP16 builder flag (networks are strongly typed): "
                                  "FP16 engines build from an FP16 ONNX; export one with `edgepix export CKPT "
                                  "--format onnx-fp16`, or pass the checkpoint")
            return PrecisionPlan(False, ("FP16",), False, "FP32 ONNX, BuilderFlag.FP16 (weak typing, TensorRT 10)")
        raise ExportError(f"--precision fp16 from an {have.value} ONNX is not possible; give the FP32 or FP16 ONNX")
    # INT8
    if int8_mode is Int8Mode.CALIBRATE:
        if not weak_ok:
            raise ExportError(f"TensorRT {tensorrt_major} removed implicit INT8 calibration: build INT8 from a Q/DQ "
                              "ONNX (--int8-mode qdq; `edgepix export CKPT --format onnx-int8 --int8-target "
                              "tensorrt`)")
        if have is not Precision.FP32:
            raise ExportError(f"--int8-mode calibrate calibrates an FP32 ONNX; this ONNX is {have.value}")
        return PrecisionPlan(False, ("INT8", "FP16"), True,
                             "FP32 ONNX, implicit INT8 (IInt8EntropyCalibrator2) with FP16 fallback")
    if have is Precision.INT8:
        if not _is_trt_qdq(onnx_spec):
            raise ExportError(f"this INT8 ONNX was quantized as {onnx_spec.quantization or 'unknown'}; TensorRT needs "
                              "symmetric Q/DQ (S8S8, zero points 0): re-export with `--format onnx-int8 "
                              "--int8-target tensorrt --quant-format qdq`")
        if dla and weak_ok:
            return PrecisionPlan(False, ("INT8", "FP16"), False, "Q/DQ ONNX with INT8+FP16 flags (DLA on TensorRT 10)")
        return PrecisionPlan(True, (), False, "Q/DQ ONNX, explicit quantization, strongly typed")
    if have is Precision.FP32:
        hint = ("or --int8-mode calibrate to calibrate this FP32 ONNX (TensorRT 10 only)" if weak_ok else
                "TensorRT 11 has no implicit calibration")
        raise ExportError("--precision int8 with --int8-mode qdq needs a Q/DQ ONNX (`edgepix export CKPT --format "
                          f"onnx-int8 --int8-target tensorrt`, or pass the checkpoint); {hint}")
    raise ExportError(f"--precision int8 from an {have.value} ONNX is not possible; give the FP32 or Q/DQ ONNX")


# ---- TensorRT helpers (tensorrt imported by the caller) -----------------------------------------------


def make_logger(trt):
    """A tensorrt.ILogger that routes messages to Python logging and keeps the errors for the exception."""

    class EdgepixTrtLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # called by TensorRT, possibly from its threads
            S = trt.ILogger.Severity
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(str(msg).strip())
                log.debug("TensorRT error: %s", msg)
            elif severity == S.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == S.INFO:
                log.debug("TensorRT: %s", msg)

    return EdgepixTrtLogger()


def format_parser_error(error: Any) -> str:
    """One line for a tensorrt.IParserError: node index, operator and name when known, then the description."""

    def get(name: str) -> Any:
        fn = getattr(error, name, None)
        try:
            return fn() if callable(fn) else None
        except (RuntimeError, TypeError, ValueError):
            return None

    desc = " ".join(str(get("desc") or error).split())
    node = get("node")
    where = []
    if isinstance(node, int) and node >= 0:
        where.append(f"node {node}")
    op, name = get("node_operator"), get("node_name")
    if op or name:
        where.append(" ".join(x for x in (str(op) if op else "", repr(str(name)) if name else "") if x))
    return (f"{', '.join(where)}: {desc}" if where else desc)


def parser_errors(parser) -> list[str]:
    return [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]


def make_progress_monitor(trt, interval_s: float):
    """A tensorrt.IProgressMonitor (TensorRT >= 10) that logs top-level phases and, every `interval_s`, where the
    build is; None when this TensorRT has no IProgressMonitor."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, list] = {}  # name -> [parent, steps, done]
            self._start = time.monotonic()
            self._last = self._start

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            try:
                with self._lock:
                    self._phases[phase_name] = [parent_phase, int(num_steps), 0]
                if parent_phase is None:
                    log.info("TensorRT build: %s (%d steps) at %.0f s", phase_name, num_steps,
                             time.monotonic() - self._start)
            except Exception as e:  # an exception must not cross into TensorRT's C++ threads  # noqa: BLE001
                log.debug("progress monitor: %s", e)

        def step_complete(self, phase_name, step) -> bool:
            try:
                now = time.monotonic()
                with self._lock:
                    if phase_name in self._phases:
                        self._phases[phase_name][2] = int(step) + 1
                    due = now - self._last >= interval_s
                    if due:
                        self._last = now
                        where = ", ".join(f"{n} {done}/{steps}" for n, (_, steps, done) in self._phases.items())
                if due:
                    log.info("still building: %s (%.0f s)", where, now - self._start)
            except Exception as e:  # noqa: BLE001 (see phase_start)
                log.debug("progress monitor: %s", e)
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                self._phases.pop(phase_name, None)

    return BuildProgress()


class Heartbeat:
    """Logs "still building... N s" every `interval_s` from a thread, for builders without IProgressMonitor."""

    def __init__(self, interval_s: float, what: str = "the TensorRT engine") -> None:
        self.interval_s, self.what = interval_s, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trt-build-heartbeat", daemon=True)
        self.beats = 0

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval_s):
            self.beats += 1
            log.info("still building %s... %.0f s", self.what, time.monotonic() - start)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def calibration_batches_at(images: Sequence[np.ndarray], shape: Sequence[int]) -> list[np.ndarray]:
    """Regroup calibration images (arrays of one or more images) into batches of exactly `shape`.

    TensorRT calibrates at the calibration profile's OPT shape (its MIN and MAX are overwritten by OPT) and reads
    that many values from each buffer the calibrator hands it, so every batch must have the OPT batch size. Images
    that would only fill a partial last batch are left out (and logged); fewer images than one batch is an error."""
    shape = tuple(int(d) for d in shape)
    if not images:
        return []  # replaying a calibration cache
    per_image = shape[1:]
    for array in images:
        if tuple(array.shape[1:]) != per_image:
            raise ExportError(f"calibration images are {_dims(array.shape[1:])}, but TensorRT calibrates at the "
                              f"calibration profile's OPT shape {_dims(shape)}; calibrate at the size the engine "
                              "is optimized for (--imgsz)")
    stacked = np.concatenate([np.ascontiguousarray(a, dtype=np.float32) for a in images])
    batch = shape[0]
    full = len(stacked) // batch
    if full == 0:
        raise ExportError(f"{len(stacked)} calibration image{'s' if len(stacked) != 1 else ''} cannot fill one "
                          f"batch at the OPT batch of {batch} (TensorRT calibrates at the OPT shape); pass "
                          f"--calib-n {batch} or more, or a smaller OPT batch (--batch MIN OPT MAX)")
    if full * batch != len(stacked):
        log.info("INT8 calibration: %d of %d calibration images in %d batches of %d (the OPT batch); the last %d "
                 "would make a partial batch", full * batch, len(stacked), full, batch, len(stacked) - full * batch)
    return [np.ascontiguousarray(stacked[i * batch:(i + 1) * batch]) for i in range(full)]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def make_entropy_calibrator(trt, batches: Iterable[np.ndarray] | None, cache: Path | None):
    """An IInt8EntropyCalibrator2 (TensorRT <= 10) fed from float32 batches through a cuda-python device buffer.

    Each batch must have the calibration shape (see `calibration_batches_at`): TensorRT reads that much from the
    pointer `get_batch` returns. With `batches=None` it only replays `cache` (a calibration cache from an earlier
    build, e.g. on rebuild). The device buffer is allocated during the build, on the device the build runs on."""
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        raise ExportError(f"TensorRT {trt.__version__} has no IInt8EntropyCalibrator2 (implicit INT8 was removed in "
                          "TensorRT 11); build INT8 from a Q/DQ ONNX")
    from .cudart import CudaRuntime

    batch_list = [np.ascontiguousarray(b, dtype=np.float32) for b in (batches or [])]
    if not batch_list and not (cache and cache.exists()):
        raise ExportError("implicit INT8 calibration needs calibration images or a calibration cache; got neither")
    cuda = CudaRuntime()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._iter = iter(batch_list)
            self._ptr = 0
            self._capacity = 0
            self.used = 0

        def get_batch_size(self) -> int:
            # Networks are explicit-batch: the batch is the first dimension of the OPT shape each buffer holds,
            # so the implicit-batch "batch size" is 1, as Polygraphy's calibrator reports it.
            return 1

        def get_batch(self, names):
            batch = next(self._iter, None)
            if batch is None:
                return None
            if batch.nbytes > self._capacity:
                self.free()
                self._ptr, self._capacity = cuda.malloc(batch.nbytes), batch.nbytes
            cuda.memcpy_htod(self._ptr, batch)
            self.used += 1
            if self.used % 16 == 0:
                log.info("INT8 calibration: %d/%d batches", self.used, len(batch_list))
            return [int(self._ptr)]

        # Called by TensorRT from C++: an exception must not cross back into it, so file errors are logged.
        def read_calibration_cache(self):
            if cache is not None and cache.exists():
                try:
                    data = cache.read_bytes()
                except OSError as e:
                    log.warning("calibration cache %s cannot be read (%s); calibrating from the images", cache,
                                e.strerror or e)
                    return None
                log.info("INT8 calibration: reusing %s", cache)
                return data
            return None

        def write_calibration_cache(self, data) -> None:
            if cache is not None:
                try:
                    atomic_write_bytes(cache, bytes(data))
                except OSError as e:
                    log.warning("calibration table not saved to %s (%s); the engine is fine, but a rebuild will "
                                "need the calibration images again", cache, e.strerror or e)

        def free(self) -> None:
            if self._ptr:
                cuda.free(self._ptr)
                self._ptr, self._capacity = 0, 0

    return EntropyCalibrator()


def numpy_dtype(trt, dtype) -> np.dtype | None:
    """The numpy dtype of a tensorrt.DataType, or None for the types numpy lacks (BF16, FP8, INT4, FP4), for which
    `trt.nptype` raises TypeError."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        return None


def dtype_label(dtype) -> str:
    """`DataType.BF16` -> "BF16"."""
    return str(dtype).rsplit(".", 1)[-1]


def _np_dtype_name(trt, dtype) -> str:
    np_type = numpy_dtype(trt, dtype)
    return np_type.name if np_type is not None else dtype_label(dtype).lower()  # bf16, fp8: no numpy type


def make_device_current(device: int) -> None:
    """Make CUDA device `device` current on this thread: TensorRT builds (and the calibrator allocates) on the
    calling thread's current device. cuda-python's cudaSetDevice makes that device's primary context current,
    which is the context TensorRT's own CUDA runtime then uses."""
    from .cudart import CudaRuntime

    try:
        cuda = CudaRuntime()
    except DependencyError as e:
        if device == 0:
            return  # device 0 is current unless something chose another
        raise ExportError(f"building on CUDA device {device} needs cuda-python to select it ({e})") from e
    try:
        cuda.set_device(device)
    except BackendError as e:
        raise ExportError(f"cannot select CUDA device {device}: {e}") from e


# ---- building --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltEngine:
    data: bytes
    io: tuple[TensorDesc, ...]
    seconds: float
    tensorrt: str


def build_serialized_engine(onnx_path: str | Path, *, plan: PrecisionPlan, options: EngineBuildOptions,
                            profiles: Sequence[Sequence[ProfileShapes]], calibrator: Any = None) -> BuiltEngine:
    """Parse `onnx_path` and build a serialized engine. Raises ExportError with TensorRT's reasons."""
    trt = import_tensorrt()
    logger = make_logger(trt)
    make_device_current(options.device)
    builder = _create_builder(trt, logger)
    # The parser owns the weights the network points to: `parser` keeps it alive until the engine is built.
    network, parser = _parse_onnx(trt, builder, logger, onnx_path, strongly_typed=plan.strongly_typed)
    config = builder.create_builder_config()
    _configure(trt, builder, config, plan, options)
    dynamic = _dynamic_inputs(network)
    trt_profiles = _add_profiles(builder, config, network, profiles, dynamic) if dynamic else []
    if plan.calibrate:
        if calibrator is None:
            raise ExportError("implicit INT8 needs a calibrator (calibration images)")
        config.int8_calibrator = calibrator
        if trt_profiles:  # calibration runs at this profile's OPT shape: the calibrator's batches have that shape
            config.set_calibration_profile(trt_profiles[0])
    if options.timing_cache is not None:
        _use_timing_cache(config, options.timing_cache)

    monitor = make_progress_monitor(trt, options.progress_interval_s)
    if monitor is not None:
        config.progress_monitor = monitor
    log.info("building a TensorRT %s engine from %s (%s)%s", trt.__version__, Path(onnx_path).name, plan.summary,
             f", profiles: {'; '.join(p.describe() for profile in profiles for p in profile)}" if dynamic else "")
    start = time.monotonic()
    if monitor is None:
        with Heartbeat(options.progress_interval_s):
            serialized = builder.build_serialized_network(network, config)
    else:
        serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - start
    if serialized is None:
        reasons = "; ".join(logger.errors[-5:]) or "TensorRT gave no reason (run with --verbose)"
        raise ExportError(f"TensorRT {trt.__version__} could not build the engine from {onnx_path}: {reasons}")
    if options.timing_cache is not None:
        _save_timing_cache(config, options.timing_cache)
    return BuiltEngine(bytes(memoryview(serialized)), _io_descs(trt, network), seconds, str(trt.__version__))


def _create_builder(trt, logger):
    try:
        return trt.Builder(logger)
    except (RuntimeError, TypeError) as e:
        raise ExportError(f"TensorRT {trt.__version__} could not create a builder (no usable GPU?): "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
                          "see `edgepix doctor`") from e


def _parse_onnx(trt, builder, logger, onnx_path: str | Path, *, strongly_typed: bool):
    """(the network parsed from `onnx_path`, the parser, which owns the network's weights)."""
    flags = 0
    if strongly_typed and trt_major(trt.__version__) < 11:  # TensorRT 11 is always strongly typed (flag deprecated)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser) or logger.errors or ["no reason given"]
        raise ExportError(f"TensorRT {trt.__version__} could not parse {onnx_path} ({len(errors)} error"
                          f"{'s' if len(errors) != 1 else ''}):\n" + "\n".join(f"  {e}" for e in errors))
    return network, parser


def _configure(trt, builder, config, plan: PrecisionPlan, options: EngineBuildOptions) -> None:
    """Workspace, optimization level, the plan's precision flags and the DLA core."""
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    for name in plan.flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise ExportError(f"TensorRT {trt.__version__} has no BuilderFlag.{name} (needed for: {plan.summary})")
        config.set_flag(flag)
    if options.dla_core is not None:
        n_dla = int(getattr(builder, "num_DLA_cores", 0) or 0)
        if n_dla == 0:
            raise ExportError(f"--dla-core {options.dla_core}: this device has no DLA cores (DLA exists on Jetson "
                              "AGX/NX "
                              f"Orin and Xavier; TensorRT {trt.__version__} reports none)")
        if options.dla_core >= n_dla:
            raise ExportError(f"--dla-core {options.dla_core}: this device has {n_dla} DLA core(s): 0..{n_dla - 1}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def _network_inputs(network) -> list:
    return [network.get_input(i) for i in range(network.num_inputs)]


def _dynamic_inputs(network) -> list[str]:
    return [t.name for t in _network_inputs(network) if any(int(d) < 0 for d in t.shape)]


def _add_profiles(builder, config, network, profiles: Sequence[Sequence[ProfileShapes]],
                  dynamic: list[str]) -> list:
    """One optimization profile per entry of `profiles`, each giving every `dynamic` input its shapes."""
    inputs = _network_inputs(network)
    trt_profiles = []
    for index, profile in enumerate(profiles):
        by_name = {p.input: p for p in profile}
        missing = [n for n in dynamic if n not in by_name]
        if missing:
            raise ExportError(f"profile {index} gives no shapes for dynamic input(s) {missing}; pass --batch "
                              "(and --imgsz-range) so edgepix can make one")
        p = builder.create_optimization_profile()
        for t in inputs:
            if t.name in by_name:
                s = by_name[t.name]
                p.set_shape(t.name, s.min, s.opt, s.max)
        config.add_optimization_profile(p)
        trt_profiles.append(p)
    return trt_profiles


def _use_timing_cache(config, path: Path) -> None:
    """Start the build from the timing cache at `path` (a new one when it is missing, unreadable or made on
    another device or TensorRT)."""
    try:
        blob = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        log.warning("timing cache %s cannot be read (%s); starting a new one", path, e.strerror or e)
        blob = b""
    timing_cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(timing_cache, False):
        log.warning("timing cache %s was made on another device or TensorRT; starting a new one", path)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)
    elif blob:
        log.info("timing cache: reusing %s (%d KB)", path, len(blob) // 1024)


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        try:
            atomic_write_bytes(path, bytes(memoryview(cache.serialize())))
        except OSError as e:  # it only saves time on the next build: not a reason to lose this one
            log.warning("timing cache not saved to %s (%s); the engine is fine, the next build times its "
                        "kernels again", path, e.strerror or e)


def _io_descs(trt, network) -> tuple[TensorDesc, ...]:
    """The network's inputs and outputs as the manifest records them (shapes with -1 where dynamic)."""
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return tuple(
        TensorDesc(t.name, mode, _np_dtype_name(trt, t.dtype), tuple(int(d) for d in t.shape))
        for mode, tensors in (("input", _network_inputs(network)), ("output", outputs))
        for t in tensors)


# ---- build into the cache and place the engine ----------------------------------------------------------


@dataclass(frozen=True)
class EngineBuildResult:
    path: Path
    manifest: EngineManifest
    reused: bool  # True when the engine came from the cache without building
    seconds: float


def device_facts_for_build(device: int) -> DeviceFacts:
    facts = running_device_facts(device)
    trt = import_tensorrt()
    facts = DeviceFacts(str(trt.__version__), facts.cuda, facts.gpu, facts.compute_capability)
    if not facts.gpu or not facts.compute_capability:
        raise ExportError(f"building a TensorRT engine needs an NVIDIA GPU, and none is visible here "
                          f"(device {device}); check `edgepix doctor` (cuda-python: pip install 'edgepix[gpu]')")
    return facts


def _relative_onnx(onnx_path: Path, engine_path: Path) -> str:
    onnx_path = onnx_path.resolve()
    return onnx_path.name if onnx_path.parent == engine_path.resolve().parent else str(onnx_path)


def calibration_table_path(engine_path: Path) -> Path:
    """`model.int8.engine` -> `model.int8.engine.calib`: the INT8 calibration table that travels with an engine."""
    return engine_path.with_name(engine_path.name + ".calib")


def place_engine(source: Path, manifest: EngineManifest, out: Path, onnx_path: Path) -> EngineManifest:
    """Copy a cached engine to `out` (atomically) and write its manifest, with the ONNX path relative to `out`.

    An implicit-INT8 engine's calibration table is copied beside it too (`<out>.calib`, recorded by name): the
    entropy calibrator's table is portable between devices, so a rebuild on the device replays it instead of
    needing the calibration images."""
    placed = dataclasses.replace(manifest, onnx=_relative_onnx(onnx_path, out))
    table = manifest.builder.get("calibration_cache")
    try:
        if source.resolve() != out.resolve():
            with atomic_output(out) as part:
                shutil.copyfile(source, part)
        if isinstance(table, str) and Path(table).is_absolute() and Path(table).is_file():
            beside = calibration_table_path(out)
            if Path(table).resolve() != beside.resolve():
                with atomic_output(beside) as part:
                    shutil.copyfile(table, part)
            placed = dataclasses.replace(placed, builder={**placed.builder, "calibration_cache": beside.name})
        write_manifest(out, placed)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
    return placed


def build_engine_file(onnx_path: str | Path, out: str | Path, *, spec: ModelSpec, options: EngineBuildOptions,
                      profiles: Sequence[Sequence[ProfileShapes]], cache_dir: str | Path | None = None,
                      rebuild: bool = False, calibration: Iterable[np.ndarray] | None = None,
                      onnx_spec: ModelSpec | None = None) -> EngineBuildResult:
    """Build (or reuse from the cache) an engine for `onnx_path` and write it to `out` with `<out>.json`.

    `spec` is what the manifest records for the runtime; `onnx_spec` (default `spec`) is the ONNX's own spec, used
    to plan the precision path."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX file not found: {onnx_path}")
    facts = device_facts_for_build(options.device)
    plan = plan_precision(options.precision, onnx_spec or spec, trt_major(facts.tensorrt or ""),
                          dla=options.dla_core is not None, int8_mode=options.int8_mode)
    sha = file_sha256(onnx_path)
    profiles = tuple(tuple(p) for p in profiles)
    key_options = options.key_options()
    batches = None
    if plan.calibrate:  # the calibration images shape the engine too
        if not profiles or len(profiles[0]) != 1:
            raise ExportError("implicit INT8 calibration feeds one input; this ONNX has "
                              f"{len(profiles[0]) if profiles else 0}: build INT8 from a Q/DQ ONNX instead")
        batches = calibration_batches_at(list(calibration or []), profiles[0][0].opt)
        h = hashlib.sha256()
        for b in batches:
            h.update(b.tobytes())
        key_options["calibration_sha256"] = h.hexdigest() if batches else "cache-only"
    # The same TensorRT version is built for CUDA 12 and for CUDA 13; their engines are not interchangeable.
    trt_cuda = tensorrt_cuda_variant()
    key = cache_key(onnx_sha256=sha, tensorrt=facts.tensorrt or "", gpu=facts.gpu or "",
                    compute_capability=facts.compute_capability or "", precision=options.precision.value,
                    profiles=profiles, options=key_options, tensorrt_cuda=trt_cuda or "")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = cache_entry_name(spec.model_name, options.precision.value, facts.compute_capability or "",
                            facts.tensorrt or "", key)
    hit = None if rebuild else cached_engine(cache_dir, name, key)
    if hit is not None:
        from .manifest import read_manifest

        log.info("engine cache: reusing %s (same ONNX, TensorRT, GPU, precision and profiles; --rebuild to build "
                 "again)", hit)
        return EngineBuildResult(out, place_engine(hit, read_manifest(hit), out, onnx_path), True, 0.0)

    calibrator = None
    if plan.calibrate:
        trt = import_tensorrt()
        # keyed like the engine: other calibration images never reuse this table
        cal_cache = options.calibration_cache or (cache_dir / (Path(name).stem + ".calib"))
        options = dataclasses.replace(options, calibration_cache=cal_cache)
        calibrator = make_entropy_calibrator(trt, batches, cal_cache)
    try:
        built = build_serialized_engine(onnx_path, plan=plan, options=options, profiles=profiles,
                                        calibrator=calibrator)
    finally:
        if calibrator is not None:
            calibrator.free()
    manifest = EngineManifest(
        spec=spec, tensorrt=built.tensorrt, cuda=facts.cuda, gpu=facts.gpu or "",
        compute_capability=facts.compute_capability or "", onnx_sha256=sha, precision=options.precision.value,
        profiles=profiles, built=now_iso(), builder={**options.record(), "plan": plan.summary,
                                                     "tensorrt_cuda": trt_cuda,
                                                     "build_seconds": round(built.seconds, 1)},
        onnx=str(onnx_path.resolve()), io=built.io, cache_key=key, edgepix=_edgepix_version())
    entry = cache_dir / name
    try:
        atomic_write_bytes(entry, built.data)
        write_manifest(entry, manifest)
    except OSError as e:
        log.warning("engine cache %s is not writable (%s); writing %s only", cache_dir, e.strerror or e, out)
        entry = None
    if entry is None:
        try:
            atomic_write_bytes(out, built.data)
        except OSError as e:
            raise ExportError(f"cannot write {out}: {e.strerror or e}") from e
        entry = out
    placed = place_engine(entry, manifest, out, onnx_path)
    log.info("built %s in %.1f s (%.2f MB)", out, built.seconds, len(built.data) / 1e6)
    return EngineBuildResult(out, placed, False, built.seconds)


def rebuild_from_manifest(engine_path: str | Path, manifest: EngineManifest, *,
                          cache_dir: str | Path | None = None) -> EngineBuildResult:
    """Rebuild an engine on this machine from the ONNX its manifest names, with the recorded options and profiles."""
    engine_path = Path(engine_path)
    onnx = manifest.onnx_path(engine_path)
    if onnx is None or not onnx.is_file():
        raise ExportError(f"cannot rebuild {engine_path.name}: the ONNX it was built from "
                          f"({manifest.onnx or 'not recorded'}) is not at {onnx or 'a known path'}; copy it beside the "
                          "engine, or build again with `edgepix export MODEL.onnx --format engine`")
    if file_sha256(onnx) != manifest.onnx_sha256:
        log.warning("%s changed since %s was built (sha256 differs); rebuilding from the current file", onnx,
                    engine_path.name)
    options = EngineBuildOptions.from_record(manifest.builder)
    # The recorded cache paths are the build machine's (and a rebuild runs on another device or TensorRT):
    # - the timing cache becomes this device's own, in this machine's engine cache (timings are per device and
    #   TensorRT version; another device's cache would be refused anyway);
    # - the calibration table is the one that travels with the engine (see `place_engine`).
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    facts = device_facts_for_build(options.device)
    options = dataclasses.replace(options, timing_cache=cache_dir / timing_cache_name(facts),
                                  calibration_cache=_calibration_table(engine_path, manifest))
    onnx_spec = _onnx_spec(onnx) or manifest.spec
    return build_engine_file(onnx, engine_path, spec=manifest.spec, options=options, profiles=manifest.profiles,
                             cache_dir=cache_dir, rebuild=False, onnx_spec=onnx_spec)


def timing_cache_name(facts: DeviceFacts) -> str:
    """e.g. `timing-orin-sm87-trt10.3.0.cache`: one timing cache per GPU model and TensorRT version."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"

    cc = (facts.compute_capability or "").replace(".", "")
    return f"timing-{slug(facts.gpu or '')}-sm{cc}-trt{slug(facts.tensorrt or '')}.cache"


def _calibration_table(engine_path: Path, manifest: EngineManifest) -> Path | None:
    """The calibration table a rebuild replays: the one the manifest names beside the engine, else the recorded
    absolute path if it exists here, else `<engine>.calib`; None when there is none (no calibration, or lost)."""
    recorded = manifest.builder.get("calibration_cache")
    candidates = []
    if isinstance(recorded, str) and recorded:
        p = Path(recorded)
        candidates.append(p if p.is_absolute() else engine_path.parent / p)
    candidates.append(calibration_table_path(engine_path))
    return next((p for p in candidates if p.is_file()), None)


def _onnx_spec(path: Path) -> ModelSpec | None:
    try:
        return ModelSpec.from_onnx(path)
    except EdgepixError as e:  # unreadable metadata: fall back to the manifest's spec, and say so
        log.warning("could not read the spec from %s (%s); using the manifest's", path, e)
        return None


def _edgepix_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgepix")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return ""


__all__ = [
    "BuiltEngine", "EngineBuildOptions", "EngineBuildResult", "Heartbeat", "Int8Mode", "PrecisionPlan",
    "build_engine_file", "build_serialized_engine", "calibration_batches_at", "calibration_table_path",
    "device_facts_for_build", "dtype_label", "format_parser_error", "import_tensorrt", "make_device_current",
    "make_entropy_calibrator", "make_logger", "make_progress_monitor", "manifest_path", "numpy_dtype",
    "parser_errors", "place_engine", "plan_precision", "rebuild_from_manifest", "timing_cache_name", "trt_major",
]
