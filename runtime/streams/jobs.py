"""What the runtime's stream verbs do, as functions a Python user can call too.

    from edgepix.runtime.streams.jobs import StreamJob, run_stream
    stats = run_stream(StreamJob(model="model.onnx", sources=["rtsp://camera/stream"], sinks=["out.mp4"],
                                 max_frames=300))

The model decides what runs (`load_processor`): a segmentation model a Segmenter (with `then=`, a chain into a
mask -> image generator), an image -> image generator an ImageGenerator. `edgepix segment` and
`edgepix generate --input VIDEO|URI` map their flags to a `StreamJob` and print what `run_stream` returns; the work
(parsing every URI and checking every output path before the model loads, the worker plan, the pipeline, a clean
stop on Ctrl-C and SIGTERM, the statistics file) happens here. `SegmentJob` and `run_segment` are the names this
had before it ran generators too; they remain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError, ModelFormatError, SinkError
from ..core.fields import flag
from ..core.formats import CHECKPOINT_SUFFIXES
from ..tasks.processor import FrameProcessor
from ..tasks.render import RenderOptions
from .sources import SourceOptions

log = logging.getLogger("edgepix.segment")


@dataclass(frozen=True, kw_only=True)
class StreamJob:
    model: str | os.PathLike
    then: str | os.PathLike | None = None  # segmentation only: a mask -> image generator run on the class maps
    show: str = "side"  # with `then`: "side" (frame | generated) or "generated"
    frame_size: bool = False  # image -> image: outputs resized to the frame (else the model's size)
    sources: Sequence[str] = ("synthetic://",)
    sinks: Sequence[str] = ()  # none: display:// where there is a screen, else null://
    backend: str = "auto"
    render: RenderOptions = field(default_factory=RenderOptions)
    upsample: str | None = field(default=None, metadata=flag(
        "segmentation: how the output reaches the frame: scores (resized bilinearly, then decided) or classes "
        "(decided at the model's size, resized nearest)", choices=("scores", "classes"),
        default="the model's spec"))
    temporal: str = field(default="off", metadata=flag(
        "segmentation: steady masks on video: ema (a moving average of the class scores, reset where the frame "
        "changed), flow (the same, moved along the optical flow first), hysteresis (class-map models), or off",
        choices=("off", "ema", "flow", "hysteresis")))
    temporal_alpha: float = field(default=0.3, metadata=flag(
        "--temporal ema|flow: weight of each new frame's sure scores where nothing moved (unsure ones weigh down to "
        "0.05; lower: steadier)",
        metavar="A"))
    source_options: SourceOptions = field(default_factory=SourceOptions)
    workers: int | None = field(default=None, metadata=flag(
        "inference workers (a backend that is not thread-safe gets a copy of the model per worker)",
        default="by backend and cores"))
    threads: int | None = field(default=None, metadata=flag("threads per inference call",
                                                            default="by backend and cores"))
    batch_timeout_ms: float = field(default=40.0, metadata=flag(
        "multi-stream: push a partial batch after MS milliseconds", name="--batch-timeout", metavar="MS"))
    max_batch: int | None = field(default=None, metadata=flag("multi-stream: frames per inference call",
                                                              default="one per stream"))
    max_frames: int | None = field(default=None, metadata=flag("stop after N frames (all streams together)",
                                                               metavar="N"))
    duration: float | None = field(default=None, metadata=flag("stop after S seconds", metavar="S"))
    stats: str | os.PathLike | None = field(default=None, metadata=flag(
        "write the statistics as JSON at the end", metavar="FILE", type=Path))
    hud: bool = True  # display://: the FPS and timing overlay
    triton_url: str | None = field(default=None, metadata=flag(
        "--backend triton: the server, HOST:PORT or http://HOST:PORT (HTTP, default localhost:8000) or "
        "grpc://HOST:PORT", metavar="URL"))
    triton_retries: int | None = field(default=None, metadata=flag(
        "--backend triton: retries per server outage before the run ends in one line (waits doubling from 0.25 s to "
        "2 s; a server that reloads many models may need more)", metavar="N", default="8, about 12 s"))
    status_interval: float = 5.0


SegmentJob = StreamJob  # the name from before the pipeline ran generators


def check_job(job: StreamJob) -> None:
    """One-line errors for what can be told from the job alone, before anything opens."""
    model = Path(job.model)
    for path in (model, Path(job.then)) if job.then is not None else (model,):
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            raise ModelFormatError(f"{path} is a training checkpoint; the runtime runs exported models: "
                                   f"edgepix export {path} (then pass the .onnx)")
    if job.then is not None and not Path(job.then).exists():
        raise ModelFormatError(f"--then: model file not found: {job.then}")
    if job.show not in ("side", "generated"):
        raise InputError(f"--show: expected side or generated, got {job.show!r}")
    for name in ("triton_url", "triton_retries"):
        if getattr(job, name) is not None and job.backend != "triton":
            raise InputError(f"--{name.replace('_', '-')} applies to --backend triton, not {job.backend}")
    if job.triton_retries is not None and job.triton_retries < 0:
        raise InputError(f"--triton-retries: expected 0 or more, got {job.triton_retries}")
    if not model.exists() and job.backend != "triton":  # a triton model is a name on the server
        raise ModelFormatError(f"model file not found: {model}")
    for name in ("workers", "threads", "max_frames", "max_batch"):
        value = getattr(job, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")


def load_processor(job: StreamJob, plan) -> FrameProcessor:
    """The FrameProcessor the job's model calls for, on the plan's backend (see the module docstring)."""
    from ..description.spec import Task
    from ..tasks.generator import ImageGenerator
    from ..tasks.model import stored_spec
    from ..tasks.processor import SegmentThenGenerate
    from ..tasks.segmenter import Segmenter

    options = {**plan.backend_options(), **({"url": job.triton_url} if job.triton_url is not None else {}),
               **({"reconnect_attempts": job.triton_retries} if job.triton_retries is not None else {})}
    spec = stored_spec(job.model) if job.backend != "triton" else None
    task = spec.task if spec is not None else Task.SEGMENTATION
    if task is Task.GENERATION_NOISE:
        raise InputError(f"{Path(job.model).name} is a noise -> image model: it takes no frames; "
                         "use edgepix generate MODEL --num N")
    if task is Task.GENERATION_IMAGE:
        if job.then is not None:
            raise InputError(f"--then follows a segmentation model; {Path(job.model).name} is an image -> image "
                             "generator")
        return ImageGenerator.load(job.model, plan.backend, to_frame_size=job.frame_size, **options)
    upsample = {"upsample": job.upsample} if job.upsample is not None else {}  # else the spec's own
    # ema and flow smooth the scores: an argmax fused into the graph would leave only the class map
    fuse = job.temporal not in ("ema", "flow")
    seg = Segmenter.load(job.model, plan.backend, render=job.render, fuse_argmax=fuse, **upsample, **options)
    if job.then is None:
        return seg
    try:
        return SegmentThenGenerate(seg, ImageGenerator.load(job.then, plan.backend, **plan.backend_options()),
                                   show=job.show)
    except BaseException:
        seg.close()
        raise


def run_stream(job: StreamJob, *, status: Callable[[str], None] | None = None,
               describe: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `job.model` over `job.sources` into `job.sinks` until they end (or max_frames / duration / a stop
    signal); returns the pipeline's statistics. `status` receives the periodic status line, `describe` one line
    about the model and the worker plan. Ctrl-C and SIGTERM stop cleanly when called from the main thread (a
    second Ctrl-C gives up on the clean finish)."""
    from ..core.fileio import atomic_write_text, check_writable
    from ..tasks.temporal import TemporalOptions
    from .pipeline import Pipeline, PipelineOptions, choose_workers, resolve_backend, tune_malloc
    from .sources import open_sources

    check_job(job)
    model = Path(job.model)
    stats_path = Path(job.stats) if job.stats is not None else None
    tune_malloc()  # before any thread or frame exists
    # Parse every URI before loading the model, so a typo fails in milliseconds; the sources share one condition
    # (open_sources), which the pipeline's mux waits on.
    sources = open_sources(job.sources or ["synthetic://"], job.source_options)
    sinks = _open_sinks(job)
    if stats_path is not None:
        check_writable(stats_path, "--stats", SinkError)
    plan = choose_workers(resolve_backend(model, job.backend), workers=job.workers, threads=job.threads)

    # Open the sources first: a camera or stream that does not open fails before the model loads, and live
    # ones connect (and files start decoding) while it does.
    try:
        for source in sources:
            source.start()
        processor = load_processor(job, plan)
    except BaseException:
        for source in sources:
            source.close()
        raise
    # Shared by the workers, or (a backend that is not thread-safe) one copy per worker, loaded by the pipeline with
    # the same call as the first.
    plan = plan.for_processor(processor, can_load_more=True)
    if describe is not None:
        describe(f"{processor.describe()}; {plan.describe()}")

    title = f"edgepix {model.name}" + (f" -> {Path(job.then).name}" if job.then is not None else "")
    pipeline = Pipeline(processor, sources, sinks, PipelineOptions(
        workers=plan.workers, batch_timeout=job.batch_timeout_ms / 1000.0, max_batch=job.max_batch,
        max_frames=job.max_frames, duration=job.duration, status_interval=job.status_interval,
        temporal=TemporalOptions(mode=job.temporal, alpha=job.temporal_alpha), measure_flicker=job.stats is not None),
        title=title, status=status,
        info={"threads_per_worker": plan.threads, "spin_wait": plan.spin_wait, "vis": job.render.mode.value,
              "pid": os.getpid(), "done": _done(processor),
              **({"then": str(job.then)} if job.then is not None else {})},
        processor_factory=lambda: load_processor(job, plan))
    failed_run = True
    try:
        with _stop_pipeline(pipeline):
            stats = pipeline.run()
        failed_run = False
    finally:
        processor.close()
        if stats_path is not None:
            try:
                atomic_write_text(stats_path, json.dumps(pipeline.stats(), indent=2, default=str) + "\n")
            except OSError as e:
                message = f"cannot write --stats {stats_path}: {e.strerror or e}"
                if not failed_run:
                    raise SinkError(message) from None
                log.error("%s", message)  # the run's own error follows; it is the one that matters
    return stats


run_segment = run_stream  # the name from before the pipeline ran generators


def _done(processor: FrameProcessor) -> str:
    """What the run did to each frame, for its summary line."""
    from ..tasks.generator import ImageGenerator
    from ..tasks.processor import SegmentThenGenerate

    if isinstance(processor, SegmentThenGenerate):
        return "segmented and generated"
    return "generated" if isinstance(processor, ImageGenerator) else "segmented"


def _open_sinks(job: StreamJob) -> list:
    """The job's sinks (display:// where there is a screen when none is given, else null://), every file they
    will write checked now (folders, permissions, stale partial files of a killed run), before the model loads,
    so a bad path fails in milliseconds rather than after the whole run."""
    from .sinks import display_available, make_sink

    sink_uris = list(job.sinks)
    if not sink_uris:
        reason = display_available()
        sink_uris = ["display://"] if reason is None else ["null://"]
        if reason is not None:
            log.info("no --sink and no display:// (%s): frames are only counted; add --sink http://0.0.0.0:8080 "
                     "to watch in a browser or --sink out.mp4 to keep them", reason)
    sinks = [make_sink(u, hud=job.hud) for u in sink_uris]
    for sink in sinks:
        sink.preflight()
    return sinks


def _stop_pipeline(pipeline):
    """SIGINT and SIGTERM stop the pipeline cleanly (files are finished); a second Ctrl-C gives up on that."""

    def on_signal(signum: int, count: int) -> None:
        if count > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        pipeline.stop()

    from ..core.signals import StopSignals

    return StopSignals(on_signal)


