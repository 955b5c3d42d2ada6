"""ONNX Runtime backends: `ort-cpu`, `ort-cuda` (CUDA execution provider, IOBinding) and `ort-trt` (TensorRT
execution provider with an engine cache).

Threads: `InferenceSession.run` may be called from several threads at once (ONNX Runtime documents it), so a
backend that runs through it is thread-safe; one that runs through an IOBinding (`io_binding=True`, the default of
`ort-cuda` and `ort-trt`) is not: the binding's buffers are shared state, and two threads calling one binding
crash the process (a segmentation fault, seen on the CPU provider too). `thread_safe` says which.

Like Polygraphy's ONNX Runtime runner, a backend builds its `InferenceSession` when it is created and drops it on
`close()`. ONNX Runtime quietly falls back to the CPU when an execution provider cannot start (missing CUDA or
TensorRT libraries); these backends check the providers the session really got and raise BackendError instead, so
`ort-trt` never silently runs on the CPU.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.cpuinfo import usable_cores
from ..core.cpuload import CoreContention
from ..core.errors import BackendError, ModelFormatError, require
from ..description.onnxedit import ClassMapFusion, append_argmax_file
from ..description.onnxproto import check_model_path
from ..description.tensors import TensorMeta, dtype_from_ort, normalise_dim
from .base import Backend

log = logging.getLogger(__name__)

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"


class GraphOptimization(str, enum.Enum):
    """ONNX Runtime graph optimization levels (`GraphOptimizationLevel`)."""

    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


class CudnnConvAlgoSearch(str, enum.Enum):
    EXHAUSTIVE = "EXHAUSTIVE"  # benchmark every algorithm once per shape: slow first run, fastest after
    HEURISTIC = "HEURISTIC"
    DEFAULT = "DEFAULT"


@dataclass(frozen=True, kw_only=True)
class OrtOptions:
    """Session options shared by every ONNX Runtime backend."""

    threads: int | None = None  # intra-op threads; None: ONNX Runtime's default (one per physical core)
    inter_op_threads: int | None = None  # only used by parallel execution mode; None: default
    graph_optimization: GraphOptimization = GraphOptimization.ALL
    spin_wait: bool = True  # worker threads spin between ops within a run: lower latency on idle cores
    # On the CPU provider, while other processes use this process's cores (runtime.core.cpuload), runs go to a
    # second session built the first time that happens: no spin-waiting (a spinning thread burns the time slice
    # another process needs) and only the cores left as intra-op threads (a parallel operator waits for its
    # slowest, de-scheduled thread). False: one session, as configured, whatever the load.
    adapt_to_load: bool = True
    # Stop the worker threads spinning as soon as a run returns (True), or let them spin a while as ONNX Runtime
    # does by default (False). Stopping frees the cores for other work at once, but the next run must wake threads
    # that went to sleep: on a 2-core VM, fastscnn 256x256 called every 10 to 100 ms took 4.9-11.7 ms p50 stopped
    # against 3.0-3.8 ms spinning, and a whole Segmenter.segment() every 33 ms 11.7-12.0 against 6.0-10.0 ms
    # (docs/runtime.md). The stream pipeline turns spin-waiting off altogether where its stages share the cores.
    stop_spin_after_run: bool = False
    # ONNX Runtime's memory pattern plans one block for all activations from the first run and allocates it on
    # the second, next to the arena the first run grew: +20 MB resident for fastscnn at 512x512 (165 vs 143 MB
    # after 25 frames) for a few percent of speed. Off saves the memory on small devices.
    memory_pattern: bool = True
    log_severity: int = 3  # ONNX Runtime's own log: 0 verbose .. 4 fatal; 3 shows errors only
    optimized_model_path: Path | None = None  # write the optimized graph here (inspect it with Netron)
    # Run through an IOBinding with a persistent input buffer (IoBindingRunner) instead of InferenceSession.run: on
    # a GPU the input stays on the device between calls; on the CPU it is the same code path. An IOBinding is not
    # thread-safe, so the backend is not either (thread_safe).
    io_binding: bool = False

    def __post_init__(self) -> None:
        for name in ("threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BackendError(f"{name}: expected a positive integer or None, got {value!r}")
        object.__setattr__(self, "graph_optimization", _enum(GraphOptimization, "graph_optimization",
                                                              self.graph_optimization))
        if not 0 <= self.log_severity <= 4:
            raise BackendError(f"log_severity: expected 0..4, got {self.log_severity!r}")


@dataclass(frozen=True, kw_only=True)
class OrtCudaOptions(OrtOptions):
    device_id: int = 0
    io_binding: bool = True  # keep the input buffer on the GPU between calls and copy with IOBinding
    cudnn_conv_algo_search: CudnnConvAlgoSearch = CudnnConvAlgoSearch.EXHAUSTIVE
    gpu_mem_limit_bytes: int | None = None  # cap on the CUDA memory arena; None: no cap

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "cudnn_conv_algo_search", _enum(CudnnConvAlgoSearch, "cudnn_conv_algo_search",
                                                                  self.cudnn_conv_algo_search))
        if self.device_id < 0:
            raise BackendError(f"device_id: expected >= 0, got {self.device_id!r}")


@dataclass(frozen=True, kw_only=True)
class OrtTensorrtOptions(OrtCudaOptions):
    fp16: bool = False  # let TensorRT pick FP16 kernels (FP32 ONNX in, mixed precision engine)
    engine_cache: bool = True  # reuse built engines across runs (a build takes minutes on a Jetson)
    engine_cache_dir: Path | None = None  # None: "<model stem>.ort-trt-cache" beside the model
    timing_cache: bool = True  # reuse kernel timings across builds (same folder as the engine cache)
    max_workspace_bytes: int | None = None  # TensorRT builder workspace; None: the EP's default
    builder_optimization_level: int | None = None  # 0..5; None: TensorRT's default (3)

    def __post_init__(self) -> None:
        super().__post_init__()
        level = self.builder_optimization_level
        if level is not None and not 0 <= level <= 5:
            raise BackendError(f"builder_optimization_level: expected 0..5 or None, got {level!r}")


def _enum(enum_type: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_type)
        raise BackendError(f"{name}: expected one of {valid}, got {value!r}") from None


def default_threads() -> int | None:
    """Intra-op threads when none are asked for: ONNX Runtime's own default (one per physical core) unless this
    process may use fewer cores than the machine has (an affinity mask or a cgroup quota: a container), where ONNX
    Runtime's count would oversubscribe them; then the usable cores."""
    usable = usable_cores()
    return usable if usable < (os.cpu_count() or 1) else None


def session_options(options: OrtOptions, *, contended_threads: int | None = None):
    """The session options `options` ask for; with `contended_threads`, those of the session for a busy machine
    (that many intra-op threads, no spin-waiting: `OrtOptions.adapt_to_load`)."""
    ort = require("onnxruntime", extra="cpu", purpose="The ONNX Runtime backends")
    so = ort.SessionOptions()
    threads = options.threads if options.threads is not None else default_threads()
    if contended_threads is not None:
        threads = contended_threads
    if threads is not None:
        so.intra_op_num_threads = threads
    if options.inter_op_threads is not None:
        so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = {
        GraphOptimization.DISABLE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization]
    spin = options.spin_wait and contended_threads is None
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1" if options.stop_spin_after_run else "0")
    so.log_severity_level = options.log_severity
    so.enable_mem_pattern = options.memory_pattern
    if options.optimized_model_path is not None:
        so.optimized_model_filepath = str(options.optimized_model_path)
    return so


class OrtBackend(Backend):
    """ONNX Runtime with an ordered list of execution providers; subclasses choose the providers."""

    options_type = OrtOptions
    #: the execution provider that must be active for this backend to be what it claims to be
    primary_provider = CPU_EP

    supports_fused_argmax = True

    def __init__(self, path: str | os.PathLike, *, options: OrtOptions | None = None,
                 fuse_argmax: ClassMapFusion | None = None) -> None:
        super().__init__(path)
        self.options = options if options is not None else self.options_type()
        if not isinstance(self.options, self.options_type):
            raise BackendError(f"backend {self.name!r}: expected {self.options_type.__name__}, "
                               f"got {type(self.options).__name__}")
        path = check_model_path(path)
        ort = require("onnxruntime", extra="cpu", purpose="The ONNX Runtime backends")
        available = ort.get_available_providers()
        if self.primary_provider not in available:
            from .registry import available_backends

            raise BackendError(
                f"backend {self.name!r} needs ONNX Runtime's {self.primary_provider}, but this onnxruntime "
                f"{ort.__version__} offers {', '.join(available)}; available backends: "
                f"{', '.join(available_backends())}")
        providers = self.provider_list()
        source: str | bytes = str(path)
        if fuse_argmax is not None:
            try:
                source, self.fused_argmax = append_argmax_file(path, fuse_argmax)
            except (ModelFormatError, OSError) as e:
                log.debug("%s: running without a fused argmax (%s)", path.name, e)
        try:
            self.session = self._session(ort, source, providers)
        except ModelFormatError:
            if self.fused_argmax is None:
                raise
            # e.g. weights in external data files, which a model loaded from bytes cannot find
            log.debug("%s: the fused-argmax graph did not load; loading the file as it is", path.name)
            self.fused_argmax = None
            self.session = self._session(ort, str(path), providers)
        self.active_providers: list[str] = list(self.session.get_providers())
        if self.primary_provider not in self.active_providers:
            self.session = None
            raise BackendError(
                f"backend {self.name!r}: ONNX Runtime could not start {self.primary_provider} (it fell back to "
                f"{', '.join(self.active_providers)}); check the CUDA/TensorRT libraries with `edgepix doctor`")
        try:
            self.inputs = tuple(TensorMeta(t.name, dtype_from_ort(t.type), tuple(normalise_dim(d) for d in t.shape))
                                for t in self.session.get_inputs())
            self.outputs = tuple(TensorMeta(t.name, dtype_from_ort(t.type), tuple(normalise_dim(d) for d in t.shape))
                                 for t in self.session.get_outputs())
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError as e:  # ONNX Runtime hands names and metadata to Python as UTF-8
            self.session = None
            raise ModelFormatError(f"{path} is damaged: a name or metadata string is not valid UTF-8 ({e.reason} at "
                                   f"offset {e.start}); copy or export it again") from None
        self._output_names = [t.name for t in self.outputs]
        self._run_options = run_options(self.options)
        # On the CPU provider a second session serves runs while other processes use the cores (adapt_to_load);
        # it is built the first time they do. An IOBinding is bound to one session, so it keeps this one.
        adaptive = self.options.adapt_to_load and self.primary_provider == CPU_EP and not self.options.io_binding
        self._contention = CoreContention() if adaptive else None
        self._contended_session = None
        self._contended_threads: int | None = None
        self._contended_lock = threading.Lock()
        self._session_source = (ort, source if self.fused_argmax is not None else str(path), providers)
        device_type, device_id = self.binding_device()
        self._runner = (IoBindingRunner(self.session, device_type=device_type, device_id=device_id,
                                        output_names=self._output_names, path=self.path,
                                        run_options=self._run_options) if self.options.io_binding else None)

    def _session(self, ort, source: str | bytes, providers: list[tuple[str, dict[str, str]]], *,
                 contended_threads: int | None = None):
        try:
            return ort.InferenceSession(
                source, sess_options=session_options(self.options, contended_threads=contended_threads),
                providers=[name for name, _ in providers], provider_options=[opts for _, opts in providers])
        except Exception as e:  # ONNX Runtime raises its own pybind types; keep its first line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if any(k in reason for k in ("ExecutionProvider", "CUDA", "cuda", "TensorRT", "cudnn", "CUDNN")):
                raise BackendError(f"backend {self.name!r} could not create a session for {self.path}: "
                                   f"{reason}") from e
            raise ModelFormatError(f"{self.path} is not an ONNX model ONNX Runtime can load: {reason}") from e

    def provider_list(self) -> list[tuple[str, dict[str, str]]]:
        """(provider name, provider options) in priority order, as ONNX Runtime takes them."""
        return [(CPU_EP, {})]

    def binding_device(self) -> tuple[str, int]:
        """(ONNX Runtime device type, device id) of the IOBinding's buffers."""
        return "cpu", 0

    @property
    def thread_safe(self) -> bool:  # type: ignore[override]  (the options decide, see the module docstring)
        return not self.options.io_binding

    @property
    def description(self) -> str:
        threads = self.options.threads or default_threads() or "default"
        spin = "" if self.options.spin_wait else ", no spin-wait"
        if self._contention is not None:
            spin += ", adapting to the load"
        fused = ", argmax fused into the graph" if self.fused_argmax else ""
        binding = ", IOBinding" if self.options.io_binding else ""
        return (f"{self.name} ({' > '.join(self.active_providers)}, {threads} threads, "
                f"graph optimization {self.options.graph_optimization.value}{spin}{fused}{binding})")

    def session_for_now(self):
        """The session this run takes: the one as configured, or, while other processes use this process's cores
        (adapt_to_load), the one without spin-waiting on the cores they leave."""
        if self._contention is None or not self._contention.contended():
            return self.session
        if self._contended_session is None:
            with self._contended_lock:
                if self._contended_session is None:
                    own = self.options.threads or default_threads() or usable_cores()
                    # a core counts as taken when others use more than three quarters of it
                    left = max(1, own - int(self._contention.others + 0.25))
                    log.info("%s: other processes are using %.1f of this process's cores; running on %d thread(s) "
                             "without spin-wait while they do", self.path.name, self._contention.others, left)
                    self._contended_session = self._session(*self._session_source, contended_threads=left)
                    self._contended_threads = left
        return self._contended_session

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return self._runner.run(feed)
        try:
            outputs = self.session_for_now().run(self._output_names, dict(feed), self._run_options)
        except Exception as e:  # noqa: BLE001 - only ONNX Runtime's own error types are translated
            error = run_error(e, self.path)
            if error is None:
                raise
            raise error from e
        return dict(zip(self._output_names, outputs))

    def close_impl(self) -> None:
        self._runner = None
        self.session = None
        self._contended_session = None
        self._session_source = None


def run_options(options: OrtOptions):
    """Run options whose log level keeps ONNX Runtime from printing a failed run's error itself: `run_error`
    reports it once, as one line. A more verbose level asked for (log_severity < 3) is kept."""
    ort = require("onnxruntime", extra="cpu", purpose="The ONNX Runtime backends")
    ro = ort.RunOptions()
    ro.log_severity_level = options.log_severity if options.log_severity < 3 else 4
    return ro


def run_error(e: Exception, path: Path) -> BackendError | None:
    """A graph that loaded but failed while running (a bad index, a shape the model cannot take, out of memory):
    ONNX Runtime's exception as one line. None for anything else, which is a bug and keeps its traceback."""
    # session.run raises ONNX Runtime's own exception types; run_with_iobinding a plain RuntimeError that says
    # "Error in execution: ...".
    iobinding_failure = type(e) is RuntimeError and str(e).startswith("Error in execution")
    if not (type(e).__module__.startswith("onnxruntime") or iobinding_failure):
        return None
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    return BackendError(f"{path.name}: the model failed while running ({reason}); check it with `edgepix info "
                        f"{path}` and re-export it if it is damaged")


class OrtCpuBackend(OrtBackend):
    """ONNX Runtime on the CPU execution provider."""

    name = "ort-cpu"


class IoBindingRunner:
    """Runs a session through IOBinding with a persistent device input buffer per input.

    The input is copied host -> device into a buffer that lives as long as its shape does (no allocation per
    frame), outputs are allocated by ONNX Runtime on the device and copied back once per call. Works for any
    device type ONNX Runtime knows ("cuda", and "cpu": `ort-cpu` with io_binding=True). One runner must not be
    called from two threads at once: the binding and the buffers are shared.
    """

    def __init__(self, session, *, device_type: str, device_id: int, output_names: list[str],
                 path: Path = Path("model"), run_options=None) -> None:
        self.session, self.device_type, self.device_id = session, device_type, device_id
        self.output_names = output_names
        self.path, self.run_options = path, run_options
        self.binding = session.io_binding()
        self._buffers: dict[str, Any] = {}  # input name -> OrtValue on the device

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            buffer = self._buffers.get(name)
            if buffer is None or tuple(buffer.shape()) != array.shape or buffer.data_type() != _ort_type(array):
                # A buffer of its own (on the CPU, ortvalue_from_numpy would alias the caller's array).
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.device_type,
                                                                   self.device_id)
                self._buffers[name] = buffer
                self.binding.bind_ortvalue_input(name, buffer)
            buffer.update_inplace(array)  # host -> device copy into the persistent buffer
        for name in self.output_names:
            self.binding.bind_output(name, self.device_type, self.device_id)
        self.binding.synchronize_inputs()
        try:
            self.session.run_with_iobinding(self.binding, self.run_options)
        except Exception as e:  # noqa: BLE001 - only ONNX Runtime's own error types are translated
            error = run_error(e, self.path)
            if error is None:
                raise
            raise error from e
        self.binding.synchronize_outputs()
        outputs = self.binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, outputs))


def _ort_type(array: np.ndarray) -> str:
    return {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
            np.dtype(np.uint8): "tensor(uint8)", np.dtype(np.int64): "tensor(int64)",
            np.dtype(np.int32): "tensor(int32)", np.dtype(np.float64): "tensor(double)"}.get(array.dtype, "")


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime on the CUDA execution provider (CPU fallback for unsupported ops), with IOBinding."""

    name = "ort-cuda"
    options_type = OrtCudaOptions
    primary_provider = CUDA_EP

    def provider_list(self) -> list[tuple[str, dict[str, str]]]:
        return cuda_providers(self.options)  # type: ignore[arg-type]

    def binding_device(self) -> tuple[str, int]:
        return "cuda", self.options.device_id  # type: ignore[attr-defined]


class OrtTensorrtBackend(OrtCudaBackend):
    """ONNX Runtime on the TensorRT execution provider (CUDA, then CPU, for what TensorRT does not take)."""

    name = "ort-trt"
    options_type = OrtTensorrtOptions
    primary_provider = TRT_EP

    def cache_dir(self) -> Path:
        return trt_cache_dir(self.options, self.path)  # type: ignore[arg-type]

    def provider_list(self) -> list[tuple[str, dict[str, str]]]:
        # Called once the TensorRT EP is known to exist, so a machine without it gets no cache folder.
        o: OrtTensorrtOptions = self.options  # type: ignore[assignment]
        if o.engine_cache or o.timing_cache:
            try:
                self.cache_dir().mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise BackendError(f"ort-trt: cannot create the engine cache folder {self.cache_dir()}: "
                                   f"{e.strerror or e}; pass engine_cache_dir=<a writable folder>") from e
        return trt_providers(o, self.path)

    @property
    def description(self) -> str:
        o: OrtTensorrtOptions = self.options  # type: ignore[assignment]
        return f"{super().description}, fp16 {'on' if o.fp16 else 'off'}, engine cache {self.cache_dir()}"


def _flag(value: bool) -> str:
    return "True" if value else "False"


def cuda_provider_options(o: OrtCudaOptions) -> dict[str, str]:
    opts = {"device_id": str(o.device_id), "cudnn_conv_algo_search": o.cudnn_conv_algo_search.value,
            "do_copy_in_default_stream": "1"}
    if o.gpu_mem_limit_bytes is not None:
        opts["gpu_mem_limit"] = str(o.gpu_mem_limit_bytes)
    return opts


def cuda_providers(o: OrtCudaOptions) -> list[tuple[str, dict[str, str]]]:
    """The provider list of `ort-cuda`: CUDA first, the CPU for ops CUDA lacks."""
    return [(CUDA_EP, cuda_provider_options(o)), (CPU_EP, {})]


def trt_cache_dir(o: OrtTensorrtOptions, model_path: Path) -> Path:
    if o.engine_cache_dir is not None:
        return Path(o.engine_cache_dir)
    return model_path.with_name(model_path.stem + ".ort-trt-cache")


# The ONNX Runtime release that first accepted these TensorRT EP options. Older releases refuse the session with
# "Invalid TensorRT EP option", and the ONNX Runtime builds for Jetson often lag behind the current release.
TRT_OPTION_SINCE = {
    "trt_builder_optimization_level": (1, 15),  # came with TensorRT 8.6 support
    "trt_timing_cache_path": (1, 17),  # before it, the timing cache went to trt_engine_cache_path
}


def _release(version: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in re.findall(r"\d+", version or "")[:2])
    return parts or (999,)  # unreadable: assume a current release


def trt_provider_options(o: OrtTensorrtOptions, model_path: Path, *, ort_version: str | None = None
                         ) -> dict[str, str]:
    """TensorRT EP options for `o`, limited to what ONNX Runtime `ort_version` (default: the installed one) accepts;
    an option it lacks is left out with a warning that says what happens instead."""
    if ort_version is None:
        ort_version = require("onnxruntime", extra="cpu", purpose="The ONNX Runtime backends").__version__
    have = _release(ort_version)

    def supported(option: str, instead: str) -> bool:
        since = TRT_OPTION_SINCE[option]
        if have >= since:
            return True
        log.warning("ONNX Runtime %s has no TensorRT EP option %s (added in %s); %s", ort_version, option,
                    ".".join(map(str, since)), instead)
        return False

    opts = {"device_id": str(o.device_id), "trt_fp16_enable": _flag(o.fp16)}
    cache = str(trt_cache_dir(o, model_path))
    if o.engine_cache:
        opts.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache)
    if o.timing_cache:
        opts["trt_timing_cache_enable"] = "True"
        if supported("trt_timing_cache_path", f"the timing cache goes to trt_engine_cache_path, set to {cache}"):
            opts["trt_timing_cache_path"] = cache
        else:  # the path alone does not turn the engine cache on
            opts["trt_engine_cache_path"] = cache
    if o.max_workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(o.max_workspace_bytes)
    if o.builder_optimization_level is not None and supported(
            "trt_builder_optimization_level",
            f"TensorRT builds at its default level 3, not {o.builder_optimization_level}"):
        opts["trt_builder_optimization_level"] = str(o.builder_optimization_level)
    return opts


def trt_providers(o: OrtTensorrtOptions, model_path: Path) -> list[tuple[str, dict[str, str]]]:
    """The provider list of `ort-trt`: TensorRT first, CUDA then the CPU for what TensorRT does not take."""
    return [(TRT_EP, trt_provider_options(o, model_path)), (CUDA_EP, cuda_provider_options(o)), (CPU_EP, {})]
