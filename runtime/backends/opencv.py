"""The `opencv` backend: OpenCV's dnn module (`cv2.dnn.readNetFromONNX`), with a CUDA target when OpenCV has one.

Useful where ONNX Runtime is not installed (OpenCV alone runs the model) and as an independent second opinion on
ONNX Runtime's numbers. Input names and shapes and the edgepix spec come from `description.onnxproto`, which needs
neither `onnx` nor ONNX Runtime.

OpenCV 5 has two dnn engines: the new one (OpenCV's own default, CPU only) and the classic one (the only one with
CUDA, OpenCL and other targets). `engine="auto"` picks the classic engine: with OpenCV 5.0.0 the new engine
returned garbage for fastscnn (errors of 1e29 against ONNX Runtime) in about one process out of three, with one
thread or two, reproducible with `cv2.dnn.readNetFromONNX(path, cv2.dnn.ENGINE_NEW)` alone, while the classic
engine matched ONNX Runtime to 1e-4 in every process. `engine="new"` is there to try it. OpenCV 4.x has only the
classic engine and ignores the setting.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.errors import BackendError, ModelFormatError, require
from ..description.onnxproto import read_onnx_header
from ..description.tensors import TensorMeta, dtype_from_onnx, normalise_dim
from .base import Backend


class OpenCVTarget(str, enum.Enum):
    AUTO = "auto"  # CUDA when OpenCV was built with CUDA and sees a device, else CPU
    CPU = "cpu"
    CUDA = "cuda"
    CUDA_FP16 = "cuda-fp16"


class OpenCVEngine(str, enum.Enum):
    AUTO = "auto"  # the classic engine (see the module docstring)
    CLASSIC = "classic"
    NEW = "new"  # OpenCV 5's new engine, CPU only


@dataclass(frozen=True, kw_only=True)
class OpenCVOptions:
    target: OpenCVTarget = OpenCVTarget.AUTO
    engine: OpenCVEngine = OpenCVEngine.AUTO
    threads: int | None = None  # cv2.setNumThreads: process-wide in OpenCV; None leaves OpenCV's setting alone

    def __post_init__(self) -> None:
        for name, enum_type in (("target", OpenCVTarget), ("engine", OpenCVEngine)):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                valid = ", ".join(repr(m.value) for m in enum_type)
                raise BackendError(f"{name}: expected one of {valid}, got {getattr(self, name)!r}") from None
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BackendError(f"threads: expected a positive integer or None, got {self.threads!r}")


def opencv_cuda_devices(cv2) -> int:
    """CUDA devices OpenCV can use (0 for the pip wheels, which are built without CUDA)."""
    try:
        return int(cv2.cuda.getCudaEnabledDeviceCount())
    except (AttributeError, cv2.error):
        return 0


class OpenCVBackend(Backend):
    """cv2.dnn on the CPU, or on CUDA when OpenCV was built with it."""

    name = "opencv"
    options_type = OpenCVOptions
    thread_safe = False  # a cv2.dnn.Net holds its input blobs and layer buffers: setInput + forward is one state

    def __init__(self, path: str | os.PathLike, *, options: OpenCVOptions | None = None) -> None:
        super().__init__(path)
        self.options = options if options is not None else OpenCVOptions()
        cv2 = require("cv2", extra="cpu", purpose="The opencv backend")
        header = read_onnx_header(path)  # ModelFormatError for a missing or non-ONNX file
        self.metadata = dict(header.metadata)
        self.inputs = tuple(TensorMeta(v.name, dtype_from_onnx(v.dtype, tensor=v.name, path=path),
                                       tuple(normalise_dim(d) for d in v.shape)) for v in header.inputs)
        self.outputs = tuple(TensorMeta(v.name, dtype_from_onnx(v.dtype, tensor=v.name, path=path),
                                        tuple(normalise_dim(d) for d in v.shape)) for v in header.outputs)
        self._output_names = [t.name for t in self.outputs]

        target = self.options.target
        n_cuda = opencv_cuda_devices(cv2)
        if target is OpenCVTarget.AUTO:
            target = OpenCVTarget.CUDA if n_cuda else OpenCVTarget.CPU
        if target in (OpenCVTarget.CUDA, OpenCVTarget.CUDA_FP16) and not n_cuda:
            raise BackendError(
                f"opencv target {target.value!r}: this OpenCV {cv2.__version__} has no CUDA device (the pip wheels "
                "are built without CUDA); use target='cpu' or build OpenCV with CUDA and cuDNN")
        self.target = target
        engine = self.options.engine
        if engine is OpenCVEngine.AUTO:
            engine = OpenCVEngine.CLASSIC  # correct in every run, and the only one with CUDA targets
        if engine is OpenCVEngine.NEW and target is not OpenCVTarget.CPU:
            raise BackendError("opencv engine 'new' runs on the CPU only; use engine='classic' for CUDA targets")
        self.engine = engine
        engine_flag = {OpenCVEngine.AUTO: "ENGINE_AUTO", OpenCVEngine.CLASSIC: "ENGINE_CLASSIC",
                       OpenCVEngine.NEW: "ENGINE_NEW"}[engine]
        args = (getattr(cv2.dnn, engine_flag),) if hasattr(cv2.dnn, engine_flag) else ()  # OpenCV 4: no engines
        if self.options.threads is not None:
            cv2.setNumThreads(self.options.threads)
        try:
            self.net = cv2.dnn.readNetFromONNX(str(self.path), *args)
        except cv2.error as e:
            reason = _first_line(e)
            raise ModelFormatError(f"{self.path}: OpenCV dnn cannot load this ONNX model: {reason}") from e
        if self.net.empty():
            raise ModelFormatError(f"{self.path}: OpenCV dnn loaded an empty network")
        if target is not OpenCVTarget.CPU:
            self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_CUDA)
            self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CUDA_FP16 if target is OpenCVTarget.CUDA_FP16
                                         else cv2.dnn.DNN_TARGET_CUDA)
        self._cv2 = cv2

    @property
    def description(self) -> str:
        return f"opencv (OpenCV {self._cv2.__version__}, dnn engine {self.engine.value}, target {self.target.value})"

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in feed.items():
            self.net.setInput(np.ascontiguousarray(array), name)
        try:
            outputs = self.net.forward(self._output_names)
        except self._cv2.error as e:
            raise BackendError(f"opencv backend: inference failed: {_first_line(e)}") from e
        return {name: np.asarray(out) for name, out in zip(self._output_names, outputs)}

    def close_impl(self) -> None:
        self.net = None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # cv2.error messages look like "OpenCV(5.0.0) /path/file.cpp:123: error: (-2:Unspecified error) reason"
    return lines[-1] if lines else type(e).__name__
