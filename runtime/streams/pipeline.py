"""The stream pipeline: sources -> (batch) -> pre-process + infer -> post-process + render -> sinks, in threads.

    capture threads         inference workers (K)            post thread              sink threads
    source 0 ─ newest ─┐    ┌ take a batch (mux) ┐           reorder by batch number   ┌ out.mp4 (waits)
    source 1 ─ newest ─┼──► │ pre-process        │ ─────────► post-process, render  ─┼ http://  (newest)
    file     ─ queue  ─┘    └ infer              ┘           route to each stream's   └ display  (newest)

numpy, OpenCV and ONNX Runtime release the GIL in their heavy loops, so decoding, inference, rendering and encoding
overlap on a multi-core CPU; on a GPU, inference leaves the cores to the rest.

- Sources (`runtime.streams.sources`) read in their own threads; live ones keep only the newest frame.
- The mux follows DeepStream's nvstreammux: a worker that is free takes the newest frame of every stream that has
  one and pushes the batch when it holds one frame of every stream that is up, or when `batch_timeout` has passed
  since its first frame. A stream that is down (reconnecting) or slow never holds up the others for longer than
  the timeout. Workers take frames only when they are free, so a live frame waits at most one frame interval.
- K inference workers share one model when its backend is thread-safe (ONNX Runtime's `InferenceSession.run`,
  Triton's per-thread clients): on a CPU, K single-threaded runs use the cores better than one multi-threaded run
  plus idle spinning. A backend that is not (TensorRT, ONNX Runtime with IOBinding, OpenCV, OpenVINO) gets one
  instance per worker, loaded by the `processor_factory` the pipeline is given (K instances: K times the weights),
  or, without one, a single worker (`WorkerPlan.for_processor` decides; the plan's description says which). Each
  worker calls `bind_thread()` on its backends before its first call (TensorRT: the engine's CUDA device).
- The post thread restores the order of batches, post-processes, renders and hands each frame to the sinks of its
  stream. Lossless sinks (files, folders) make it wait; the others get the newest frame.
- Statistics: per-stage latency percentiles (`runtime.core.stats.LatencyStats`) over a rolling window, frames, FPS,
  drops, frame age, reconnects and outages; `stats()` at any time, `run()` returns the final ones.

`stop()` only sets a flag (safe from a signal handler); `run()` then drains what is in flight, finishes the sinks
(video files are finalised) and returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.cpuinfo import usable_cores
from ..core.errors import EdgepixError, InputError
from ..core.stats import LatencyStats
from ..data.flicker import FlickerMeter
from ..tasks.processor import FrameProcessor
from ..tasks.temporal import Stabilizer, TemporalOptions
from .sinks import Output, Sink, SinkContext, StreamInfo, make_sink
from .sources import Frame, Source, SourceOptions, SourceState, open_source

log = logging.getLogger(__name__)

CPU_BACKENDS = ("ort-cpu", "opencv")
#: the stages whose latencies every run reports (plus "infer_call" per inference call and "sink URI" per sink)
STAGES = ("decode", "frame_age", "preprocess", "infer", "postprocess", "render", "latency")


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    workers: int = 1  # inference workers (see choose_workers; WorkerPlan.for_processor may make it 1)
    batch_timeout: float = 0.04  # seconds a partial multi-stream batch waits for the other streams
    max_batch: int | None = None  # frames per inference call; None: one per stream
    max_frames: int | None = None  # stop after this many frames (all streams together)
    duration: float | None = None  # stop after this many seconds
    queue_size: int = 2  # frames a lossless sink may lag behind; batches waiting for the post stage
    prefetch: bool = True  # each worker pre-processes the next batch (in a thread of its own) while one runs
    status_interval: float = 0.0  # seconds between status lines on stderr; 0: none
    stats_window: int = 4096  # latency samples kept per stage (a rolling window for runs of days)
    temporal: TemporalOptions = TemporalOptions()  # segmenters: a temporal stabilizer per stream (tasks.temporal)
    measure_flicker: bool = False  # segmenters: measure flicker per stream (optical flow; costs ~1 ms a frame)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError(f"workers: expected >= 1, got {self.workers}")
        if self.batch_timeout < 0:
            raise InputError(f"batch_timeout: expected >= 0 seconds, got {self.batch_timeout}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch: expected >= 1 or None, got {self.max_batch}")
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"max_frames: expected >= 1, got {self.max_frames}")
        if self.duration is not None and self.duration <= 0:
            raise InputError(f"duration: expected > 0 seconds, got {self.duration}")
        if self.queue_size < 1:
            raise InputError(f"queue_size: expected >= 1, got {self.queue_size}")


@dataclass(frozen=True)
class WorkerPlan:
    """How inference runs: `workers` threads taking batches, each call with `threads` intra-op threads, on
    `instances` loaded copies of the model (known once it is loaded: `for_processor`)."""

    backend: str
    workers: int
    threads: int | None  # None: the backend's default
    spin_wait: bool | None = None  # ONNX Runtime: idle threads spin between ops; None: the backend's default
    instances: int | None = None  # 1: the workers share one processor; `workers`: one each; None: not known yet
    not_thread_safe: tuple[str, ...] = ()  # the processor's backends that one instance must not run in two threads
    requested: int | None = None  # the workers asked for, when for_processor had to run fewer

    def for_processor(self, processor: FrameProcessor, *, can_load_more: bool) -> WorkerPlan:
        """This plan for a loaded processor. Workers share it when every backend it runs is thread-safe; else
        each worker gets an instance of its own when more can be loaded (`can_load_more`: the caller has a
        factory), else one worker runs. N instances hold N copies of the weights and of the backend's buffers
        (N times the model's memory, on the GPU for TensorRT and ort-cuda)."""
        unsafe = tuple(dict.fromkeys(b.name for b in processor.backends if not b.thread_safe))
        if self.workers == 1 or not unsafe:
            return replace(self, instances=1, not_thread_safe=unsafe)
        if can_load_more:
            return replace(self, instances=self.workers, not_thread_safe=unsafe)
        return replace(self, workers=1, instances=1, not_thread_safe=unsafe, requested=self.workers)

    def backend_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.threads is not None:
            options["threads"] = self.threads
        if self.spin_wait is not None and self.backend.startswith("ort-"):
            options["spin_wait"] = self.spin_wait
        return options

    def describe(self) -> str:
        threads = self.threads or "default"
        spin = "" if self.spin_wait is None else f", spinning {'on' if self.spin_wait else 'off'}"
        text = f"{self.workers} inference worker(s) x {threads} thread(s){spin}"
        unsafe = f"{' and '.join(self.not_thread_safe)} {'is' if len(self.not_thread_safe) == 1 else 'are'}"
        if self.requested is not None:
            return (f"{text} (not {self.requested}: {unsafe} not thread-safe and no second instance can be loaded; "
                    "give the Pipeline a processor_factory for one per worker)")
        if self.instances is None or self.workers == 1:
            return text
        if self.instances == 1:
            return f"{text}, sharing one model (its backend is thread-safe)"
        return f"{text}, one model instance each ({unsafe} not thread-safe; {self.instances}x the model's memory)"


def choose_workers(backend: str, *, cores: int | None = None, workers: int | None = None,
                   threads: int | None = None) -> WorkerPlan:
    """The inference plan for a backend on this machine (`workers` / `threads` override the choice).

    ONNX Runtime on the CPU: one worker whose calls use every core, with ONNX Runtime's spin-waiting off, so
    that decoding, rendering and encoding get the cores back between the parallel sections of the model and the
    frame is done as early as possible (lowest frame age). Two single-threaded workers give a few percent more
    throughput on an idle 2-core CPU but need a second set of activations (about +40 MB at 512x512) and lose
    more when other processes compete for the cores; `--workers 2 --threads 1` selects them. OpenCV: one
    worker. GPU backends: two workers, so one copies frames while the other computes.

    Whether the workers share one model is decided once it is loaded (`WorkerPlan.for_processor`): a backend that
    is not thread-safe (TensorRT, ort-cuda and ort-trt with their default IOBinding, OpenCV, OpenVINO) gets one
    instance per worker, which costs one more copy of the weights and buffers per worker.
    """
    cores = cores or usable_cores()
    if backend == "opencv":
        return WorkerPlan(backend, workers or 1, threads)
    if backend == "triton":  # each worker keeps one request in flight while the others' frames are prepared
        return WorkerPlan(backend, workers or 4, None)
    if backend == "ort-cpu":
        w = workers or 1
        t = threads or max(1, cores // w)
        return WorkerPlan(backend, w, t, spin_wait=False if t > 1 else None)
    return WorkerPlan(backend, workers or 2, threads)


def resolve_backend(model: str | os.PathLike, backend: str) -> str:
    """The backend name `auto` picks for `model` (the first available candidate)."""
    from ..backends.registry import candidates

    return candidates(backend, model)[0]


def tune_malloc(*, mmap_threshold: int = 128 * 1024, arena_max: int = 2) -> bool:
    """Keep a long-running stream process's memory flat (glibc only; process-wide, so the CLI calls it).

    glibc raises its mmap threshold each time a large block is freed, after which frame-sized buffers are carved
    from per-thread heaps that keep the memory; with a pipeline's threads freeing each other's frames, that adds
    tens of MB of peak RSS. A fixed threshold sends large buffers back to the kernel when freed, and capping the
    number of malloc arenas keeps the per-thread heaps few. Returns False where it does not apply."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # from malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) & bool(mallopt(m_arena_max, arena_max))


def process_age() -> float | None:
    """Seconds since this process started (Linux), for time-to-first-frame; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


class Recorder:
    """Thread-safe rolling latency samples per stage name."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.lock = threading.Lock()
        self.samples: dict[str, deque[float]] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, ms: float, n: int = 1) -> None:
        with self.lock:
            d = self.samples.get(name)
            if d is None:
                d = self.samples[name] = deque(maxlen=self.window)
                self.counts[name] = 0
            for _ in range(n):
                d.append(ms)
            self.counts[name] += n

    def summary(self) -> dict[str, LatencyStats]:
        with self.lock:
            items = [(k, list(v)) for k, v in self.samples.items() if v]
        return {k: LatencyStats.from_samples(v) for k, v in items}


@dataclass
class _Batch:
    seq: int
    frames: list[Frame]
    chunks: list[tuple[np.ndarray, Any]]  # (raw output, Prepared) per inference call
    start: float  # time.monotonic() when the worker took it


class _SinkRunner:
    """A sink in its own thread. Lossless: a bounded queue the producer waits on. Otherwise: the newest frame
    per stream, older ones counted as skipped."""

    def __init__(self, sink: Sink, index: int, pipeline: Pipeline) -> None:
        self.sink, self.index, self.p = sink, index, pipeline
        self.cond = threading.Condition()
        self.queue: deque[Output] = deque()
        self.latest: dict[int, Output] = {}
        self.skipped = 0
        self.done = False
        self.failed = False
        self.stage = f"sink {sink.uri}"
        self.thread = threading.Thread(target=self._run, name=f"sink-{index}", daemon=True)

    def submit(self, out: Output) -> None:
        with self.cond:
            if self.sink.lossless:
                while len(self.queue) >= self.p.options.queue_size and not self.failed:
                    self.cond.wait(0.1)
                if self.failed:
                    return
                self.queue.append(out)
            else:
                if out.stream_id in self.latest:
                    self.skipped += 1
                self.latest[out.stream_id] = out
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def _take(self) -> Output | None:
        with self.cond:
            while not self.queue and not self.latest and not self.done:
                self.cond.wait(0.25)
            if self.queue:
                out = self.queue.popleft()
            elif self.latest:
                sid = min(self.latest, key=lambda k: self.latest[k].timestamp)
                out = self.latest.pop(sid)
            else:
                return None
            self.cond.notify_all()
            return out

    def _run(self) -> None:
        try:
            while (out := self._take()) is not None:
                t0 = time.perf_counter()
                self.sink.write(out)
                self.p.recorder.add(self.stage, (time.perf_counter() - t0) * 1e3)
        except BaseException as e:  # noqa: BLE001 - reported by the pipeline, which stops
            with self.cond:
                self.failed = True
                self.cond.notify_all()
            self.p._fail(e, f"sink {self.sink.uri}")
        finally:
            try:
                self.sink.close()
            except BaseException as e:  # noqa: BLE001
                self.p._fail(e, f"closing sink {self.sink.uri}")

    def stats(self) -> dict:
        return {**self.sink.stats(), "lossless": self.sink.lossless, "skipped": self.skipped}


class Pipeline:
    """Run a FrameProcessor (a Segmenter, an ImageGenerator, a SegmentThenGenerate chain) over sources into
    sinks. See the module docstring.

        seg = Segmenter.load("model.onnx", threads=1)
        with Pipeline(seg, ["rtsp://cam/stream"], ["http://127.0.0.1:8080", "out.mp4"],
                      PipelineOptions(workers=2)) as p:
            stats = p.run()

    `processor_factory` loads another processor like `processor` (same model, backend and options), for the
    workers beyond the first when the backend is not thread-safe, e.g. `lambda: Segmenter.load(path, "tensorrt")`.
    Each such worker loads its own copy when the pipeline starts (N workers: N times the model's memory) and
    closes it when it ends; `processor` stays the caller's to close. Without a factory such a backend runs one
    worker (`plan` says which was done).
    """

    def __init__(self, processor: FrameProcessor, sources: Sequence[Source | str],
                 sinks: Sequence[Sink | str] = ("null://",), options: PipelineOptions = PipelineOptions(), *,
                 source_options: SourceOptions = SourceOptions(), title: str = "edgepix",
                 status: Callable[[str], None] | None = None, info: dict | None = None,
                 processor_factory: Callable[[], FrameProcessor] | None = None) -> None:
        if not sources:
            sources = ["synthetic://"]
        self.processor = processor
        self.options = options
        self.processor_factory = processor_factory
        # How many workers run and on how many copies of the model (the threads are the backend's business).
        self.plan = WorkerPlan(processor.backend.name, options.workers, None).for_processor(
            processor, can_load_more=processor_factory is not None)
        if self.plan.requested is not None:
            log.warning("stream pipeline: %s", self.plan.describe())
        self._worker_processors: list[FrameProcessor] = []  # per worker; loaded by start()
        given = [s for s in sources if isinstance(s, Source)]
        shared = {id(s.buffer.cond) for s in given}
        # One condition for every stream, so the mux can wait on all of them: the one sources share already
        # (open_sources, or the CLI, which starts them early), else a new one given to sources not yet started.
        self.cond = given[0].buffer.cond if given and len(shared) == 1 else threading.Condition()
        self.sources: list[Source] = []
        for i, s in enumerate(sources):
            src = s if isinstance(s, Source) else open_source(s, source_options, stream_id=i, cond=self.cond)
            if src.buffer.cond is not self.cond:
                if src.running:
                    raise InputError("sources already started must share one threading.Condition "
                                     "(open them with open_sources or pass cond=)")
                src.buffer.cond = self.cond
            if src.stream_id != i and src.running:
                raise InputError(f"source {src.label}: started as stream {src.stream_id}, given as stream {i}")
            src.stream_id = i
            self.sources.append(src)
        self.sinks: list[Sink] = [s if isinstance(s, Sink) else make_sink(s) for s in (sinks or ["null://"])]
        for sink in self.sinks:
            bad = [i for i in (sink.streams or ()) if not 0 <= i < len(self.sources)]
            if bad:
                raise InputError(f"sink {sink.uri}: stream {bad[0]} does not exist "
                                 f"(streams 0..{len(self.sources) - 1})")
        n = len(self.sources)
        self.max_batch = options.max_batch or n
        self.title = title
        self.status_fn = status
        self.info = dict(info or {})
        self.recorder = Recorder(options.stats_window)
        # Temporal state and flicker meters, one per stream, touched only by the post thread (frames in order).
        self.stabilizer = Stabilizer(options.temporal)
        if self.stabilizer.active and not hasattr(processor, "stabilize"):
            raise InputError(f"--temporal {options.temporal.mode.value} applies to segmenters; "
                             f"{type(processor).__name__} has no class scores to stabilize")
        self.flicker = [FlickerMeter() for _ in sources] if options.measure_flicker else []
        self._reconnects_seen = [0] * len(sources)
        self._stop = threading.Event()
        self._stopped_sources = False
        self._mux_lock = threading.Lock()
        self._seq = 0
        self._issued = 0
        self._errors: list[tuple[str, BaseException]] = []
        self._error_lock = threading.Lock()
        self._pending: dict[int, _Batch] = {}
        self._pending_cond = threading.Condition()
        self._next_seq = 0
        self._workers_done = 0
        self._runners: list[_SinkRunner] = []
        self._threads: list[threading.Thread] = []
        self._post_thread: threading.Thread | None = None
        self._started = False
        self._finished = threading.Event()
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.t_first_output: float | None = None
        self.first_output_process_s: float | None = None
        self.t_last_output: float | None = None
        self.frames = 0
        self.per_stream = [0] * n
        self.batches = 0
        self.batch_sizes: dict[int, int] = {}
        self._recent: deque[float] = deque(maxlen=1024)
        self._ages: list[deque[float]] = [deque(maxlen=options.stats_window) for _ in range(n)]
        self._stats_cache: tuple[float, dict] | None = None
        self._last_status = 0.0
        self._status_len = 0

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def _load_worker_processors(self) -> list[FrameProcessor]:
        """The processor of each worker: the one given, shared, or one of its own per worker (see the class
        docstring). A copy that fails to load closes the copies already loaded."""
        workers = self.plan.workers
        if self.plan.instances != workers or workers == 1:
            return [self.processor] * workers
        assert self.processor_factory is not None  # for_processor plans one instance per worker only with one
        log.info("loading %d more instance(s) of the model, one per inference worker (not thread-safe: %s)",
                 workers - 1, " and ".join(self.plan.not_thread_safe))
        loaded: list[FrameProcessor] = [self.processor]
        try:
            for _ in range(workers - 1):
                loaded.append(self.processor_factory())
        except BaseException:
            for proc in loaded[1:]:
                proc.close()
            raise
        return loaded

    def _close_worker_processors(self) -> None:
        for proc in self._worker_processors:
            if proc is not self.processor:
                proc.close()

    def start(self) -> Pipeline:
        if self._started:
            return self
        self._worker_processors = self._load_worker_processors()
        self._started = True
        opened: list[Sink] = []
        try:
            ctx = SinkContext([StreamInfo(s.stream_id, s.label, None, s.live) for s in self.sources],
                              stats=lambda: self.stats(max_age=0.5), request_stop=self.stop, title=self.title)
            for sink in self.sinks:
                sink.open(ctx)
                opened.append(sink)
            for s in self.sources:
                s.start()
            # Frame rates are known once the sources are open.
            ctx.streams[:] = [StreamInfo(s.stream_id, s.label, s.fps, s.live) for s in self.sources]
        except BaseException:
            for s in self.sources:
                s.close()
            for sink in opened:
                try:
                    sink.close()
                except EdgepixError:
                    pass
            self._close_worker_processors()
            raise
        self.t_start = time.monotonic()
        self._runners = [_SinkRunner(sink, i, self) for i, sink in enumerate(self.sinks)]
        for r in self._runners:
            r.thread.start()
        self._post_thread = threading.Thread(target=self._post_loop, name="post", daemon=True)
        self._post_thread.start()
        for k in range(self.plan.workers):
            t = threading.Thread(target=self._worker, args=(k,), name=f"infer-{k}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Ask the pipeline to finish: no new frames are taken; what is in flight reaches the sinks. Only sets a
        flag, so it is safe to call from a signal handler or any thread."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once everything finished (sinks closed)."""
        return self._finished.wait(timeout)

    def run(self) -> dict:
        """Start, run until the sources end, `max_frames`, `duration` or `stop()`, finish the sinks and return
        the statistics. Re-raises the first error of any stage (after finishing the sinks)."""
        self.start()
        try:
            while not self.wait(0.1):
                self._tick()
        except KeyboardInterrupt:
            self.stop()
            self._drain()
            raise
        finally:
            self._drain()
        if self.status_fn is not None and self.options.status_interval:
            self.status_fn(self.status_line() + "\n")
        if self._errors:
            where, error = self._errors[0]
            if isinstance(error, EdgepixError):
                raise error
            raise RuntimeError(f"the stream pipeline failed in {where}: {error!r}") from error
        return self.stats()

    def _tick(self) -> None:
        now = time.monotonic()
        duration, start = self.options.duration, self.t_start
        if duration is not None and start is not None and now - start >= duration:
            self.stop()
        if self._stop.is_set() and not self._stopped_sources:
            self._close_sources()
        elif not self._stop.is_set():
            for s in self.sources:
                s.check_stall(now)
        if self.status_fn is not None and self.options.status_interval and now - self._last_status >= \
                self.options.status_interval:
            self._last_status = now
            self.status_fn(self.status_line())

    def _close_sources(self) -> None:
        self._stopped_sources = True
        for s in self.sources:
            s.close(timeout=1.0)
        with self.cond:
            self.cond.notify_all()

    def _drain(self) -> None:
        """Wait for the workers, the post thread and the sinks to finish (after a stop: what is in flight)."""
        if not self._started:
            return
        while not self._finished.wait(0.1):
            if self._stop.is_set() and not self._stopped_sources:
                self._close_sources()
        if not self._stopped_sources:
            self._close_sources()

    def close(self) -> None:
        self.stop()
        self._drain()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, error: BaseException, where: str) -> None:
        with self._error_lock:
            self._errors.append((where, error))
        if not isinstance(error, EdgepixError):
            log.error("stream pipeline: %s failed", where, exc_info=error)
        self.stop()

    # ---- the mux ---------------------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[int, list[Frame]] | None:
        """Newest frames of the streams as one batch (nvstreammux semantics); None when everything ended."""
        with self._mux_lock:  # one worker collects at a time; the next starts as soon as this one has its batch
            budget = None
            if self.options.max_frames is not None:
                budget = self.options.max_frames - self._issued
                if budget <= 0:
                    self.stop()
                    return None
            limit = min(self.max_batch, budget) if budget is not None else self.max_batch
            frames: list[Frame] = []
            taken: set[int] = set()
            deadline = None
            with self.cond:
                while True:
                    if self._stop.is_set():
                        return None
                    for s in self.sources:
                        if len(frames) >= limit:
                            break
                        if s.stream_id not in taken and s.buffer.ready():
                            frames.append(s.buffer.take())  # type: ignore[arg-type]
                            taken.add(s.stream_id)
                    alive = [s for s in self.sources if s.buffer.ready() or not s.buffer.closed]
                    waiting = [s for s in alive if s.stream_id not in taken and s.state is SourceState.UP]
                    if frames and (len(frames) >= limit or not waiting):
                        break
                    if not frames and not alive:
                        return None
                    now = time.monotonic()
                    if frames:
                        if deadline is None:
                            deadline = now + self.options.batch_timeout
                        if now >= deadline:
                            break
                        self.cond.wait(deadline - now)
                    else:
                        self.cond.wait(0.25)
            seq = self._seq
            self._seq += 1
            self._issued += len(frames)
            return seq, frames

    # ---- inference workers --------------------------------------------------------------------------------------

    def _prepare(self, frames: list[Frame], buffers: dict) -> list:
        """Pre-process a batch into the worker's buffers: one Prepared per inference call (chunk)."""
        proc = self.processor
        step = proc.static_batch or proc.max_batch or self.max_batch
        prepared = []
        for c, i in enumerate(range(0, len(frames), step)):
            part = [f.image for f in frames[i:i + step]]
            shape = proc.normalizer.tensor_shape(max(len(part), proc.static_batch or 0))
            buf = buffers.get((c, shape))
            if buf is None:
                buf = buffers[(c, shape)] = np.empty(shape, np.float32)
            p = proc.preprocess(part, out=buf)
            self.recorder.add("preprocess", p.ms / len(part), len(part))
            prepared.append(p)
        return prepared

    def _take(self) -> tuple[int, list[Frame], float] | None:
        got = self._next_batch()
        if got is None:
            return None
        seq, frames = got
        start = time.monotonic()
        for f in frames:
            age = (start - f.timestamp) * 1e3
            self.recorder.add("frame_age", age)
            self._ages[f.stream_id].append(age)
        return seq, frames, start

    def _prefetch(self, k: int, ready: queue.Queue, free: queue.Queue, stop: threading.Event) -> None:
        """Worker k's pre-processing thread: takes and prepares the next batch while the current one runs. Two
        buffer sets alternate; a set comes back through `free` only once the batch in it has been inferred, and
        the next batch is taken from the streams only then (so a live frame is as fresh as possible)."""
        try:
            while not stop.is_set():
                try:
                    buffers = free.get(timeout=0.25)
                except queue.Empty:
                    continue
                got = self._take()
                if got is None:
                    break
                seq, frames, start = got
                prepared = self._prepare(frames, buffers)
                while not stop.is_set():
                    try:
                        ready.put((seq, frames, start, prepared, buffers), timeout=0.25)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001
            self._fail(e, f"pre-processing {k}")
        finally:
            while True:  # the end-of-work marker always gets through
                try:
                    ready.put(None, timeout=0.25)
                    break
                except queue.Full:
                    if stop.is_set():
                        with contextlib.suppress(queue.Empty):
                            ready.get_nowait()

    def _worker(self, k: int) -> None:
        proc = self._worker_processors[k]
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=1)
        free: queue.Queue = queue.Queue()
        helper = None
        if self.options.prefetch:
            for _ in range(2):
                free.put({})
            helper = threading.Thread(target=self._prefetch, args=(k, ready, free, stop), name=f"pre-{k}",
                                      daemon=True)
            helper.start()
        buffers: dict = {}
        try:
            for backend in proc.backends:
                backend.bind_thread()
            while True:
                done_with = None  # with prefetch: the buffer set to hand back once this batch is inferred
                if helper is not None:
                    item = ready.get()
                    if item is None:
                        break
                    seq, frames, start, prepared, done_with = item
                else:
                    got = self._take()
                    if got is None:
                        break
                    seq, frames, start = got
                    prepared = self._prepare(frames, buffers)
                chunks = []
                for p in prepared:
                    t0 = time.perf_counter()
                    raw = proc.run(p.tensor)
                    infer_ms = (time.perf_counter() - t0) * 1e3
                    self.recorder.add("infer", infer_ms / p.n, p.n)
                    self.recorder.add("infer_call", infer_ms)
                    if np.shares_memory(raw, p.tensor):
                        raw = raw.copy()  # a backend that hands back its input buffer must not see it reused
                    chunks.append((raw, p))
                if done_with is not None:
                    free.put(done_with)  # post-processing needs the geometries only, not the tensor
                self._deliver(_Batch(seq, frames, chunks, start))
        except BaseException as e:  # noqa: BLE001 - reported by the pipeline, which stops
            self._fail(e, f"inference worker {k}")
        finally:
            stop.set()
            if helper is not None:
                with contextlib.suppress(queue.Empty):
                    while ready.get_nowait() is not None:
                        pass
                helper.join(5)
            if proc is not self.processor:  # a copy of its own: this worker loaded it (through the pipeline)
                try:
                    proc.close()
                except BaseException as e:  # noqa: BLE001
                    self._fail(e, f"closing inference worker {k}'s model")
            with self._pending_cond:
                self._workers_done += 1
                self._pending_cond.notify_all()

    def _deliver(self, batch: _Batch) -> None:
        limit = self.options.queue_size
        with self._pending_cond:
            # Back-pressure: wait while the post stage is behind, but the batch it waits for always gets in.
            while (len(self._pending) >= limit and batch.seq != self._next_seq and not self._errors):
                self._pending_cond.wait(0.1)
            self._pending[batch.seq] = batch
            self._pending_cond.notify_all()

    # ---- post-process, render, route ---------------------------------------------------------------------------

    def _post_loop(self) -> None:
        proc = self.processor
        try:
            while True:
                with self._pending_cond:
                    while self._next_seq not in self._pending:
                        if self._workers_done >= self.plan.workers:
                            break
                        self._pending_cond.wait(0.25)
                    batch = self._pending.pop(self._next_seq, None)
                    if batch is None:
                        break
                    self._next_seq += 1
                    self._pending_cond.notify_all()
                self._post(proc, batch)
        except BaseException as e:  # noqa: BLE001
            self._fail(e, "post-processing")
            with self._pending_cond:  # unblock workers waiting to deliver
                self._pending.clear()
                self._pending_cond.notify_all()
        finally:
            for r in self._runners:
                r.finish()
            for r in self._runners:
                r.thread.join()
            self.t_end = time.monotonic()
            self._finished.set()

    def _post(self, proc: FrameProcessor, batch: _Batch) -> None:
        frames = iter(batch.frames)
        done = 0
        for raw, prepared in batch.chunks:
            t0 = time.perf_counter()
            if self.stabilizer.active:
                chunk = batch.frames[done:done + prepared.n]
                raw = proc.stabilize(raw, [(self._temporal_state(f.stream_id), f.image)  # type: ignore[attr-defined]
                                           for f in chunk])
            done += prepared.n
            results = proc.postprocess(raw, prepared)
            post_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(results))
            for result in results:
                frame = next(frames)
                self.recorder.add("postprocess", post_ms)
                t1 = time.perf_counter()
                image = proc.render(frame.image, result)
                self.recorder.add("render", (time.perf_counter() - t1) * 1e3)
                if self.flicker and hasattr(result, "class_map"):
                    self._measure_flicker(frame, result.class_map)
                out = Output(image, frame.stream_id, frame.index, frame.timestamp)
                for r in self._runners:
                    if r.sink.accepts(frame.stream_id):
                        r.submit(out)
                now = time.monotonic()
                self.recorder.add("latency", (now - frame.timestamp) * 1e3)
                self.frames += 1
                self.per_stream[frame.stream_id] += 1
                self._recent.append(now)
                self.t_last_output = now
                if self.t_first_output is None:
                    self.t_first_output = now
                    self.first_output_process_s = process_age()
        self.batches += 1
        n = len(batch.frames)
        self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1

    def _temporal_state(self, stream_id: int):
        """The stream's temporal state, afresh after the stream reconnected (its old frames say nothing of the new)."""
        source = self.sources[stream_id]
        if source.reconnects != self._reconnects_seen[stream_id]:
            self._reconnects_seen[stream_id] = source.reconnects
            self.stabilizer.reset(stream_id)
            if self.flicker:
                self.flicker[stream_id].reset()
        return self.stabilizer.state(stream_id)

    def _measure_flicker(self, frame: Frame, class_map: np.ndarray) -> None:
        if not self.stabilizer.active:  # the reconnect check otherwise done by _temporal_state
            self._temporal_state(frame.stream_id)
        t0 = time.perf_counter()
        self.flicker[frame.stream_id].update(frame.image, class_map)
        self.recorder.add("flicker", (time.perf_counter() - t0) * 1e3)

    def temporal_stats(self) -> dict:
        """The stabilizer's mode and resets, and (when measured) the flicker per stream and overall."""
        out: dict[str, Any] = {"mode": self.options.temporal.mode.value}
        if self.stabilizer.active:
            out.update(alpha=self.options.temporal.alpha, resets=self.stabilizer.resets())
        if self.flicker:
            changed, stable = sum(m.changed for m in self.flicker), sum(m.stable for m in self.flicker)
            out["flicker"] = changed / stable if stable else None
            out["flicker_per_stream"] = [m.flicker if m.stable else None for m in self.flicker]
        return out

    # ---- statistics ----------------------------------------------------------------------------------------------

    def fps_now(self, window: float = 2.0) -> float:
        now = time.monotonic()
        recent = [t for t in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-6)
        return (len(recent) - 1) / span if span < window else len(recent) / window

    def stats(self, *, max_age: float = 0.0) -> dict:
        """Everything measured so far, JSON-ready. `max_age`: a snapshot up to that many seconds old will do
        (a HUD drawn on every frame must not sort thousands of samples each time)."""
        cached = self._stats_cache
        if max_age > 0 and cached is not None and time.monotonic() - cached[0] <= max_age:
            return cached[1]
        snapshot = self._stats()
        self._stats_cache = (time.monotonic(), snapshot)
        return snapshot

    def _stats(self) -> dict:
        backend = self.processor.backend
        now = self.t_end or time.monotonic()
        elapsed = (now - self.t_start) if self.t_start else 0.0
        stages = self.recorder.summary()
        decode = [ms for s in self.sources for ms in list(s.read_ms)]
        if decode:
            stages = {"decode": LatencyStats.from_samples(decode), **stages}
        steady = None
        if self.t_first_output is not None and self.t_last_output and self.frames > 1:
            steady = (self.frames - 1) / max(self.t_last_output - self.t_first_output, 1e-9)
        streams = []
        for s, n, ages in zip(self.sources, self.per_stream, self._ages):
            d = s.stats()
            d.update(stream_id=s.stream_id, frames_processed=n, state_text=s.describe_state())
            samples = list(ages)
            if samples:
                a = LatencyStats.from_samples(samples)
                d["frame_age_ms"] = {"p50": a.p50, "p90": a.p90, "p99": a.p99, "max": a.max}
            if s.read_ms:
                d["decode_ms_p50"] = LatencyStats.from_samples(list(s.read_ms)).p50
            streams.append(d)
        return {
            "elapsed_s": elapsed,
            "frames": self.frames,
            "fps": self.frames / elapsed if elapsed > 0 else 0.0,
            "fps_steady": steady,
            "fps_now": self.fps_now(),
            "first_output_s": (self.t_first_output - self.t_start) if self.t_first_output and self.t_start else None,
            "first_output_since_process_start_s": self.first_output_process_s,
            "peak_rss_mb": peak_rss_mb(),
            "dropped": sum(s.dropped for s in self.sources),
            "reconnects": sum(s.reconnects for s in self.sources),
            "stages": {k: v.as_dict() for k, v in stages.items()},
            "batches": {"count": self.batches, "sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                        "mean_size": (self.frames / self.batches) if self.batches else 0.0},
            "streams": streams,
            "temporal": self.temporal_stats(),
            "sinks": [r.stats() for r in self._runners],
            "config": {"workers": self.plan.workers, "model_instances": self.plan.instances,
                       "max_batch": self.max_batch,
                       "batch_timeout_s": self.options.batch_timeout,
                       "model": str(getattr(backend, "path", "")), "backend": getattr(backend, "description", ""),
                       "cores": usable_cores(), **self.info},
            "errors": [f"{where}: {e}" for where, e in self._errors],
            # e.g. the triton backend's client / network / server split
            **({"backend_stats": backend.run_stats()} if hasattr(backend, "run_stats") else {}),
        }

    def status_line(self) -> str:
        s = self.stats()
        st = s["stages"]

        def p50(name: str) -> str:
            return f"{st[name]['p50']:.1f}" if name in st else "-"

        parts = [f"{s['elapsed_s']:6.1f}s", f"{s['fps_now']:5.1f} fps", f"{s['frames']} frames",
                 f"drops {s['dropped']}", f"age {p50('frame_age')} ms",
                 f"decode {p50('decode')} pre {p50('preprocess')} infer {p50('infer')} post {p50('postprocess')} "
                 f"render {p50('render')} ms"]
        for d in s["streams"]:
            if d["state"] != "up" or d["reconnects"]:
                parts.append(f"[{d['stream_id']}] {d['state_text']} reconnects {d['reconnects']}")
        return " | ".join(parts)


def summary_line(stats: dict) -> str:
    """One line for the end of a run."""
    st = stats["stages"]
    infer = f", infer p50 {st['infer']['p50']:.1f} ms" if "infer" in st else ""
    age = f", frame age p50 {st['frame_age']['p50']:.0f} ms" if "frame_age" in st else ""
    n = len(stats["streams"])
    # e.g. a video that ended before the frames its container promised
    warnings = "".join(f"; stream {d['stream_id']}: {d['warning']}" for d in stats["streams"] if d.get("warning"))
    done = stats["config"].get("done", "segmented")  # what the processor did to each frame (runtime.streams.jobs says)
    return (f"{done} {stats['frames']} frames from {n} stream{'s' if n != 1 else ''} in {stats['elapsed_s']:.1f} s: "
            f"{stats['fps']:.1f} fps{infer}{age}; dropped {stats['dropped']}, reconnects {stats['reconnects']}"
            f"{warnings}")

