"""How fast is the stream pipeline, against a naive loop and against this machine's bound for the same work.

    python -m edgepix.benchmarks.stream_bound MODEL.onnx [--video V.mp4] [--frames 300] [--rounds 2]

1. The strongest simple sequential loop an OpenCV user writes: cv2.VideoCapture read, cv2.dnn.blobFromImage
   pre-processing (resize, RGB swap, mean and per-channel scale in one call), ONNX Runtime with default session
   options (fed in the model's input layout), numpy argmax or a threshold and cv2.resize as the spec says to read
   the output, colouring with cv2.LUT, cv2.addWeighted overlay, cv2.VideoWriter.
   (`naive_loop`, reused by `edgepix bench stream`.)
2. The pipeline (`edgepix.runtime.streams.pipeline`) on the same model file, video and output file type.
3. The machine's bound for the pipeline's work: cores / (sum over the stages of the CPU time per frame each takes
   when measured alone: decode, pre-process, inference with its threads, post-process + render, encode). CPU time
   is `time.process_time()` of this process, so decoder threads and ONNX Runtime pool threads (spinning included)
   count. On a CPU-only device every stage competes for the same cores, so no schedule beats this bound.

Naive and pipeline runs alternate (`--rounds`), so background load hits both; the median of each is reported.
The test video is a moving synthetic scene written with cv2.VideoWriter (mp4v) unless `--video` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edgepix.runtime.core.stats import LatencyStats

# ---- the test video -----------------------------------------------------------------------------------------


def make_video(path: str | os.PathLike, *, frames: int = 300, size: tuple[int, int] = (640, 480), fps: float = 30.0,
               seed: int = 0, source: str | None = None) -> Path:
    """A moving synthetic scene (textured background, noise, blur) as an mp4v video; size is (W, H).

    `source`: a `synthetic://` URI whose frames are written instead, exactly as the runtime draws them for that URI
    (its size, seed, speed and shading; at most its `frames=`); `size` and `seed` are then ignored and `fps` is the
    URI's frame rate (30 when it is unpaced)."""
    from edgepix.runtime.core.errors import SinkError

    if source is not None:
        from edgepix.runtime.streams.sources import SyntheticReader, parse_source

        reader = SyntheticReader(parse_source(source))
        reader.open()
        images = (got[0] for got in iter(reader.read, None))
        (w, h), fps = reader.size, reader.nominal_fps
    else:
        from edgepix.runtime.data.synthetic import MovingScene, SceneConfig

        w, h = size
        images = (image for image, _ in MovingScene(seed=seed, config=SceneConfig(size=(h, w))).frames(frames))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise SinkError(f"cannot write the test video {path} (no mp4v encoder in OpenCV, or the folder is read-only)")
    for n, image in enumerate(images):
        if n >= frames:
            break
        writer.write(image)
    writer.release()
    return Path(path)


# ---- the naive loop -------------------------------------------------------------------------------------------


#: the stages `edgepix bench stream` reports for both runtimes, in frame order
STREAM_STAGES = ("decode", "preprocess", "infer", "postprocess", "render", "encode")


@dataclass
class LoopResult:
    frames: int
    seconds: float
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    frame_ms: list[float] = field(default_factory=list)  # per frame: decode start -> encode end
    codec: str | None = None  # the writer's FourCC (None: nothing written)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def stage_stats(self) -> dict[str, dict]:
        return {k: LatencyStats.from_samples(v).as_dict() for k, v in self.stages_ms.items() if v}


def naive_spec(model: str | os.PathLike):
    """The ModelSpec the naive loop copies its pre-processing and output reading from: the model's own, or for a
    model exported elsewhere the one the runtime infers (description.specfile.read_spec), as its user would read it
    from the model's documentation; ModelFormatError for a model that does not segment."""
    from edgepix.runtime.core.errors import ModelFormatError
    from edgepix.runtime.description.spec import Task
    from edgepix.runtime.description.specfile import read_spec

    spec = read_spec(model).spec
    if spec.task is not Task.SEGMENTATION:
        raise ModelFormatError(f"{model}: the stream loop needs a segmentation model, got task {spec.task.value!r}")
    return spec


def naive_loop(model: str | os.PathLike, video: str | os.PathLike | int | cv2.VideoCapture,
               out: str | os.PathLike | None, *, max_frames: int | None = None, alpha: float = 0.5,
               codec: str = "mp4v", label: str | None = None) -> LoopResult:
    """The strongest simple loop, timed per stage (decode, preprocess, infer, postprocess, render, encode).

    Every step is the fastest single call OpenCV or numpy offers for it (blobFromImage instead of numpy arithmetic
    on the frame, cv2.LUT instead of palette indexing), so the pipeline's ratio over it is what edgepix adds, not
    what a careful user would have got anyway.

    Reads the model's mean/std/size/palette, input layout and how to read its output (layout, kind, threshold,
    upsampling) from its edgepix spec, as a user would copy them from training code or a model card. `video`: what
    cv2.VideoCapture opens (a file, a URL, a camera index) or an opened capture (`label` names it in errors).
    `out=None` skips writing (and its stage); the writer (FourCC `codec`, the source's frame rate) opens at the first
    frame, outside the timed stages."""
    import onnxruntime as ort

    from edgepix.runtime.core.errors import SinkError, SourceError

    spec = naive_spec(model)
    h_in, w_in = spec.input_size
    from edgepix.runtime.description.spec import ChannelOrder

    swap_rb = spec.channel_order is ChannelOrder.RGB  # frames are BGR
    # blobFromImage computes (pixel - mean) * scale per channel, in the model's channel order: the spec's
    # (x * spec.scale - mean) / std is pixel * spec.scale / std - mean / std.
    mean_px = tuple(float(m) / spec.scale for m in spec.mean)
    scale = tuple(spec.scale / float(sd) for sd in spec.std)
    blob_params = _blob_params(scale, mean_px, (w_in, h_in), swap_rb)
    if spec.input_layout.value == "NHWC":  # the model's own layout: the blob is NCHW
        nchw_blob = blob_params

        def blob_params(frame: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(nchw_blob(frame).transpose(0, 2, 3, 1))

    decode = _naive_decode(spec)
    lut = np.zeros((256, 1, 3), np.uint8)  # class -> BGR colour, for cv2.LUT on a 3-channel class map
    lut[: len(spec.colours()), 0] = np.array([c[::-1] for c in spec.colours()], np.uint8)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    cap = video if isinstance(video, cv2.VideoCapture) else cv2.VideoCapture(
        video if isinstance(video, int) else str(video))
    if not cap.isOpened():
        raise SourceError(f"the naive loop's cv2.VideoCapture cannot open {label or video}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    writer = None
    stages: dict[str, list[float]] = {k: [] for k in STREAM_STAGES}
    frame_ms: list[float] = []
    n = 0
    t_start = time.perf_counter()
    while max_frames is None or n < max_frames:
        t0 = time.perf_counter()
        ok, frame = cap.read()
        if not ok:
            break
        t1 = time.perf_counter()
        x = blob_params(frame)
        t2 = time.perf_counter()
        output = session.run(None, {name: x})[0]
        t3 = time.perf_counter()
        mask = decode(output[0], (frame.shape[1], frame.shape[0]))
        t4 = time.perf_counter()
        colours = cv2.LUT(cv2.merge((mask, mask, mask)), lut)
        overlay = cv2.addWeighted(frame, 1 - alpha, colours, alpha, 0)
        t5 = time.perf_counter()
        if out and writer is None:
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*codec), fps, (frame.shape[1], frame.shape[0]))
            if not writer.isOpened():
                cap.release()
                raise SinkError(f"the naive loop's cv2.VideoWriter cannot write {out} with codec {codec}")
            t5 = time.perf_counter()
        if writer is not None:
            writer.write(overlay)
        t6 = time.perf_counter()
        times = (("decode", t0, t1), ("preprocess", t1, t2), ("infer", t2, t3), ("postprocess", t3, t4),
                 ("render", t4, t5), ("encode", t5, t6))
        for key, a, b in times if writer is not None else times[:-1]:
            stages[key].append((b - a) * 1e3)
        frame_ms.append(sum(b - a for _, a, b in times) * 1e3)  # the writer's opening left out
        n += 1
    if writer is not None:
        writer.release()
    cap.release()
    return LoopResult(n, time.perf_counter() - t_start, {k: v for k, v in stages.items() if v}, frame_ms,
                      codec if out else None)


def _naive_decode(spec) -> Callable[[np.ndarray, tuple[int, int]], np.ndarray]:
    """(one sample of the output, the frame's (W, H)) -> a uint8 class mask at the frame's size, the way the spec
    says to read it, written as plainly as a user would: numpy's argmax over the class axis (or a threshold), and
    cv2.resize of the scores (bilinear, then the decision: `upsample` scores) or of the mask (nearest: classes)."""
    from edgepix.runtime.description.outputs import decision_threshold
    from edgepix.runtime.description.spec import BINARY_KINDS, OutputKind, Upsample

    kind, nhwc = spec.output_kind, spec.output_layout.value == "NHWC"
    threshold = decision_threshold(spec) if kind in BINARY_KINDS else None

    def decide(hwc: np.ndarray) -> np.ndarray:  # (h, w, C) scores, or (h, w) for a binary output
        if threshold is not None:
            return (hwc > threshold).astype(np.uint8)
        return np.argmax(hwc, axis=-1).astype(np.uint8)

    def decode(sample: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if kind is OutputKind.CLASS_MAP:
            mask = (sample if sample.ndim == 2 else sample[..., 0] if nhwc else sample[0]).astype(np.uint8)
            return cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        hwc = sample if nhwc else sample.transpose(1, 2, 0)
        if threshold is not None:
            hwc = hwc[..., 0]
        if spec.upsample is Upsample.SCORES:
            return decide(cv2.resize(np.ascontiguousarray(hwc, dtype=np.float32), size, interpolation=cv2.INTER_LINEAR))
        return cv2.resize(decide(hwc), size, interpolation=cv2.INTER_NEAREST)

    return decode


def _blob_params(scale: tuple[float, ...], mean_px: tuple[float, ...], size: tuple[int, int],
                 swap_rb: bool) -> Callable[[np.ndarray], np.ndarray]:
    """frame -> (1, 3, H, W) float32 with one OpenCV call: blobFromImageWithParams takes a scale per channel
    (OpenCV >= 4.8); older OpenCV gets blobFromImage with the mean, then one in-place multiply per channel."""
    if hasattr(cv2.dnn, "blobFromImageWithParams") and hasattr(cv2.dnn, "Image2BlobParams"):
        params = cv2.dnn.Image2BlobParams(scalefactor=scale, size=size, mean=mean_px, swapRB=swap_rb,
                                          ddepth=cv2.CV_32F)
        return lambda frame: cv2.dnn.blobFromImageWithParams(frame, params)
    per_channel = np.array(scale, np.float32)[None, :, None, None]

    def blob(frame: np.ndarray) -> np.ndarray:
        x = cv2.dnn.blobFromImage(frame, 1.0, size, mean_px, swapRB=swap_rb)
        x *= per_channel
        return x

    return blob


# ---- the pipeline ----------------------------------------------------------------------------------------------


def pipeline_run(model: str | os.PathLike, video: str | os.PathLike, out: str | os.PathLike | None, *,
                 backend: str = "auto", workers: int | None = None, threads: int | None = None,
                 max_frames: int | None = None, realtime: bool = False, prefetch: bool = True,
                 temporal: str | None = None) -> dict:
    """The stream pipeline over `video` into `out` (or null://); returns its statistics. `temporal`: a temporal
    stabilizer mode (tasks.temporal; "off" for none), whose masks' flicker is then measured (stats["temporal"])."""
    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions, choose_workers, resolve_backend
    from edgepix.runtime.streams.sources import SourceOptions
    from edgepix.runtime.tasks.segmenter import Segmenter
    from edgepix.runtime.tasks.temporal import SCORE_MODES, TemporalOptions

    temporal_options = TemporalOptions(mode=temporal or "off")
    plan = choose_workers(resolve_backend(model, backend), workers=workers, threads=threads)
    # ema and flow smooth the scores: an argmax fused into the graph would leave only the class map
    fuse = {"fuse_argmax": False} if temporal_options.mode in SCORE_MODES else {}

    def load() -> Segmenter:  # one per worker where the backend is not thread-safe
        return Segmenter.load(model, plan.backend, **fuse, **plan.backend_options())

    with load() as seg:
        plan = plan.for_processor(seg, can_load_more=True)
        pipeline = Pipeline(seg, [str(video)], [str(out) if out else "null://"],
                            PipelineOptions(workers=plan.workers, max_frames=max_frames, prefetch=prefetch,
                                            temporal=temporal_options, measure_flicker=temporal is not None),
                            source_options=SourceOptions(realtime=realtime),
                            info={"threads_per_worker": plan.threads, "plan": plan.describe()}, processor_factory=load)
        return pipeline.run()


def pipeline_stages(stats: dict) -> dict[str, dict]:
    """The pipeline's per-stage statistics under the names of STREAM_STAGES: `encode` is the write time of the
    first lossless sink (a video file or an image folder); null://, display and HTTP sinks are left out."""
    stages = stats["stages"]
    out = {k: stages[k] for k in STREAM_STAGES if k in stages}
    for sink in (s for s in stats.get("sinks", ()) if s.get("lossless")):
        key = f"sink {sink.get('uri', '')}"
        if key in stages:
            out["encode"] = stages[key]
            break
    return out


# ---- each stage alone -------------------------------------------------------------------------------------------


def _cpu_per_item(fn: Callable[[int], None], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of fn(i) for i in range(n)."""
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.process_time() - c0) * 1e3 / n, (time.perf_counter() - t0) * 1e3 / n


def stage_costs(model: str | os.PathLike, video: str | os.PathLike, *, backend: str = "auto",
                workers: int | None = None, threads: int | None = None, frames: int = 60,
                out_suffix: str = ".mp4") -> dict:
    """CPU milliseconds per frame of each pipeline stage measured alone, on the first `frames` frames, with the
    pipeline's inference plan (the same threads and spin setting per call)."""
    from edgepix.runtime.core.cpuinfo import usable_cores
    from edgepix.runtime.streams.pipeline import choose_workers, resolve_backend
    from edgepix.runtime.tasks.segmenter import Segmenter

    plan = choose_workers(resolve_backend(model, backend), workers=workers, threads=threads)
    name, threads = plan.backend, plan.threads
    terms: dict[str, dict] = {}

    cap = cv2.VideoCapture(str(video))
    images = []
    c0, t0 = time.process_time(), time.perf_counter()
    while len(images) < frames:
        ok, image = cap.read()
        if not ok:
            break
        images.append(image)
    n = len(images)
    terms["decode"] = {"cpu_ms": (time.process_time() - c0) * 1e3 / n, "wall_ms": (time.perf_counter() - t0) * 1e3 / n}
    cap.release()

    with Segmenter.load(model, name, **plan.backend_options()) as seg:
        buf = seg.normalizer.empty(max(1, seg.static_batch or 1))
        prepared = [None] * n

        def pre(i: int) -> None:
            prepared[i] = seg.preprocess([images[i]], out=buf)
            prepared[i].tensor = prepared[i].tensor.copy()

        seg.preprocess([images[0]], out=buf)  # warm-up
        cpu, wall = _cpu_per_item(pre, n)
        # the copy that keeps each tensor is not pipeline work: measure it alone and take it out
        ccpu, cwall = _cpu_per_item(lambda i: buf.copy(), n)
        terms["preprocess"] = {"cpu_ms": cpu - ccpu, "wall_ms": wall - cwall}

        raws = [None] * n
        for _ in range(3):
            seg.run(prepared[0].tensor)  # warm-up

        def infer(i: int) -> None:
            raws[i] = seg.run(prepared[i].tensor)

        cpu, wall = _cpu_per_item(infer, n)
        terms["infer"] = {"cpu_ms": cpu, "wall_ms": wall, "threads": threads or "default",
                          "wall_x_threads_ms": wall * (threads or usable_cores())}

        rendered = [None] * n

        def post(i: int) -> None:
            result = seg.postprocess(raws[i], prepared[i])[0]
            rendered[i] = seg.render(images[i], result)

        cpu, wall = _cpu_per_item(post, n)
        terms["postprocess+render"] = {"cpu_ms": cpu, "wall_ms": wall}

    with tempfile.TemporaryDirectory() as tmp:
        h, w = rendered[0].shape[:2]
        writer = cv2.VideoWriter(os.path.join(tmp, "enc" + out_suffix), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
        cpu, wall = _cpu_per_item(lambda i: writer.write(rendered[i]), n)
        writer.release()
        terms["encode"] = {"cpu_ms": cpu, "wall_ms": wall}

    cores = usable_cores()
    # The bound's terms: CPU time for every stage, and for inference its wall time x its threads (by
    # definition: the threads hold their cores for the whole call, spinning or not). Also reported: the bound
    # with inference's measured CPU time instead, which is the stricter of the two when threads sit idle.
    for name, t in terms.items():
        t["bound_ms"] = max(t["cpu_ms"], t["wall_x_threads_ms"]) if name == "infer" else t["cpu_ms"]
    total = sum(t["bound_ms"] for t in terms.values())
    cpu_total = sum(t["cpu_ms"] for t in terms.values())
    return {"terms": terms, "cores": cores, "cpu_ms_per_frame": total, "bound_fps": cores * 1e3 / total,
            "cpu_only_ms_per_frame": cpu_total, "cpu_only_bound_fps": cores * 1e3 / cpu_total,
            "frames_measured": n, "backend": plan.backend, "threads": threads, "plan": plan.describe()}


# ---- start-up and memory ------------------------------------------------------------------------------------------


def startup(model: str | os.PathLike, source: str, *, runs: int = 3, frames: int = 30) -> list[dict]:
    """`edgepix segment` in a fresh process, as a user starts it: seconds from spawning the process to the first
    output frame on disk (an image folder sink, polled every 2 ms), the same measured inside the process from
    its start time, and the peak RSS of the whole run (one stream, `frames` frames)."""
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            out, stats_path = Path(tmp) / "frames", Path(tmp) / "stats.json"
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "edgepix", "-q", "segment", str(model), "--source", source,
                                     "--sink", f"{out}/", "--max-frames", str(frames), "--stats", str(stats_path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            first = None
            while first is None and proc.poll() is None:
                if out.is_dir() and any(out.iterdir()):
                    first = time.perf_counter() - t0
                    break
                time.sleep(0.002)
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"edgepix segment failed: {err}")
            stats = json.loads(stats_path.read_text())
            results.append({"first_frame_on_disk_s": first, "first_output_in_process_s":
                            stats["first_output_since_process_start_s"], "peak_rss_mb": stats["peak_rss_mb"],
                            "frames": stats["frames"]})
    return results


# ---- a live network stream: frame age and reconnect ------------------------------------------------------------


def listening(port: int) -> bool:
    """Whether something listens on TCP `port` (the kernel's table: a probe connection would be taken as ffmpeg's
    one client)."""
    with open("/proc/net/tcp") as f:
        rows = f.read().splitlines()[1:]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)


def free_port() -> int:
    import contextlib
    import socket

    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """ffmpeg serving a looping video in real time as MPEG-TS over HTTP on 127.0.0.1 (one client at a time), like
    an IP camera: re-encoded to MPEG-2 at quality `quality` with a GOP of `gop` frames (a reconnecting client
    decodes from the next key frame), at `fps` (None: the video's own rate)."""

    def __init__(self, video: str | os.PathLike, port: int, *, fps: float | None = None, quality: int = 5,
                 gop: int = 5) -> None:
        self.video, self.port = Path(video), port
        self.fps, self.quality, self.gop = fps, quality, gop
        self.url = f"http://127.0.0.1:{port}/live.ts"
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> float:
        """Start ffmpeg; returns when it started. `wait`: first until it listens (a client that connects at once
        closes ffmpeg's one-client listening socket, so a restart does not wait)."""
        rate = ["-r", str(self.fps)] if self.fps is not None else []
        started = time.monotonic()
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i",
             str(self.video), "-an", *rate, "-c:v", "mpeg2video", "-q:v", str(self.quality), "-g", str(self.gop),
             "-f", "mpegts", "-listen", "1", self.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while wait and time.monotonic() < deadline and not listening(self.port):
            time.sleep(0.01)
        return started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def live_check(model: str | os.PathLike, video: str | os.PathLike, *, fps: float = 30.0, steady_s: float = 8.0,
               outage_s: float = 3.0) -> dict:
    """ffmpeg serves `video` in real time as MPEG-TS over HTTP on 127.0.0.1; the pipeline (default options:
    backoff up to 0.5 s, read timeout 5 s) segments it. Measures the frame age at steady state, then kills the
    server for `outage_s`, starts it again and measures how long after its return the first frame arrives."""
    import shutil
    import threading

    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions, choose_workers, resolve_backend
    from edgepix.runtime.tasks.segmenter import Segmenter

    if shutil.which("ffmpeg") is None:
        raise SystemExit("the live check needs ffmpeg (apt-get install ffmpeg)")
    server = LiveServer(video, free_port(), fps=fps, quality=4, gop=15)
    plan = choose_workers(resolve_backend(model, "auto"))
    server.start()
    seg = Segmenter.load(model, plan.backend, **plan.backend_options())
    pipeline = Pipeline(seg, [server.url], ["null://"], PipelineOptions(workers=plan.workers),
                        processor_factory=lambda: Segmenter.load(model, plan.backend, **plan.backend_options()))
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    try:
        while pipeline.frames < 5:
            time.sleep(0.05)
        time.sleep(2.0)  # settle
        ages = pipeline._ages[0]
        start_n = len(ages)
        time.sleep(steady_s)
        steady = list(ages)[start_n:]
        source = pipeline.sources[0]
        server.kill()
        time.sleep(outage_s)
        read_before = source.frames_read
        server.start()
        t_back = time.monotonic()
        while source.frames_read == read_before and time.monotonic() - t_back < 30:
            time.sleep(0.005)
        first_frame_s = time.monotonic() - t_back
        outage = source.outages[-1] if source.outages else None
        time.sleep(2.0)
        state_after = source.state.value
        frames_after = source.frames_read - read_before
    finally:
        pipeline.stop()
        thread.join(10)
        server.kill()
        seg.close()
    age = LatencyStats.from_samples(steady)
    return {"fps": fps, "frame_interval_ms": 1000.0 / fps, "steady_frames": len(steady), "frame_age_ms": age.as_dict(),
            "reconnect_first_frame_s": first_frame_s, "outage_s": outage.duration if outage else None,
            "reconnect_attempts": outage.attempts if outage else None, "reconnects": source.reconnects,
            "state_after": state_after, "frames_in_2s_after": frames_after, "frames": pipeline.frames}


# ---- the report -------------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the exported .onnx (the naive loop and the pipeline both run it)")
    ap.add_argument("--pipeline-model", type=Path, help="another export of the same checkpoint for the pipeline")
    ap.add_argument("--video", type=Path, help="input video (default: a 640x480 synthetic scene, --frames long)")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2, help="naive/pipeline runs, alternating")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-prefetch", action="store_true", help="workers pre-process in the same thread")
    ap.add_argument("--json", type=Path, help="write everything measured here")
    ap.add_argument("--startup-only", action="store_true",
                    help="only measure `edgepix segment` start-up time and peak RSS (file and synthetic source)")
    ap.add_argument("--live-only", action="store_true",
                    help="only measure frame age and reconnect time on a live HTTP stream served by ffmpeg")
    args = ap.parse_args(argv)
    if args.startup_only:
        return report_startup(args)
    if args.live_only:
        return report_live(args)
    return report_bound(args)


def report_bound(args: argparse.Namespace) -> int:
    """Naive loop and pipeline in alternating rounds, then each stage alone for the bound; prints both ratios."""
    from edgepix.benchmarks.environment import describe, environment

    with tempfile.TemporaryDirectory(prefix="stream_bound_") as tmp:
        work = Path(tmp)
        video = args.video
        if video is None:
            print(f"writing a {args.frames}-frame 640x480 synthetic video ...", file=sys.stderr)
            video = make_video(work / "scene.mp4", frames=args.frames)
        cap = cv2.VideoCapture(str(video))
        vw, vh, vn = (int(cap.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT,
                                                 cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        pmodel = args.pipeline_model or args.model
        env = environment()
        print(describe(env))
        print(f"video {video} {vw}x{vh}, {vn} frames; model {args.model}" +
              (f", pipeline model {pmodel}" if pmodel != args.model else ""))
        print(f"load average before: {load_average()}")
        naive, piped = _alternate_rounds(args, video, pmodel, work)
        naive_fps = statistics.median(r.fps for r in naive)
        pipe_fps = statistics.median(s["fps"] for s in piped)
        bound = stage_costs(pmodel, video, backend=args.backend, workers=args.workers, threads=args.threads)
        print(f"load average after: {load_average()}")
        print()
        _print_bound(bound)
        print()
        _print_stage_table(naive[-1].stage_stats(), pipeline_stages(piped[-1]))
        print()
        _print_ratios(naive_fps, pipe_fps, bound, args.rounds)
        if args.json:
            _write_json(args.json, {
                "environment": env, "video": {"path": str(video), "size": [vw, vh], "frames": vn},
                "naive": [{"fps": r.fps, "frames": r.frames, "seconds": r.seconds, "stages": r.stage_stats()}
                          for r in naive],
                "pipeline": piped, "bound": bound, "naive_fps": naive_fps, "pipeline_fps": pipe_fps,
                "ratio_naive": pipe_fps / naive_fps, "ratio_bound": pipe_fps / bound["bound_fps"]})
    return 0


def _alternate_rounds(args: argparse.Namespace, video: Path, pmodel: Path,
                      work: Path) -> tuple[list[LoopResult], list[dict]]:
    """`args.rounds` rounds of the naive loop then the pipeline, so background load hits both alike."""
    naive, piped = [], []
    for r in range(args.rounds):
        res = naive_loop(args.model, video, work / "naive.mp4")
        naive.append(res)
        print(f"round {r + 1}: naive loop {res.frames} frames in {res.seconds:.2f} s = {res.fps:.1f} fps")
        st = pipeline_run(pmodel, video, work / "pipeline.mp4", backend=args.backend, workers=args.workers,
                          threads=args.threads, prefetch=not args.no_prefetch)
        piped.append(st)
        print(f"round {r + 1}: pipeline   {st['frames']} frames in {st['elapsed_s']:.2f} s = {st['fps']:.1f} fps "
              f"({st['config']['plan']}, {st['config']['backend']})")
    return naive, piped


def _print_bound(bound: dict) -> None:
    print("each stage alone, ms per frame:  " + ", ".join(
        f"{k} {v['bound_ms']:.2f}" for k, v in bound["terms"].items())
        + f"  = {bound['cpu_ms_per_frame']:.2f} ms")
    inf = bound["terms"]["infer"]
    print(f"  (CPU time, except inference: {inf['wall_ms']:.2f} ms wall x {inf['threads']} thread(s) = "
          f"{inf['wall_x_threads_ms']:.2f} ms, whose CPU time was {inf['cpu_ms']:.2f} ms)")
    print(f"bound = {bound['cores']} cores / {bound['cpu_ms_per_frame']:.2f} ms = {bound['bound_fps']:.1f} fps")


def _print_stage_table(naive_stats: dict[str, dict], pipe_stats: dict[str, dict]) -> None:
    print("per stage p50 / p90 / p99 ms (last round)      naive loop                pipeline")
    for k in STREAM_STAGES:
        a = naive_stats.get(k)
        b = pipe_stats.get(k)
        fa = f"{a['p50']:6.2f} {a['p90']:6.2f} {a['p99']:6.2f}" if a else " " * 20
        fb = f"{b['p50']:6.2f} {b['p90']:6.2f} {b['p99']:6.2f}" if b else ""
        print(f"  {k:<12} {fa:>40}    {fb}")


def _print_ratios(naive_fps: float, pipe_fps: float, bound: dict, rounds: int) -> None:
    print(f"naive loop:  {naive_fps:.1f} fps (median of {rounds})")
    print(f"pipeline:    {pipe_fps:.1f} fps (median of {rounds})")
    print(f"pipeline / naive = {pipe_fps / naive_fps:.2f}x (target >= 1.5x)")
    print(f"pipeline / bound = {pipe_fps / bound['bound_fps']:.2f} (target >= 0.8; bound {bound['bound_fps']:.1f} fps)")
    print(f"pipeline / bound with inference counted by its CPU time = "
          f"{pipe_fps / bound['cpu_only_bound_fps']:.2f} (bound {bound['cpu_only_bound_fps']:.1f} fps = "
          f"{bound['cores']} / {bound['cpu_only_ms_per_frame']:.2f} ms)")


def _write_json(path: Path, data: object) -> None:
    from edgepix.runtime.core.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def report_live(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="stream_live_") as tmp:
        video = args.video or make_video(Path(tmp) / "scene.mp4", frames=90)
        print(f"load average: {load_average()}")
        r = live_check(args.model, video)
        a = r["frame_age_ms"]
        print(f"live HTTP MPEG-TS stream at {r['fps']:.0f} fps (frame interval {r['frame_interval_ms']:.1f} ms), "
              f"{r['steady_frames']} frames at steady state: frame age p50 {a['p50']:.1f} ms, p90 {a['p90']:.1f}, "
              f"p99 {a['p99']:.1f}, max {a['max']:.1f} (target < {2 * r['frame_interval_ms']:.1f} ms)")
        print(f"server killed for 3 s and started again: first frame {r['reconnect_first_frame_s']:.2f} s after it "
              f"returned (target < 5 s); outage {r['outage_s']:.2f} s, {r['reconnect_attempts']} attempts, "
              f"reconnects {r['reconnects']}; 2 s later: state {r['state_after']}, {r['frames_in_2s_after']} frames")
        if args.json:
            _write_json(args.json, r)
    return 0


def report_startup(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="stream_startup_") as tmp:
        video = args.video or make_video(Path(tmp) / "scene.mp4", frames=60)
        print(f"load average: {load_average()}")
        rows = {}
        for label, source in (("video file 640x480", str(video)), ("live synthetic:// 640x480 30 fps",
                                                                     "synthetic://?size=640x480&fps=30")):
            rows[label] = r = startup(args.model, source, runs=3)
            for x in r:
                print(f"{label}: first output frame {x['first_frame_on_disk_s']:.3f} s after spawning (in-process "
                      f"{x['first_output_in_process_s']:.3f} s since process start); peak RSS "
                      f"{x['peak_rss_mb']:.0f} MB over {x['frames']} frames")
            print(f"{label}: median first frame {statistics.median(x['first_frame_on_disk_s'] for x in r):.3f} s "
                  f"(target < 1.5 s), max peak RSS {max(x['peak_rss_mb'] for x in r):.0f} MB (target < 200 MB)")
        if args.json:
            _write_json(args.json, rows)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
