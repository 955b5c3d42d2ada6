"""The native TensorRT backend (`tensorrt`): a serialized engine plus its manifest, run through cuda-python.

Loading checks the manifest (`<engine>.json`) against the running TensorRT and GPU before deserializing, so an engine
from another device or TensorRT version fails with one line naming both sides (TensorRT's own message is a
deserialization error); with `rebuild=True` the engine is rebuilt here from the ONNX the manifest names.

Inference (TensorRT's name-based API, TensorRT 10 and 11): the optimization profile that holds the input shape is
selected, `set_input_shape` fixes the dynamic dims, device buffers (cudaMalloc) are allocated per shape capacity and
bound with `set_tensor_address`, inputs are copied from pinned host buffers with cudaMemcpyAsync, `execute_async_v3`
runs on a non-blocking stream, outputs are copied back and the stream synchronized. CUDA events bracket each stage,
so `last_timings` holds H2D, compute and D2H times as trtexec reports them: inputs are staged into the pinned
buffers before the first event, and each event is recorded right after the enqueue it closes, so a window holds
only its stage's GPU work. Compute is measured on the stream from the end of H2D to the end of the kernels, as
trtexec's GPU Compute Time is; when the host enqueues more slowly than the GPU runs (`enqueue_ms`, trtexec's
Enqueue Time, larger than `compute_ms`) the GPU waits on the host inside that window, which a CUDA graph removes.
With `cuda_graph=True` and fixed shapes the `execute_async_v3` call is captured once into a CUDA graph and replayed;
the capture uses CUDA's thread-local mode, so engines running in other threads are not disturbed by it.

Threads: an instance is not thread-safe (`thread_safe` is False: one execution context, one stream, one set of
buffers); the stream pipeline gives each inference worker an instance of its own, and each worker thread calls
`bind_thread()` first, which makes the engine's device current in that thread.
"Fixed" comes from the optimization profiles (min == max): TensorRT reports -1 for every dimension that is dynamic
in the network, whatever the profile, so an engine built from a dynamic-batch ONNX with `--batch 4` is fixed.

An engine built for DLA (the manifest records its core) is deserialized with `IRuntime.DLA_core` set to that core,
or to `dla_core` when given. I/O tensors must have numpy types (BF16, FP8 and INT4 live inside engines, not at
their inputs and outputs here).

`tensorrt` and `cuda` (cuda-python) are imported when a backend is created, never at module import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import BackendError, EdgepixError, InputError, ModelFormatError
from ...description.onnxproto import check_model_path
from ...description.spec import ONNX_METADATA_KEY, ModelSpec
from ...description.tensors import TensorMeta, normalise_dim
from ..base import Backend
from .cudart import CudaRuntime, pinned_array, stream_handle
from .manifest import (
    EngineManifest,
    ProfileShapes,
    check_compatibility,
    read_manifest,
    running_device_facts,
    select_profile,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TensorRTOptions:
    device_id: int = 0
    dla_core: int | None = None  # DLA engines: run on this core; None: the core the manifest records
    rebuild: bool = False  # on a TensorRT/GPU mismatch, rebuild from the ONNX the manifest names (minutes)
    require_manifest: bool = True  # False: load a foreign engine without a manifest (no spec, no device check)
    cuda_graph: bool = False  # capture execute_async_v3 into a CUDA graph (engines with fixed shapes only)
    pinned: bool = True  # stage inputs/outputs in page-locked host memory (truly asynchronous copies)
    timing: bool = True  # CUDA events around H2D / compute / D2H -> `last_timings`
    cache_dir: Path | None = None  # engine cache used by rebuild; None: the default cache

    def __post_init__(self) -> None:
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise BackendError(f"device_id: expected a CUDA device index >= 0, got {self.device_id!r}")
        if self.dla_core is not None and (isinstance(self.dla_core, bool) or not isinstance(self.dla_core, int)
                                          or self.dla_core < 0):
            raise BackendError(f"dla_core: expected a DLA core index >= 0 or None, got {self.dla_core!r}")
        for name in ("rebuild", "require_manifest", "cuda_graph", "pinned", "timing"):
            if not isinstance(getattr(self, name), bool):
                raise BackendError(f"{name}: expected True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class StageTimes:
    """One inference's GPU-side stages in milliseconds, measured with CUDA events (trtexec's H2D Latency, GPU
    Compute Time and D2H Latency), and the host time of the enqueue call (trtexec's Enqueue Time)."""

    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    enqueue_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.h2d_ms + self.compute_ms + self.d2h_ms

    def as_dict(self) -> dict[str, float]:
        return {"h2d_ms": self.h2d_ms, "compute_ms": self.compute_ms, "d2h_ms": self.d2h_ms,
                "enqueue_ms": self.enqueue_ms}


class _Buffer:
    """A device buffer and (optionally) a pinned host buffer of the same capacity."""

    def __init__(self, cuda: CudaRuntime, nbytes: int, *, pinned: bool) -> None:
        self.cuda, self.nbytes = cuda, nbytes
        self.device = cuda.malloc(nbytes)
        self.host = cuda.malloc_host(nbytes) if pinned else 0

    def free(self) -> None:
        if self.device:
            self.cuda.free(self.device)
            self.device = 0
        if self.host:
            self.cuda.free_host(self.host)
            self.host = 0


def _volume(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) if len(shape) else 1


def _fixed_dims(shape: tuple[int, ...], entries: list[ProfileShapes]) -> tuple[int | None, ...]:
    """An input's shape with each dynamic (-1) dimension fixed where every profile has min == max at one value."""
    dims: list[int | None] = []
    for i, d in enumerate(shape):
        values = {e.min[i] for e in entries} | {e.max[i] for e in entries}
        dims.append(d if d >= 0 else (values.pop() if len(values) == 1 else None))
    return tuple(dims)


class TensorRTBackend(Backend):
    """A TensorRT engine built by `edgepix export --format engine` (or any engine, with require_manifest=False)."""

    name = "tensorrt"
    options_type = TensorRTOptions
    # One execution context, one stream and one set of device and pinned buffers: TensorRT's documentation says not
    # to call one IExecutionContext from several threads at once (each concurrent execution needs its own), and
    # the buffers are rebound per shape.
    thread_safe = False

    def __init__(self, path: str | os.PathLike, *, options: TensorRTOptions | None = None) -> None:
        super().__init__(path)
        self.options = options or TensorRTOptions()
        self._cuda: CudaRuntime | None = None
        self._stream = None
        self._events: list[Any] = []
        self._buffers: dict[str, _Buffer] = {}
        self._graph = self._graph_exec = None
        self._bound_shapes: dict[str, tuple[int, ...]] = {}
        self._profile_index: int | None = None
        self.context = self.engine = self.runtime = None
        self.last_timings: StageTimes | None = None
        self.manifest: EngineManifest | None = None
        path = check_model_path(path)
        try:
            self._load(path)
        except BaseException:
            self.close_impl()
            raise

    # ---- loading ---------------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        from .build import import_tensorrt, make_logger

        o = self.options
        self.manifest = manifest = self._checked_manifest(path)
        if manifest is not None:
            self.metadata = {ONNX_METADATA_KEY: manifest.spec.to_json()}
        try:
            trt = import_tensorrt()
        except EdgepixError as e:
            raise BackendError(str(e)) from e
        self._trt = trt
        self._cuda = CudaRuntime()
        self._cuda.set_device(o.device_id)
        self._logger = make_logger(trt)
        self.runtime = trt.Runtime(self._logger)
        self._choose_dla_core(path)
        self._deserialize(path)
        inputs, outputs = self._io_tensors(path)
        self.profiles = self._profile_shapes(inputs)
        # TensorRT reports -1 for every dimension that is dynamic in the network, even when every profile fixes
        # it (a dynamic-batch ONNX built with --batch 4): a dimension is fixed when all profiles agree on it.
        self.inputs = tuple(TensorMeta(name, dtype, _fixed_dims(shape, [e for profile in self.profiles
                                                                        for e in profile if e.input == name]))
                            for name, dtype, shape in inputs)
        self.outputs = tuple(TensorMeta(name, dtype, tuple(normalise_dim(d) for d in shape))
                             for name, dtype, shape in outputs)
        self._static = all(m.static for m in self.inputs)
        self._stream = self._cuda.stream_create()
        if o.timing:
            self._events = [self._cuda.event_create() for _ in range(4)]
        if o.cuda_graph and not self._static:
            log.warning("cuda_graph: %s has dynamic input shapes; CUDA graphs are used for fixed shapes only, "
                        "running without", path.name)

    def _checked_manifest(self, path: Path) -> EngineManifest | None:
        """The engine's manifest, checked against this TensorRT and GPU (and the engine rebuilt here on a mismatch
        when `rebuild`); None for an engine without one when `require_manifest` is off."""
        from .build import rebuild_from_manifest

        o = self.options
        try:
            manifest = read_manifest(path)
        except ModelFormatError:
            if o.require_manifest:
                raise
            log.warning("%s has no manifest: loading it without the TensorRT/GPU check and without a spec", path.name)
            return None
        here = running_device_facts(o.device_id)
        verdict = check_compatibility(manifest, here, engine_name=path.name,
                                      rebuild_hint="rebuild it here with --rebuild (or rebuild=True), from "
                                                   f"{manifest.onnx or 'its ONNX'}")
        if not verdict.ok:
            if not o.rebuild or not here.tensorrt or not here.gpu:
                raise BackendError(verdict.problem or "")
            log.warning("%s; rebuilding from %s", verdict.problem, manifest.onnx)
            try:
                manifest = rebuild_from_manifest(path, manifest, cache_dir=o.cache_dir).manifest
            except EdgepixError as e:
                raise BackendError(f"rebuilding {path.name} failed: {e}") from e
        for w in verdict.warnings:
            log.warning("%s", w)
        return manifest

    def _choose_dla_core(self, path: Path) -> None:
        """A DLA engine runs on the runtime's DLA core, which is unset (-1) by default: `dla_core`, else the core
        the manifest records."""
        manifest = self.manifest
        dla = self.options.dla_core
        if dla is None and manifest is not None:
            dla = manifest.builder.get("dla_core")
        if dla is None:
            return
        n_dla = int(self.runtime.num_DLA_cores)
        if not 0 <= int(dla) < n_dla:
            raise BackendError(f"{path.name} runs on DLA; dla_core {dla}: this device has {n_dla} DLA core(s)"
                               + (f": 0..{n_dla - 1}" if n_dla else " (DLA exists on Jetson AGX/NX Orin and "
                                  "Xavier)"))
        self.runtime.DLA_core = int(dla)

    def _deserialize(self, path: Path) -> None:
        """The engine from `path` and an execution context for it."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from e
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            reason = "; ".join(self._logger.errors[-3:]) or "no reason given"
            raise BackendError(f"TensorRT {self._trt.__version__} could not deserialize {path.name}: {reason}"
                               + ("" if self.manifest else "; engines load only with the TensorRT version and GPU "
                                  "that built them"))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {path.name} (out of GPU memory?)")

    def _io_tensors(self, path: Path) -> tuple[list, list]:
        """(inputs, outputs), each a list of (name, numpy dtype, shape as the engine reports it: -1 where dynamic)."""
        from .build import dtype_label, numpy_dtype

        trt, engine = self._trt, self.engine
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            trt_dtype = engine.get_tensor_dtype(name)
            dtype = numpy_dtype(trt, trt_dtype)
            if dtype is None:
                raise BackendError(f"{'input' if is_input else 'output'} {name!r} is {dtype_label(trt_dtype)} in "
                                   f"{path.name}, which numpy has no type for, and the tensorrt backend exchanges "
                                   "numpy arrays; build the engine from an ONNX whose inputs and outputs are "
                                   "float32, float16 or integers")
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            (inputs if is_input else outputs).append((name, dtype, shape))
        return inputs, outputs

    def _profile_shapes(self, inputs: list) -> list[tuple[ProfileShapes, ...]]:
        """Per optimization profile, per input: (min, opt, max) as TensorRT reports them."""
        profiles = []
        for p in range(self.engine.num_optimization_profiles):
            shapes = []
            for name, _, shape in inputs:
                if all(d >= 0 for d in shape):
                    shapes.append(ProfileShapes(name, shape, shape, shape))
                else:
                    lo, mid, hi = self.engine.get_tensor_profile_shape(name, p)
                    shapes.append(ProfileShapes(name, *(tuple(int(d) for d in s) for s in (lo, mid, hi))))
            profiles.append(tuple(shapes))
        return profiles

    @property
    def spec(self) -> ModelSpec | None:
        return self.manifest.spec if self.manifest is not None else None

    @property
    def description(self) -> str:
        trt = getattr(self, "_trt", None)
        version = getattr(trt, "__version__", "?")
        where = f"{self.manifest.gpu} sm {self.manifest.compute_capability}" if self.manifest else "GPU"
        extras = [f"TensorRT {version}", where]
        if self.manifest:
            extras.append(self.manifest.precision)
        if self.options.cuda_graph and self._static:
            extras.append("CUDA graph")
        return f"{self.name} ({', '.join(extras)})"

    @property
    def cuda_graph_active(self) -> bool:
        """True once inference replays a captured CUDA graph (after the first call with cuda_graph=True)."""
        return self._graph_exec is not None

    def optimal_shape(self, input_name: str, profile: int = 0) -> tuple[int, ...]:
        """The shape the engine was tuned for (the profile's opt shape)."""
        for p in self.profiles[profile]:
            if p.input == input_name:
                return p.opt
        raise InputError(f"unknown input {input_name!r}")

    # ---- inference -------------------------------------------------------------------------------------

    def bind_thread(self) -> None:
        """The calling thread's current CUDA device becomes the one this engine was loaded on (a thread starts on
        device 0, where this engine's context, stream and buffers do not live)."""
        if self._cuda is not None:
            self._cuda.set_device(self.options.device_id)

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        index = select_profile(self.profiles, shapes)
        if index is None:
            accepted = " | ".join("; ".join(p.describe() for p in profile) for profile in self.profiles)
            got = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
            raise InputError(f"input shape {got} is outside the engine's optimization profile(s): {accepted}; "
                             "rebuild the engine with --batch MIN OPT MAX / --imgsz-range for this shape")
        return index

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Select the profile, set input shapes, (re)allocate buffers and set tensor addresses for `shapes`."""
        cuda, ctx = self._cuda, self.context
        index = self._select_profile(shapes)
        if index != self._profile_index:
            if not ctx.set_optimization_profile_async(index, stream_handle(self._stream)):
                raise BackendError(f"TensorRT refused optimization profile {index}")
            self._profile_index = index
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise InputError(f"TensorRT refused shape {shape} for input {name!r}")
        all_shapes = dict(shapes)
        for meta in self.outputs:
            all_shapes[meta.name] = tuple(int(d) for d in ctx.get_tensor_shape(meta.name))
            if any(d < 0 for d in all_shapes[meta.name]):
                raise BackendError(f"output {meta.name!r} has a data-dependent shape {all_shapes[meta.name]}; the "
                                   "tensorrt backend supports outputs whose shape follows from the input shapes")
        for meta in (*self.inputs, *self.outputs):
            nbytes = _volume(all_shapes[meta.name]) * meta.dtype.itemsize
            buf = self._buffers.get(meta.name)
            if buf is None or buf.nbytes < nbytes:
                if buf is not None:
                    buf.free()
                buf = _Buffer(cuda, nbytes, pinned=self.options.pinned)
                self._buffers[meta.name] = buf
            ctx.set_tensor_address(meta.name, buf.device)
        self._bound_shapes = all_shapes
        self._drop_graph()

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self._cuda.graph_exec_destroy(self._graph_exec)
            self._graph_exec = None
        if self._graph is not None:
            self._cuda.graph_destroy(self._graph)
            self._graph = None

    def _capture_graph(self) -> None:
        """Capture one execute_async_v3 into a CUDA graph (after a normal run, as TensorRT requires)."""
        cuda, stream = self._cuda, self._stream
        cuda.begin_capture(stream)
        try:
            ok = self.context.execute_async_v3(stream_handle(stream))
        finally:
            graph = cuda.end_capture(stream)
        if not ok:
            cuda.graph_destroy(graph)
            raise BackendError("execute_async_v3 failed during CUDA graph capture")
        self._graph = graph
        self._graph_exec = cuda.graph_instantiate(graph)

    def _execute(self) -> None:
        if self._graph_exec is not None:
            self._cuda.graph_launch(self._graph_exec, self._stream)
            return
        if not self.context.execute_async_v3(stream_handle(self._stream)):
            reason = "; ".join(self._logger.errors[-3:]) or "no reason given"
            raise BackendError(f"TensorRT execute_async_v3 failed: {reason}")

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, stream, events = self._cuda, self._stream, self._events
        shapes = {m.name: tuple(int(d) for d in feed[m.name].shape) for m in self.inputs}
        if any(self._bound_shapes.get(n) != s for n, s in shapes.items()):
            self._bind(shapes)
        keep_alive = []  # pageable sources must outlive their async copies (until the sync below)
        copies = []  # (device, host, nbytes)
        # Host staging first (dtype conversion, the copy into pinned memory): it is not H2D time.
        for meta in self.inputs:
            array = np.ascontiguousarray(feed[meta.name], dtype=meta.dtype)
            buf = self._buffers[meta.name]
            if buf.host:
                np.copyto(pinned_array(buf.host, buf.nbytes, meta.dtype, array.shape), array)
                copies.append((buf.device, buf.host, array.nbytes))
            else:
                copies.append((buf.device, array.ctypes.data, array.nbytes))
                keep_alive.append(array)
        # From here on only enqueues: each event closes the stage enqueued just before it.
        if events:
            cuda.event_record(events[0], stream)
        for device, host, nbytes in copies:
            cuda.memcpy_htod_async(device, host, nbytes, stream)
        if events:
            cuda.event_record(events[1], stream)
        start = time.perf_counter()
        self._execute()
        enqueue_ms = (time.perf_counter() - start) * 1e3
        if events:
            cuda.event_record(events[2], stream)
        results: dict[str, np.ndarray] = {}
        for meta in self.outputs:
            shape = self._bound_shapes[meta.name]
            buf = self._buffers[meta.name]
            nbytes = _volume(shape) * meta.dtype.itemsize
            if buf.host:
                cuda.memcpy_dtoh_async(buf.host, buf.device, nbytes, stream)
            else:
                results[meta.name] = np.empty(shape, meta.dtype)
                cuda.memcpy_dtoh_async(results[meta.name].ctypes.data, buf.device, nbytes, stream)
        if events:
            cuda.event_record(events[3], stream)
        cuda.stream_synchronize(stream)
        for meta in self.outputs:
            buf = self._buffers[meta.name]
            if buf.host:  # copy out of the pinned buffer: the caller owns what infer() returns
                results[meta.name] = pinned_array(buf.host, buf.nbytes, meta.dtype,
                                                  self._bound_shapes[meta.name]).copy()
        if events:
            self.last_timings = StageTimes(cuda.event_elapsed_ms(events[0], events[1]),
                                           cuda.event_elapsed_ms(events[1], events[2]),
                                           cuda.event_elapsed_ms(events[2], events[3]), enqueue_ms)
        if self.options.cuda_graph and self._static and self._graph_exec is None:
            try:
                self._capture_graph()
            except BackendError as e:  # some engines cannot be captured; run them without a graph
                log.warning("CUDA graph capture failed for %s (%s); running without", self.path.name, e)
                self.options = dataclasses.replace(self.options, cuda_graph=False)
        return results

    # ---- resources -------------------------------------------------------------------------------------

    def close_impl(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            try:  # closing may happen in another thread than loading: free on the engine's device
                cuda.set_device(self.options.device_id)
            except BackendError as e:
                log.warning("closing %s: %s", self.path.name, e)
            if self._stream is not None:
                try:
                    cuda.stream_synchronize(self._stream)
                except BackendError as e:
                    log.warning("closing %s: %s", self.path.name, e)
            self._drop_graph()
            for buf in self._buffers.values():
                buf.free()
            for ev in self._events:
                cuda.event_destroy(ev)
            if self._stream is not None:
                cuda.stream_destroy(self._stream)
        self._buffers, self._events, self._stream = {}, [], None
        # TensorRT objects: the context before the engine before the runtime
        self.context = None
        self.engine = None
        self.runtime = None
