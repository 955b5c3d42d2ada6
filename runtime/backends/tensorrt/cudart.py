"""A thin, checked wrapper over cuda-python's CUDA runtime bindings (no torch, no pycuda).

cuda-python returns `(cudaError_t, *results)` tuples instead of raising; `CudaRuntime.call` turns a failure into a
BackendError that names the call and CUDA's own error name and text. The module is imported lazily: from
`cuda.bindings.runtime` (cuda-python >= 12.6, and 13.x) or `cuda.cudart` (older releases).

Only what the TensorRT backend and the INT8 calibrator need is wrapped: device memory, pinned host memory, async
copies, streams, events, and CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

import numpy as np

from ...core.errors import BackendError, DependencyError

_MODULES = ("cuda.bindings.runtime", "cuda.cudart")


def import_cudart():
    """The cuda-python runtime module, or DependencyError with the install line."""
    errors = []
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise DependencyError("the native TensorRT backend needs cuda-python for device buffers and streams "
                          f"({'; '.join(errors)}); install it with: pip install 'edgepix[gpu]'")


class CudaRuntime:
    """Checked CUDA runtime calls. `module` is cuda-python's runtime module (a stand-in in tests)."""

    def __init__(self, module: Any | None = None) -> None:
        self.rt = module if module is not None else import_cudart()

    # ---- error handling --------------------------------------------------------------------------------

    def _failed(self, err: Any) -> bool:
        return int(err) != 0

    def describe_error(self, err: Any) -> str:
        name = text = ""
        try:
            e1, raw_name = self.rt.cudaGetErrorName(err)
            e2, raw_text = self.rt.cudaGetErrorString(err)
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            text = raw_text.decode() if isinstance(raw_text, bytes) else str(raw_text)
        except (AttributeError, TypeError, ValueError):
            pass
        return f"{name or err} ({text})" if text else str(name or err)

    def call(self, fn_name: str, *args: Any) -> Any:
        """Call `cudart.<fn_name>(*args)`; return its result (None, one value, or a tuple); raise on failure."""
        result = getattr(self.rt, fn_name)(*args)
        if not isinstance(result, tuple):
            result = (result,)
        err, values = result[0], result[1:]
        if self._failed(err):
            hint = ""
            if int(err) in (35, 100):  # cudaErrorInsufficientDriver, cudaErrorNoDevice
                hint = "; is there an NVIDIA GPU and driver? see `edgepix doctor`"
            raise BackendError(f"CUDA {fn_name} failed: {self.describe_error(err)}{hint}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    # ---- device ----------------------------------------------------------------------------------------

    def set_device(self, device: int) -> None:
        """Make `device` the calling thread's current device (CUDA's current device is per thread: a new thread
        starts on device 0, whatever device another thread chose)."""
        self.call("cudaSetDevice", device)

    # ---- memory ----------------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", ptr)

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: what makes cudaMemcpyAsync truly asynchronous."""
        return int(self.call("cudaMallocHost", max(int(nbytes), 1)))

    def free_host(self, ptr: int) -> None:
        self.call("cudaFreeHost", ptr)

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync", dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync", dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def memcpy_htod(self, dst: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.call("cudaMemcpy", dst, array.ctypes.data, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)

    # ---- streams, events, graphs -----------------------------------------------------------------------

    def stream_create(self) -> Any:
        return self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)

    def stream_destroy(self, stream: Any) -> None:
        self.call("cudaStreamDestroy", stream)

    def stream_synchronize(self, stream: Any) -> None:
        self.call("cudaStreamSynchronize", stream)

    def event_create(self) -> Any:
        return self.call("cudaEventCreate")

    def event_destroy(self, event: Any) -> None:
        self.call("cudaEventDestroy", event)

    def event_record(self, event: Any, stream: Any) -> None:
        self.call("cudaEventRecord", event, stream)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        return float(self.call("cudaEventElapsedTime", start, end))

    def begin_capture(self, stream: Any) -> None:
        """Start capturing `stream` into a graph, in the thread-local mode: only this thread's unsafe CUDA calls
        (cudaMalloc and the like) are refused while it captures, so other threads running other engines go on
        (the global mode would make their calls fail, or invalidate this capture)."""
        self.call("cudaStreamBeginCapture", stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)

    def end_capture(self, stream: Any) -> Any:
        return self.call("cudaStreamEndCapture", stream)

    def graph_instantiate(self, graph: Any) -> Any:
        return self.call("cudaGraphInstantiate", graph, 0)

    def graph_launch(self, graph_exec: Any, stream: Any) -> None:
        self.call("cudaGraphLaunch", graph_exec, stream)

    def graph_destroy(self, graph: Any) -> None:
        self.call("cudaGraphDestroy", graph)

    def graph_exec_destroy(self, graph_exec: Any) -> None:
        self.call("cudaGraphExecDestroy", graph_exec)


def stream_handle(stream: Any) -> int:
    """The integer handle TensorRT's `execute_async_v3(stream_handle)` takes, from a cudaStream_t or an int."""
    return int(stream)


def pinned_array(ptr: int, capacity_bytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of `shape` and `dtype` over pinned host memory at `ptr` (no copy; valid until freed)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > capacity_bytes:
        raise BackendError(f"internal: pinned buffer of {capacity_bytes} bytes cannot hold {shape} {dtype.name}")
    raw = (ctypes.c_uint8 * max(capacity_bytes, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
