"""What the runtime's verbs do, as functions a Python user can call too.

    from edgepix.runtime.jobs import SegmentJob, run_segment
    stats = run_segment(SegmentJob(model="model.onnx", sources=["rtsp://camera/stream"], sinks=["out.mp4"],
                                   max_frames=300))

`edgepix segment` maps its flags to a `SegmentJob` and prints what `run_segment` returns; the work (parsing every
URI and checking every output path before the model loads, the worker plan, the pipeline, a clean stop on Ctrl-C
and SIGTERM, the statistics file) happens here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, ModelFormatError, SinkError
from .formats import CHECKPOINT_SUFFIXES
from .render import RenderOptions
from .sources import SourceOptions

log = logging.getLogger("edgepix.segment")



@dataclass(frozen=True, kw_only=True)
class SegmentJob:
    model: str | os.PathLike
    sources: Sequence[str] = ("synthetic://",)
    sinks: Sequence[str] = ()  # none: display:// where there is a screen, else null://
    backend: str = "auto"
    render: RenderOptions = field(default_factory=RenderOptions)
    source_options: SourceOptions = field(default_factory=SourceOptions)
    workers: int | None = None
    threads: int | None = None
    batch_timeout_ms: float = 40.0
    max_batch: int | None = None
    max_frames: int | None = None
    duration: float | None = None
    stats: str | os.PathLike | None = None  # where to write the statistics as JSON at the end
    hud: bool = True
    triton_url: str | None = None
    status_interval: float = 5.0


def check_job(job: SegmentJob) -> None:
    """One-line errors for what can be told from the job alone, before anything opens."""
    model = Path(job.model)
    if model.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelFormatError(f"{model} is a training checkpoint; the runtime runs exported models: "
                               f"edgepix export {model} (then pass the .onnx)")
    if job.triton_url is not None and job.backend != "triton":
        raise InputError(f"--triton-url applies to --backend triton, not {job.backend}")
    if not model.exists() and job.backend != "triton":  # a triton model is a name on the server
        raise ModelFormatError(f"model file not found: {model}")
    for name in ("workers", "threads", "max_frames", "max_batch"):
        value = getattr(job, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")


def run_segment(job: SegmentJob, *, status: Callable[[str], None] | None = None,
                describe: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Segment `job.sources` into `job.sinks` until they end (or max_frames / duration / a stop signal); returns
    the pipeline's statistics. `status` receives the periodic status line, `describe` one line about the model
    and the worker plan. Ctrl-C and SIGTERM stop cleanly when called from the main thread (a second Ctrl-C
    gives up on the clean finish)."""
    from .fileio import atomic_write_text, check_writable
    from .pipeline import Pipeline, PipelineOptions, choose_workers, resolve_backend, tune_malloc
    from .segmenter import Segmenter
    from .sinks import display_available, make_sink
    from .sources import open_source

    check_job(job)
    model = Path(job.model)
    stats_path = Path(job.stats) if job.stats is not None else None
    tune_malloc()  # before any thread or frame exists
    # Parse every URI before loading the model, so a typo fails in milliseconds.
    cond = threading.Condition()  # shared by the streams' buffers: the pipeline's mux waits on all of them
    sources = [open_source(uri, job.source_options, stream_id=i, cond=cond)
               for i, uri in enumerate(job.sources or ["synthetic://"])]
    sink_uris = list(job.sinks)
    if not sink_uris:
        reason = display_available()
        sink_uris = ["display://"] if reason is None else ["null://"]
        if reason is not None:
            log.info("no --sink and no display:// (%s): frames are only counted; add --sink http://0.0.0.0:8080 "
                     "to watch in a browser or --sink out.mp4 to keep them", reason)
    sinks = [make_sink(u, hud=job.hud) for u in sink_uris]
    # Every file the run will write is checked now (folders, permissions, stale partial files of a killed run),
    # before the model loads, so a bad path fails in milliseconds rather than after the whole run.
    for sink in sinks:
        sink.preflight()
    if stats_path is not None:
        check_writable(stats_path, "--stats", SinkError)
    plan = choose_workers(resolve_backend(model, job.backend), workers=job.workers, threads=job.threads)

    # Open the sources first: a camera or stream that does not open fails before the model loads, and live
    # ones connect (and files start decoding) while it does.
    try:
        for source in sources:
            source.start()
        server = {"url": job.triton_url} if job.triton_url is not None else {}
        seg = Segmenter.load(model, plan.backend, render=job.render, **plan.backend_options(), **server)
    except BaseException:
        for source in sources:
            source.close()
        raise
    if describe is not None:
        describe(f"{seg.describe()}; {plan.describe()}")

    pipeline = Pipeline(seg, sources, sinks, PipelineOptions(
        workers=plan.workers, batch_timeout=job.batch_timeout_ms / 1000.0, max_batch=job.max_batch,
        max_frames=job.max_frames, duration=job.duration, status_interval=job.status_interval),
        title=f"edgepix segment {model.name}", status=status,
        info={"threads_per_worker": plan.threads, "spin_wait": plan.spin_wait, "vis": job.render.mode.value,
              "pid": os.getpid()})
    failed_run = True
    try:
        with _stop_on_signals(pipeline):
            stats = pipeline.run()
        failed_run = False
    finally:
        seg.close()
        if stats_path is not None:
            try:
                atomic_write_text(stats_path, json.dumps(pipeline.stats(), indent=2, default=str) + "\n")
            except OSError as e:
                message = f"cannot write --stats {stats_path}: {e.strerror or e}"
                if not failed_run:
                    raise SinkError(message) from None
                log.error("%s", message)  # the run's own error follows; it is the one that matters
    return stats


class _stop_on_signals:
    """SIGINT and SIGTERM stop the pipeline cleanly (files are finished); a second Ctrl-C raises
    KeyboardInterrupt. Only the main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.count, self.previous = pipeline, 0, {}

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        self.count += 1
        if self.count > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: give up on a clean finish
        self.pipeline.stop()

    def __enter__(self) -> _stop_on_signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
