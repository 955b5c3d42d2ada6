"""The `openvino` backend: Intel's OpenVINO runtime reading the ONNX file directly (no IR conversion step).

Intel CPUs, integrated GPUs and NPUs are the other large family of edge devices; OpenVINO also runs well on AMD
and ARM CPUs. edgepix measures and tests the CPU device. OpenVINO's "GPU" (Intel integrated and discrete GPUs) and
"NPU" (Intel Core Ultra) devices are reachable with `device="GPU"` / `device="NPU"` where OpenVINO lists them
(`openvino.Core().available_devices`), but edgepix has not measured or verified them.

Precision: OpenVINO's CPU plugin runs FP32 models in bfloat16 by default on CPUs with AVX-512-BF16 or AMX
(its `INFERENCE_PRECISION_HINT`), which rounds activations to 8 significant bits. The parity gate checked FP32
arithmetic, so this backend asks for f32 unless `inference_precision` says otherwise; INT8 (QDQ) graphs still run
their quantized layers in int8 either way.

Input and output names, dtypes and the edgepix spec come from `description.onnxproto`, as for the opencv backend, so
what this backend reports matches the file whatever OpenVINO renames internally. `import openvino` happens when a
backend is created, never when edgepix.runtime is imported.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.errors import BackendError, DependencyError, ModelFormatError
from ..description.onnxedit import ClassMapFusion, append_argmax_file
from ..description.onnxproto import read_onnx_header
from ..description.tensors import TensorMeta, dtype_from_onnx, normalise_dim
from .base import Backend

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgepix[openvino]'"


class OpenVINOPrecision(str, enum.Enum):
    """OpenVINO's INFERENCE_PRECISION_HINT for floating-point layers."""

    F32 = "f32"  # what the parity gate checked (the default here)
    BF16 = "bf16"  # AVX-512-BF16 / AMX CPUs: faster, ~3 significant digits
    F16 = "f16"  # GPUs, NPUs and ARM CPUs with FP16 arithmetic
    DEFAULT = "default"  # leave OpenVINO's own choice for the device (bf16 on CPUs that have it)


class OpenVINOHint(str, enum.Enum):
    """OpenVINO's PERFORMANCE_HINT: one request as fast as possible, or many in flight."""

    LATENCY = "latency"
    THROUGHPUT = "throughput"


@dataclass(frozen=True, kw_only=True)
class OpenVINOOptions:
    device: str = "CPU"  # an OpenVINO device name: CPU (tested), GPU, NPU, AUTO (not verified by edgepix)
    threads: int | None = None  # INFERENCE_NUM_THREADS; None: OpenVINO's default (all cores)
    inference_precision: OpenVINOPrecision = OpenVINOPrecision.F32
    performance_hint: OpenVINOHint = OpenVINOHint.LATENCY
    cache_dir: str | None = None  # OpenVINO's compiled-model cache (CACHE_DIR): faster second loads

    def __post_init__(self) -> None:
        for name, enum_type in (("inference_precision", OpenVINOPrecision), ("performance_hint", OpenVINOHint)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                valid = ", ".join(repr(m.value) for m in enum_type)
                raise BackendError(f"{name}: expected one of {valid}, got {getattr(self, name)!r}") from None
        if not isinstance(self.device, str) or not self.device:
            raise BackendError(f"device: expected an OpenVINO device name such as 'CPU', got {self.device!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise BackendError(f"threads: expected a positive integer or None, got {self.threads!r}")


def import_openvino():
    """The openvino module, or DependencyError whose one line says how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise DependencyError(f"the openvino backend needs the Python package 'openvino' ({e}); install it with: "
                              f"{INSTALL_HINT}") from e
    return openvino


def compile_config(options: OpenVINOOptions) -> dict[str, str]:
    """The compile_model properties `options` stand for (string values: OpenVINO parses them per device)."""
    config = {"PERFORMANCE_HINT": options.performance_hint.value.upper()}
    if options.threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(options.threads)
    if options.inference_precision is not OpenVINOPrecision.DEFAULT:
        config["INFERENCE_PRECISION_HINT"] = options.inference_precision.value
    if options.cache_dir is not None:
        config["CACHE_DIR"] = str(options.cache_dir)
    return config


class OpenVINOBackend(Backend):
    """OpenVINO on the CPU (or another OpenVINO device), one synchronous infer request."""

    name = "openvino"
    options_type = OpenVINOOptions
    supports_fused_argmax = True
    # One InferRequest per backend: a request holds its own input and output tensors and runs one inference at a
    # time (OpenVINO shares the CompiledModel between threads, each with a request of its own).
    thread_safe = False

    def __init__(self, path: str | os.PathLike, *, options: OpenVINOOptions | None = None,
                 fuse_argmax: ClassMapFusion | None = None) -> None:
        super().__init__(path)
        self.options = options if options is not None else OpenVINOOptions()
        ov = import_openvino()
        header = read_onnx_header(path)  # ModelFormatError for a missing or non-ONNX file
        self.metadata = dict(header.metadata)
        self.inputs = tuple(TensorMeta(v.name, dtype_from_onnx(v.dtype, tensor=v.name, path=path),
                                       tuple(normalise_dim(d) for d in v.shape)) for v in header.inputs)
        outputs = [TensorMeta(v.name, dtype_from_onnx(v.dtype, tensor=v.name, path=path),
                              tuple(normalise_dim(d) for d in v.shape)) for v in header.outputs]
        core = ov.Core()
        devices = list(core.available_devices)
        device_kind = self.options.device.split(".")[0]  # "GPU.1" -> "GPU"; AUTO:..., HETERO:... pass through
        if device_kind in ("CPU", "GPU", "NPU") and device_kind not in {d.split(".")[0] for d in devices}:
            raise BackendError(f"openvino device {self.options.device!r} is not here; OpenVINO "
                               f"{ov.__version__.split('-')[0]} sees {', '.join(devices) or 'no device'}")
        model = None
        if fuse_argmax is not None:
            try:
                graph, class_map = append_argmax_file(self.path, fuse_argmax)
                model = core.read_model(graph)  # ONNX bytes; weights inside the file
                self.fused_argmax = class_map
            except (ModelFormatError, OSError, RuntimeError) as e:
                # e.g. weights in external data files, which a model read from bytes cannot find
                log.debug("%s: running without a fused argmax (%s)", self.path.name, e)
                model = None
        if model is None:
            try:
                model = core.read_model(str(self.path))
            except RuntimeError as e:
                raise ModelFormatError(f"{self.path}: OpenVINO cannot read this ONNX model: {_first_line(e)}") from e
        if self.fused_argmax is not None:
            outputs = [TensorMeta(self.fused_argmax, np.dtype(np.uint8), fuse_argmax.class_map_shape(t.shape))
                       if t.name == fuse_argmax.output else t for t in outputs]
        self.outputs = tuple(outputs)
        try:
            self.compiled = core.compile_model(model, self.options.device, compile_config(self.options))
        except RuntimeError as e:
            raise BackendError(f"openvino could not compile {self.path.name} for {self.options.device}: "
                               f"{_first_line(e)}") from e
        self._ports = {}
        for t in self.outputs:
            try:
                self._ports[t.name] = self.compiled.output(t.name)
            except RuntimeError as e:
                raise ModelFormatError(f"{self.path.name}: OpenVINO has no output named {t.name!r} "
                                       f"({_first_line(e)})") from e
        self.request = self.compiled.create_infer_request()
        self.version = ov.__version__
        self.precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT")) \
            if self.options.device.startswith("CPU") else self.options.inference_precision.value
        self.threads = self.compiled.get_property("INFERENCE_NUM_THREADS") \
            if self.options.device.startswith("CPU") else None

    @property
    def description(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        fused = ", argmax fused into the graph" if self.fused_argmax else ""
        return (f"openvino (OpenVINO {self.version.split('-')[0]}, {self.options.device}{threads}, precision "
                f"{self.precision}, hint {self.options.performance_hint.value}{fused})")

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            # share_inputs: OpenVINO reads the caller's arrays in place (the call is synchronous); the outputs are
            # copies, owned by the caller, as the Backend contract says.
            results = self.request.infer({name: np.ascontiguousarray(a) for name, a in feed.items()},
                                         share_inputs=True, share_outputs=False)
        except RuntimeError as e:
            raise BackendError(f"{self.path.name}: the model failed while running in OpenVINO "
                               f"({_first_line(e)})") from e
        return {name: results[port] for name, port in self._ports.items()}

    def close_impl(self) -> None:
        self.request = None
        self.compiled = None


def _type_name(value) -> str:
    """An OpenVINO element type as its short name ('f32', 'bf16')."""
    to_string = getattr(value, "to_string", None)
    return to_string() if callable(to_string) else str(value)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # OpenVINO's messages start with "Exception from src/...cpp:123:" and put the reason on a later line
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(e).__name__])[0][:300]
