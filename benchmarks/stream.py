"""`edgepix bench stream`: the stream pipeline next to a naive sequential loop, per stage, on the same input.

    edgepix bench stream MODEL.onnx --source URI [--frames 300] [--sink null://] [--out DIR]

Both runtimes come from `stream_bound` (`pipeline_run`, `naive_loop`, `make_video`); this module decides what each
one reads and writes, and reports per-stage p50/p90/p99 (decode, preprocess, infer, postprocess, render, encode),
drops, frame age and end-to-end FPS as a Markdown table, JSON, CSV and a PNG of stacked per-stage bars.

What both read: a video file as it is; a `synthetic://` scene rendered first to a temporary video of the same
size and length (cv2.VideoCapture cannot open `synthetic://`); a live source (camera, CSI, GStreamer, network
stream) opened once per run, so the two runs see different frames. What both write: by default a temporary .mp4
(deleted afterwards) with the codec the pipeline's video sink picks, so encoding is measured; `--sink null://`
writes nothing; `--sink FILE.mp4` keeps the pipeline's video in FILE and the naive loop's in FILE.naive.mp4.

`--busy` keeps one core busy with a spinning child process while both run (benchmarks/load.py, as for
`bench --peers --busy`): started before the pipeline loads its model, stopped after the naive loop; the report says
quiet or busy and how much CPU the spinning process took.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepix.plotting import pyplot, save_figure
from edgepix.runtime.core.errors import InputError, ModelFormatError, SinkError, SourceError
from edgepix.runtime.tasks.temporal import TemporalMode

from .environment import describe, environment
from .load import load_mode
from .stream_bound import (
    STREAM_STAGES,
    LoopResult,
    load_average,
    make_video,
    naive_loop,
    naive_spec,
    pipeline_run,
    pipeline_stages,
)

log = logging.getLogger(__name__)

RUNTIMES = ("naive", "pipeline")
TEMPORAL_MODES = tuple(m.value for m in TemporalMode)
RUNTIME_LABELS = {"naive": "naive loop", "pipeline": "pipeline"}
NAIVE_DESCRIPTION = ("cv2.VideoCapture read, cv2.dnn.blobFromImage pre-processing (in the model's input layout), "
                     "ONNX Runtime CPU with default session options, np.argmax or a threshold and cv2.resize as the "
                     "spec says, cv2.LUT colouring, cv2.addWeighted, cv2.VideoWriter, one frame after the other")


@dataclass(frozen=True, kw_only=True)
class StreamBenchOptions:
    frames: int = 300  # frames each runtime processes (fewer when the source ends first)
    backend: str = "auto"  # the pipeline's backend (the naive loop always runs ONNX Runtime on the CPU)
    workers: int | None = None  # the pipeline's inference workers; None: choose_workers decides
    threads: int | None = None  # the pipeline's intra-op threads per worker; None: choose_workers decides
    sink: str | None = None  # None: a temporary .mp4 for both; "null://": no encoding; else a video file path
    busy: bool = False  # one core kept busy by a spinning child process during both runs (benchmarks/load.py)
    temporal: str | None = None  # the pipeline's temporal stabilizer (tasks.temporal; "off": none), flicker measured

    def __post_init__(self) -> None:
        checks = (("frames", self.frames, _positive_int, "a positive integer"),
                  ("backend", self.backend, lambda v: isinstance(v, str), "a backend name (a string)"),
                  ("workers", self.workers, _optional_positive_int, "a positive integer or None"),
                  ("threads", self.threads, _optional_positive_int, "a positive integer or None"),
                  ("sink", self.sink, lambda v: v is None or isinstance(v, str), "a URI or file (a string) or None"),
                  ("busy", self.busy, lambda v: isinstance(v, bool), "True or False"),
                  ("temporal", self.temporal, lambda v: v is None or v in TEMPORAL_MODES,
                   f"None or one of {', '.join(TEMPORAL_MODES)}"))
        for name, value, ok, expected in checks:
            if not ok(value):
                raise InputError(f"StreamBenchOptions.{name}: expected {expected}, got {value!r:.80} "
                                 f"({type(value).__name__})")


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _optional_positive_int(v: object) -> bool:
    return v is None or _positive_int(v)


@dataclass(frozen=True)
class StreamInput:
    """What each runtime reads."""

    pipeline: str  # the URI the pipeline opens
    naive: Callable  # () -> cv2.VideoCapture for the naive loop
    kind: str  # "file" | "synthetic" | "live"
    identical: bool  # both runtimes read the same frames
    description: str
    frames: int  # frames each run is asked for


# ---- input and output ------------------------------------------------------------------------------------------


def _capture(target, api: int | None = None, *, size=None, fps=None):
    import cv2

    def open_capture():
        cap = cv2.VideoCapture(target) if api is None else cv2.VideoCapture(target, api)
        if cap.isOpened() and size:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        if cap.isOpened() and fps:
            cap.set(cv2.CAP_PROP_FPS, fps)
        return cap

    return open_capture


def prepare_input(source: str, frames: int, work: Path, *,
                  progress: Callable[[str], None] | None = None) -> StreamInput:
    """Parse `source` and decide what the pipeline and the naive loop read (see the module docstring)."""
    import cv2

    from edgepix.runtime.streams.sources import SourceKind, csi_pipeline, parse_source, synthetic_fps, synthetic_size

    spec = parse_source(source)
    if spec.kind is SourceKind.SYNTHETIC:
        limit = dict(spec.params).get("frames")
        n = min(frames, int(limit)) if limit is not None else frames
        w, h = synthetic_size(spec)
        if progress:
            progress(f"rendering {n} frames of {source} ({w}x{h}) to a temporary video ...")
        path = make_video(work / "synthetic.mp4", frames=n, source=source)
        fps = synthetic_fps(spec)
        pacing = f"; its pacing at {fps:g} fps is not applied" if fps else ""
        return StreamInput(str(path), _capture(str(path)), "synthetic", True,
                           f"{source} rendered to a {n}-frame {w}x{h} mp4v video; both runs read that file "
                           f"frame by frame as fast as they can{pacing}", n)
    if spec.kind is SourceKind.VIDEO:
        cap = cv2.VideoCapture(spec.target)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        if count <= 0:
            raise SourceError(f"source {source!r}: OpenCV cannot read a video from this file")
        n = min(frames, count)
        return StreamInput(spec.target, _capture(spec.target), "file", True,
                           f"the video file {spec.target} ({w}x{h}, {count} frames); both runs read its first {n} "
                           "frames frame by frame as fast as they can", n)
    if spec.kind is SourceKind.IMAGES:
        raise SourceError(f"source {source!r} is an image, a folder or a glob; bench stream needs a video: a video "
                          "file, synthetic://..., a camera or a network stream")
    o = spec.options
    if spec.kind is SourceKind.CAMERA:
        target = int(spec.target) if spec.target.isdigit() else spec.target
        naive = _capture(target, None if isinstance(target, int) else cv2.CAP_V4L2, size=o.size, fps=o.fps)
    elif spec.kind is SourceKind.CSI:
        naive = _capture(csi_pipeline(int(spec.target), o), cv2.CAP_GSTREAMER)
    elif spec.kind is SourceKind.GSTREAMER:
        naive = _capture(spec.target, cv2.CAP_GSTREAMER)
    else:  # network
        naive = _capture(spec.target, cv2.CAP_FFMPEG)
    return StreamInput(source, naive, "live", False,
                       f"the live source {source}, opened once per run: the pipeline ran first, then the naive "
                       f"loop, each for {frames} frames, so they did not see identical frames", frames)


def sink_paths(sink: str | None, work: Path) -> tuple[str | None, Path | None, str]:
    """(the pipeline's sink URI or None, the naive loop's output path or None, a description)."""
    from edgepix.runtime.streams.sinks import parse_sink

    if sink is None:
        return str(work / "pipeline.mp4"), work / "naive.mp4", "a temporary .mp4 per run (deleted afterwards)"
    spec = parse_sink(sink)
    if spec.kind == "null":
        return None, None, "null:// (nothing encoded: no encode stage)"
    if spec.kind != "video" or spec.streams is not None:
        raise SinkError(f"--sink {sink!r}: bench stream writes a video file (out.mp4, out.avi, ...) or nothing "
                        "(null://)")
    path = Path(spec.target).expanduser()
    naive = path.with_name(f"{path.stem}.naive{path.suffix}")
    return sink, naive, f"{path} (pipeline) and {naive} (naive loop)"


# ---- the run -------------------------------------------------------------------------------------------------------


def _stats_or_none(stats: dict | None) -> dict | None:
    return dict(stats) if stats else None


@dataclass(frozen=True)
class _Runs:
    """What the two runs produced, before the report is assembled."""

    stream_input: StreamInput  # what both read
    stats: dict  # the pipeline's statistics
    loop: LoopResult  # the naive loop's
    codec: str | None  # the FourCC both wrote (None: nothing written)
    load_before: str
    load_after: str
    load: dict  # quiet or busy (benchmarks/load.py, Load.as_dict)


def run_stream_bench(model: Path, source: str, options: StreamBenchOptions = StreamBenchOptions(), *,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Run the pipeline, then the naive loop, on `source` with `model`; returns the report (JSON-ready)."""
    if not isinstance(model, (str, os.PathLike)) or not isinstance(source, str):
        raise InputError(f"run_stream_bench: expected a model path and a source URI (a string), got "
                         f"{type(model).__name__} and {type(source).__name__}")
    if not isinstance(options, StreamBenchOptions):
        raise InputError(f"options: expected StreamBenchOptions, got {type(options).__name__}")
    model = Path(model)
    _check_model(model, options)
    with tempfile.TemporaryDirectory(prefix="edgepix_bench_stream_") as tmp:
        pipe_sink, naive_out, sink_text = sink_paths(options.sink, Path(tmp))
        runs = _run_both(model, source, options, Path(tmp), pipe_sink, naive_out, progress)
    results = _results(runs.stats, runs.loop, naive_out)
    naive_fps, pipe_fps = results["naive"]["fps"], results["pipeline"]["fps"]
    inp = runs.stream_input
    return {
        "kind": "stream",
        "environment": environment(threads=runs.stats["config"].get("threads_per_worker")),
        "model": str(model),
        "source": source,
        "input": {"kind": inp.kind, "identical_frames": inp.identical, "description": inp.description},
        "sink": options.sink or "temporary .mp4",
        "codec": runs.codec,
        "frames_requested": options.frames,
        "frames_per_run": inp.frames,
        "load_average": {"before": runs.load_before, "after": runs.load_after},
        "load": runs.load,
        "results": results,
        "speedup_fps": pipe_fps / naive_fps if naive_fps > 0 else None,
        "notes": _notes(inp, options, results, pipe_sink, runs.codec, sink_text),
    }


def _check_model(model: Path, options: StreamBenchOptions) -> None:
    """Fail before any work: a missing or non-ONNX model, one without a spec, a frame count below 1."""
    if not model.exists():
        raise ModelFormatError(f"model file not found: {model}")
    if model.suffix.lower() != ".onnx":
        raise ModelFormatError(f"{model}: bench stream runs the naive loop in ONNX Runtime, so it needs the .onnx "
                               f"model (got '{model.suffix or 'no suffix'}'); pick the pipeline's backend with "
                               "--backend")
    naive_spec(model)  # the naive loop needs the spec
    if options.frames < 1:
        raise SourceError(f"frames: expected >= 1, got {options.frames}")


def _run_both(model: Path, source: str, options: StreamBenchOptions, work: Path, pipe_sink: str | None,
              naive_out: Path | None, progress: Callable[[str], None] | None) -> _Runs:
    """The pipeline, then the naive loop writing the codec the pipeline's video sink picked."""
    from edgepix.runtime.streams.pipeline import resolve_backend

    resolve_backend(model, options.backend)  # an unknown or unavailable backend fails before any work
    inp = prepare_input(source, options.frames, work, progress=progress)
    load_before = load_average()
    with load_mode("busy" if options.busy else "quiet") as load:
        if progress:
            progress(f"[1/2] pipeline: {inp.frames} frames of {source}" + (" (one core busy)" if load.busy else ""))
        stats = pipeline_run(model, inp.pipeline, pipe_sink, backend=options.backend, workers=options.workers,
                             threads=options.threads, max_frames=inp.frames, temporal=options.temporal)
        codec = next((f["codec"] for s in stats["sinks"] for f in s.get("files", {}).values() if f.get("codec")),
                     None)
        if pipe_sink is not None and codec is None:
            raise SinkError(f"the pipeline wrote no video to {pipe_sink} (no frames reached it)")
        if progress:
            progress(f"[2/2] naive loop: {inp.frames} frames of {source}")
        loop = naive_loop(model, inp.naive(), naive_out, max_frames=inp.frames, codec=codec or "mp4v", label=source)
        load.update()
    return _Runs(inp, stats, loop, codec, load_before, load_average(), load.as_dict())


def _results(stats: dict, loop: LoopResult, naive_out: Path | None) -> dict:
    """The report's `results`: FPS, drops, frame age, latency and per-stage statistics of each runtime."""
    from edgepix.runtime.core.stats import LatencyStats

    config = stats["config"]
    per_frame = LatencyStats.from_samples(loop.frame_ms).as_dict() if loop.frame_ms else None
    naive_text = NAIVE_DESCRIPTION if naive_out else NAIVE_DESCRIPTION.replace(", cv2.VideoWriter", ", no writer")
    return {
        "naive": {"runtime": naive_text, "frames": loop.frames, "seconds": loop.seconds, "fps": loop.fps,
                  "drops": 0, "frame_age_ms": per_frame, "latency_ms": per_frame, "stages": loop.stage_stats()},
        "pipeline": {"runtime": f"edgepix pipeline: {config.get('backend', '')}; {config.get('plan', '')}",
                     "frames": stats["frames"], "seconds": stats["elapsed_s"], "fps": stats["fps"],
                     "fps_steady": stats["fps_steady"], "drops": stats["dropped"],
                     "frame_age_ms": _stats_or_none(stats["stages"].get("frame_age")),
                     "latency_ms": _stats_or_none(stats["stages"].get("latency")),
                     "stages": pipeline_stages(stats), "stats": stats,
                     # with --temporal: the mode, its state resets and the masks' flicker (runtime/data/flicker.py)
                     **({"temporal": stats["temporal"]} if "flicker" in stats["temporal"] else {})},
    }


def _notes(inp: StreamInput, options: StreamBenchOptions, results: dict, pipe_sink: str | None, codec: str | None,
           sink_text: str) -> list[str]:
    """What the numbers mean for this input and sink: how each runtime read, wrote and was measured."""
    notes = [f"input: {inp.description}"]
    if inp.frames < options.frames:
        notes.append(f"the source has {inp.frames} frames: each run got {inp.frames} of the {options.frames} asked for")
    if inp.kind != "live":
        notes.append("the pipeline ran first, then the naive loop, one after the other on the same frames; the "
                     "pipeline decodes a file a few frames ahead (a bounded queue), and that wait is most of its "
                     "frame age here")
    else:
        notes.append("a live source delivers frames at its own rate: the pipeline's decode time includes waiting "
                     "for the next frame, and its FPS cannot exceed the source's; the naive loop also reads frames "
                     "that queued up in FFmpeg or the driver while it was busy (they get older: the lag the "
                     "pipeline's drops avoid)")
    for name in RUNTIMES:
        got = results[name]["frames"]
        if got < inp.frames:
            notes.append(f"{RUNTIME_LABELS[name]}: the source ended after {got} of the {inp.frames} frames asked for")
    if pipe_sink is None:
        notes.append("--sink null://: nothing was encoded, so there is no encode stage")
    else:
        notes.append(f"encode: both wrote FourCC {codec} to {sink_text}")
    notes.append("frame age: for the pipeline, the time from a frame's read (decoded) to the start of its inference; "
                 "for the naive loop, which reads the next frame only once this one is written, its end-to-end "
                 "latency from decode start to encode end. End-to-end latency: the naive loop's is the same; the "
                 "pipeline's runs from the read to the rendered frame handed to the sink (decode and encode are "
                 "not in it)")
    if options.temporal is not None:
        notes.append(f"flicker (--temporal {options.temporal}): the share of the pipeline's mask pixels that change "
                     "class between frames where the picture, moved along the optical flow, did not change "
                     "(runtime/data/flicker.py; docs/temporal.md); measuring it costs its post-processing thread "
                     "about a millisecond a frame (stage 'flicker' in the JSON); the naive loop has no stabilizer "
                     "and is not measured")
    notes.append("drops: the naive loop reads frame by frame and never drops a frame (0 by construction); the "
                 "pipeline drops only on live sources, whose newest frame replaces one not yet taken")
    notes.append("the pipeline's stages run at the same time in different threads, so its per-stage times do not "
                 "add up to a frame interval; FPS is frames / wall time of each whole run, output finished")
    return notes


# ---- reports ---------------------------------------------------------------------------------------------------------


def _f(v, digits: int = 2) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.{digits}f}"


def _pct(stats: dict | None) -> str:
    return " / ".join(_f(stats.get(q), 1) for q in ("p50", "p90", "p99")) if stats else "-"


def markdown(report: dict) -> str:
    """The report as on stdout: environment, input, a summary and a per-stage table, naive and pipeline side by
    side, the FPS ratio and notes."""
    r = report["results"]
    naive, pipe = r["naive"], r["pipeline"]
    out = io.StringIO()
    out.write(f"Environment: {describe(report['environment'])}\n")
    out.write(f"Model: {report['model']}; source: {report['source']}; {report['frames_per_run']} frames per run; "
              f"load average {report['load_average']['before']} before, {report['load_average']['after']} after\n")
    out.write(f"Load: {report['load']['description']}\n")
    out.write(f"Pipeline: {pipe['runtime'].split(': ', 1)[1]}\n")
    out.write(f"Naive loop: {naive['runtime']}\n\n")
    out.write("| | naive loop | pipeline |\n|---|---|---|\n")
    rows = [("frames", str(naive["frames"]), str(pipe["frames"])),
            ("seconds", _f(naive["seconds"]), _f(pipe["seconds"])),
            ("FPS (end to end)", _f(naive["fps"], 1), _f(pipe["fps"], 1)),
            ("drops", str(naive["drops"]), str(pipe["drops"])),
            ("frame age p50 / p90 / p99 ms", _pct(naive["frame_age_ms"]), _pct(pipe["frame_age_ms"])),
            ("end-to-end latency p50 / p90 / p99 ms", _pct(naive["latency_ms"]), _pct(pipe["latency_ms"]))]
    if "temporal" in pipe:
        rows.append((f"flicker (--temporal {pipe['temporal']['mode']})", "-", _f(pipe["temporal"]["flicker"], 5)))
    for row in rows:
        out.write("| " + " | ".join(row) + " |\n")
    out.write("\n| stage | naive p50 ms | naive p90 ms | naive p99 ms | pipeline p50 ms | pipeline p90 ms "
              "| pipeline p99 ms |\n|---|---|---|---|---|---|---|\n")
    for stage in STREAM_STAGES:
        cells = [stage]
        for name in RUNTIMES:
            s = r[name]["stages"].get(stage)
            cells += [_f(s[q]) if s else "-" for q in ("p50", "p90", "p99")]
        out.write("| " + " | ".join(cells) + " |\n")
    if report["speedup_fps"] is not None:
        out.write(f"\npipeline / naive loop: {report['speedup_fps']:.2f}x FPS\n")
    for n in report["notes"]:
        out.write(f"\nnote: {n}")
    return out.getvalue().rstrip() + "\n"


def json_text(report: dict) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"


CSV_FIELDS = ("runtime", "stage", "n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms", "frames", "seconds", "fps",
              "drops")


def csv_text(report: dict) -> str:
    """One row per runtime x stage (the six stages, then frame_age and latency), with the run's frames, seconds,
    FPS and drops repeated on each row."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS))
    writer.writeheader()
    for name in RUNTIMES:
        run = report["results"][name]
        stages = {**run["stages"], "frame_age": run["frame_age_ms"], "latency": run["latency_ms"]}
        for stage in (*STREAM_STAGES, "frame_age", "latency"):
            s = stages.get(stage)
            if not s:
                continue
            writer.writerow({"runtime": name, "stage": stage, "n": s["n"], "p50_ms": s["p50"], "p90_ms": s["p90"],
                             "p99_ms": s["p99"], "mean_ms": s["mean"], "max_ms": s["max"], "frames": run["frames"],
                             "seconds": run["seconds"], "fps": run["fps"], "drops": run["drops"]})
    return buffer.getvalue()


def plot_stages(path: Path, report: dict) -> bool:
    """Stacked bars of p50 ms per stage, naive loop and pipeline, each labelled with its FPS. False without
    matplotlib."""
    plt = pyplot(path)
    if plt is None:
        return False
    r = report["results"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = range(len(RUNTIMES))
    bottoms = [0.0] * len(RUNTIMES)
    colours = plt.get_cmap("tab10").colors
    for i, stage in enumerate(STREAM_STAGES):
        heights = [(r[name]["stages"].get(stage) or {}).get("p50", 0.0) for name in RUNTIMES]
        if not any(heights):
            continue
        ax.bar(x, heights, bottom=bottoms, width=0.55, label=stage, color=colours[i % len(colours)])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, name in enumerate(RUNTIMES):
        ax.annotate(f"{r[name]['fps']:.1f} fps", (i, bottoms[i]), ha="center", va="bottom", fontsize=9,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(x), [RUNTIME_LABELS[n] for n in RUNTIMES])
    ax.set_ylabel("p50 ms per frame, stacked by stage")
    ax.set_title("pipeline stages overlap in threads; FPS above each bar", fontsize=9)
    ax.set_ylim(0, max(bottoms) * 1.15 if max(bottoms) > 0 else 1)
    ax.grid(True, axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # top first
    fig.tight_layout()
    save_figure(fig, path)
    return True
