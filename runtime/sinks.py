"""Frame sinks: where rendered frames go. Several at once; each runs in its own pipeline thread.

| URI                                 | what                                                                            |
|-------------------------------------|---------------------------------------------------------------------------------|
| `display://` (`display://0`)        | a window per stream with a HUD (FPS and per-stage milliseconds); q or Esc stops  |
| `out.mp4`, `out.avi`, `out.mkv`, `out.webm` | a video file: codec by extension, the source's frame rate, the first frame's size |
| `out/`, `out/frame_%05d.png`        | an image folder (JPEG unless the pattern says otherwise)                        |
| `http://127.0.0.1:8080`             | an MJPEG stream, an HTML page with the live view and statistics, `/stats.json`  |
| `null://`                           | nothing (measure the pipeline alone)                                            |

`?stream=N` after a sink URI sends it one stream only; otherwise a sink gets every stream (files and folders then
write one file or subfolder per stream: `out_0.mp4`, `out/0/`). Video files are written to a temporary name
beside the target and renamed when finished, so a video at its path is always complete and playable; the
pipeline finishes them on Ctrl-C and SIGTERM.

Frames of a live source are written at the source's nominal rate by timestamp (a constant-frame-rate file: a
frame is repeated when processing was slower than the camera), so the file plays at the speed of the scene; frames
of a file are written one for one at the file's rate.

Sinks that must not lose frames (files, folders) make the pipeline wait for them; the others (display, HTTP,
null) take the newest frame and count what they skipped, so a slow window or a slow browser never holds up the
pipeline. An HTTP client that reads slowly gets fewer frames; one that vanishes is dropped after a timeout; a
connection that does not send its request within a few seconds is closed, and viewers beyond `?clients=N` (16)
get a 503 (`http://0.0.0.0:8080?clients=32` allows more), so idle or hostile connections cannot starve the server.

A video that cannot be finished (a full disk, an I/O error) stops the run with one error naming the file and the
cause, and nothing is left at its path. Partial files that a killed run left behind are removed by the next run
that writes the same file (see `runtime.fileio`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from .errors import SinkError, unknown_name
from .fileio import PartialFile, check_writable, check_writable_folder, remove_stale_partials
from .formats import IMAGE_WRITE_SUFFIXES

log = logging.getLogger(__name__)

VIDEO_CODECS: dict[str, tuple[str, ...]] = {
    # first the codec players like best, then one the opencv-python wheel's FFmpeg always has
    ".mp4": ("avc1", "mp4v"),
    ".m4v": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".mkv": ("avc1", "mp4v", "MJPG"),
    ".avi": ("MJPG", "XVID"),
    ".webm": ("VP90", "VP80"),
}


@dataclass(frozen=True)
class StreamInfo:
    stream_id: int
    label: str  # the source URI
    fps: float | None  # the source's nominal frame rate (sanitised), None if unknown
    live: bool  # True: frames are placed by timestamp in video files


@dataclass
class SinkContext:
    """What a sink learns when the pipeline opens it."""

    streams: list[StreamInfo]
    stats: Callable[[], dict] = dict  # the pipeline's statistics (for HUDs and the HTTP page)
    request_stop: Callable[[], None] = lambda: None  # a window closed: stop the pipeline
    title: str = "edgepix"


@dataclass
class Output:
    """One rendered frame on its way to the sinks."""

    image: np.ndarray  # BGR uint8, rendered (shared between sinks: never modify it)
    stream_id: int
    index: int  # the frame's index in its stream
    timestamp: float  # the source frame's time.monotonic()
    class_fractions: Sequence[float] | None = None


class Sink:
    """Base class. `preflight()` checks, before the model loads, that the paths the sink will write can be
    written; `open()` checks what can be checked before frames flow (folders, ports, the screen); `write()` runs
    in the sink's own thread; `close()` finishes files."""

    lossless = True  # False: the pipeline hands over the newest frame and counts skipped ones
    uri: str = ""

    def __init__(self, uri: str, streams: frozenset[int] | None = None) -> None:
        self.uri = uri
        self.streams = streams  # None: every stream
        self.frames_written = 0

    def accepts(self, stream_id: int) -> bool:
        return self.streams is None or stream_id in self.streams

    def preflight(self) -> None:
        """Raise SinkError now if what this sink writes cannot be written (a run must not fail at its end)."""

    def open(self, ctx: SinkContext) -> None:
        self.ctx = ctx

    def write(self, out: Output) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {"uri": self.uri, "frames_written": self.frames_written}

    def multi(self) -> bool:
        """Several streams go to this sink."""
        n = len(self.ctx.streams) if self.streams is None else len(self.streams)
        return n > 1


class NullSink(Sink):
    lossless = False

    def write(self, out: Output) -> None:
        self.frames_written += 1


# ---- video files -------------------------------------------------------------------------------------------


_CODEC_WORKS: dict[str, bool] = {}  # fourcc -> whether this process's OpenCV could open a writer with it


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """Silence file descriptor 2 (where FFmpeg logs) for a moment."""
    if not quiet:
        yield
        return
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _disk_full(folder: Path) -> str | None:
    """'no space left on device' if the file system holding `folder` is (nearly) full, else None."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    # root may use the blocks reserved for it, other users may not
    free = (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < 1 << 20:
        return f"no space left on device ({free // 1024} KiB free on the disk holding {folder})"
    return None


class VideoFileWriter:
    """One cv2.VideoWriter: opened at the first frame, written to a locked partial file beside the target and
    renamed over the target only once it is closed and verified, so the target is a complete, playable video
    or absent.

    Every write is checked (OpenCV says whether FFmpeg wrote the frame) and so is the finished file (reopened,
    its frames counted): a full disk or an I/O error becomes one SinkError naming the file and the cause, and the
    partial file is deleted (an MP4 without its index is unplayable, so there is nothing worth keeping)."""

    def __init__(self, path: Path, fps: float, live: bool, codecs: Sequence[str]) -> None:
        self.path, self.fps, self.live, self.codecs = path, fps, live, codecs
        self.part: PartialFile | None = None
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (W, H)
        self.fourcc = ""
        self.written = 0  # frames in the file (repeats included)
        self.t0: float | None = None
        self.error: str | None = None  # why the file was given up
        self.complete = False  # closed, verified and renamed to `path`

    def _open(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        # Most encoders want even sizes; an odd camera mode is scaled by a pixel.
        self.size = (w + (w & 1), h + (h & 1))
        try:
            self.part = PartialFile(self.path)
        except OSError as e:
            raise SinkError(f"cannot write video {self.path}: {e.strerror or e}") from None
        for i, fourcc in enumerate(self.codecs):
            if _CODEC_WORKS.get(fourcc) is False:
                continue
            last = i == len(self.codecs) - 1
            # FFmpeg prints its own errors for an encoder it lacks (the opencv-python wheel has no H.264
            # encoder); a fallback follows, so keep the first trial of each codec quiet.
            with _quiet_stderr(not last and fourcc not in _CODEC_WORKS):
                writer = cv2.VideoWriter(str(self.part.path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc),
                                         self.fps, self.size)
            _CODEC_WORKS[fourcc] = writer.isOpened()
            if writer.isOpened():
                self.writer, self.fourcc = writer, fourcc
                return
            writer.release()
        self.part.discard()
        raise SinkError(f"cannot write video {self.path}: OpenCV's FFmpeg has none of the codecs "
                        f"{', '.join(self.codecs)} for {self.path.suffix} (try .avi, which uses MJPG)")

    def write(self, image: np.ndarray, timestamp: float) -> None:
        if self.error is not None:
            return
        if self.writer is None:
            self._open(image)
            self.t0 = timestamp
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        repeats = 1
        if self.live:
            # Constant frame rate: the frame belongs at slot round((t - t0) * fps); fill the gap up to it.
            slot = int(round((timestamp - self.t0) * self.fps))  # type: ignore[operator]
            repeats = slot + 1 - self.written
            if repeats <= 0:
                return  # faster than the nominal rate: this slot is taken
            repeats = min(repeats, int(self.fps * 5) + 1)  # never pad an outage with more than ~5 s
        for _ in range(repeats):
            # False: FFmpeg could not write the frame (a full disk, an I/O error); None: an OpenCV too old to say
            if self.writer.write(image) is False:  # type: ignore[union-attr]
                self._give_up(f"FFmpeg could not write frame {self.written + 1}")
            self.written += 1

    def _give_up(self, cause: str) -> None:
        """Delete the partial file and raise one SinkError with the cause (a full disk is named as such)."""
        cause = _disk_full(self.path.parent) or cause
        if self.writer is not None:
            with _quiet_stderr(True):  # FFmpeg complains about the trailer it cannot write either
                self.writer.release()
            self.writer = None
        if self.part is not None:
            self.part.discard()
        self.error = f"cannot write video {self.path}: {cause}; the unfinished file ({self.written} frames) was deleted"
        raise SinkError(self.error)

    def _verify(self) -> str | None:
        """Why the finished partial file is not a complete, playable video, or None if it is."""
        with _quiet_stderr(True):
            cap = cv2.VideoCapture(str(self.part.path), cv2.CAP_FFMPEG)  # type: ignore[union-attr]
            try:
                if not cap.isOpened():
                    return "the finished file does not open (its index could not be written)"
                count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
                # Some containers estimate their frame count from the duration: allow one frame of rounding.
                if 0 < count < self.written - 1:
                    return f"the finished file holds {int(count)} of the {self.written} frames written"
                if not cap.read()[0]:
                    return "no frame of the finished file decodes"
            finally:
                cap.release()
        return None

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        if not self.written:
            self.part.discard()  # type: ignore[union-attr]
            return
        problem = self._verify()
        if problem is not None:
            self._give_up(problem)
        try:
            self.part.commit()  # type: ignore[union-attr]
        except OSError as e:
            self._give_up(e.strerror or str(e))
        self.complete = True

    def abandon(self) -> None:
        """Stop without finishing: the partial file is deleted, the target left as it was."""
        if self.writer is not None:
            with _quiet_stderr(True):
                self.writer.release()
            self.writer = None
        if self.part is not None:
            self.part.discard()

    def stats(self) -> dict:
        d = {"frames": self.written if self.error is None else 0, "fps": self.fps, "size": self.size,
             "codec": self.fourcc, "complete": self.complete}
        if self.error is not None:
            d["error"] = self.error
        return d


class VideoFileSink(Sink):
    def __init__(self, uri: str, path: Path, streams: frozenset[int] | None = None, *, fps: float | None = None,
                 codec: str | None = None) -> None:
        super().__init__(uri, streams)
        self.path = path
        suffix = path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise SinkError(unknown_name("video file type", suffix, VIDEO_CODECS))
        self.codecs = (codec,) if codec else VIDEO_CODECS[suffix]
        self.fps_override = fps
        self.writers: dict[int, VideoFileWriter] = {}

    def preflight(self) -> None:
        check_writable(self.path, "video", SinkError)

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.preflight()
        if self.multi():  # one file per stream: their partial files from a killed run go too
            for s in ctx.streams:
                if self.accepts(s.stream_id):
                    remove_stale_partials(self.path_for(s.stream_id))

    def path_for(self, stream_id: int) -> Path:
        if not self.multi():
            return self.path
        return self.path.with_name(f"{self.path.stem}_{stream_id}{self.path.suffix}")

    def write(self, out: Output) -> None:
        w = self.writers.get(out.stream_id)
        if w is None:
            info = self.ctx.streams[out.stream_id]
            fps = self.fps_override or info.fps or 30.0
            w = self.writers[out.stream_id] = VideoFileWriter(self.path_for(out.stream_id), fps, info.live, self.codecs)
        w.write(out.image, out.timestamp)
        self.frames_written += 1

    def close(self) -> None:
        errors = []
        for w in self.writers.values():  # every file is finished, even when one of them fails
            try:
                w.close()
            except SinkError as e:
                errors.append(str(e))
        if errors:
            raise SinkError("; ".join(errors))

    def stats(self) -> dict:
        return {**super().stats(), "files": {str(w.path): w.stats() for w in self.writers.values()}}


# ---- image folders ------------------------------------------------------------------------------------------


class ImageFolderSink(Sink):
    """`dir/` -> dir/000000.jpg ...; `dir/name_%05d.png` -> a printf pattern of the frame index."""

    def __init__(self, uri: str, target: str, streams: frozenset[int] | None = None) -> None:
        super().__init__(uri, streams)
        if "%" in target:
            self.folder, self.pattern = Path(os.path.dirname(target) or "."), os.path.basename(target)
            try:
                self.pattern % 0
            except (TypeError, ValueError):
                raise SinkError(f"{uri}: expected a pattern with one integer field such as frame_%05d.png") from None
            if not self.pattern.lower().endswith(IMAGE_WRITE_SUFFIXES):
                raise SinkError(f"{uri}: the pattern must end in an image type ({', '.join(IMAGE_WRITE_SUFFIXES)})")
        else:
            self.folder, self.pattern = Path(target), "%06d.jpg"

    def preflight(self) -> None:
        check_writable_folder(self.folder, "image folder", SinkError)

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.preflight()

    def write(self, out: Output) -> None:
        folder = self.folder / str(out.stream_id) if self.multi() else self.folder
        if self.multi():
            folder.mkdir(exist_ok=True)
        path = folder / (self.pattern % out.index)
        if not cv2.imwrite(str(path), out.image):
            raise SinkError(f"cannot write image {path} (disk full or not writable?)")
        self.frames_written += 1


# ---- display --------------------------------------------------------------------------------------------------


def draw_hud(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """A copy of `image` with text lines on a dark band, top-left."""
    out = image.copy()
    scale = max(0.4, min(0.8, image.shape[0] / 900))
    thickness = 1
    line_h = int(28 * scale) + 4
    width = max((cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] for s in lines), default=0)
    h, w = min(out.shape[0], line_h * len(lines) + 8), min(out.shape[1], width + 12)
    region = out[:h, :w]
    region[:] = (region * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(out, text, (6, 4 + line_h * (i + 1) - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return out


def hud_lines(stats: dict, stream_id: int) -> list[str]:
    stages = stats.get("stages", {})

    def ms(name: str) -> str:
        s = stages.get(name)
        return f"{s['p50']:.1f}" if s else "-"

    stream = next((s for s in stats.get("streams", []) if s.get("stream_id") == stream_id), {})
    lines = [f"{stats.get('fps_now', 0.0):.1f} FPS  frame {stream.get('frames_processed', 0)}  "
             f"drops {stream.get('dropped', 0)}",
             f"decode {ms('decode')}  pre {ms('preprocess')}  infer {ms('infer')}  post {ms('postprocess')}  "
             f"render {ms('render')} ms"]
    if stream.get("state") not in (None, "up"):
        lines.append(f"source {stream.get('state_text', stream.get('state'))}")
    return lines


def display_available() -> str | None:
    """None if a window can open here, else why not."""
    if os.name == "posix" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no screen (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    info = cv2.getBuildInformation()
    m = re.search(r"GUI:\s+(\S+)", info)
    if m and m.group(1).upper() == "NONE":
        return f"this OpenCV {cv2.__version__} has no GUI (opencv-python-headless?)"
    return None


class DisplaySink(Sink):
    lossless = False

    def __init__(self, uri: str, streams: frozenset[int] | None = None, *, hud: bool = True) -> None:
        super().__init__(uri, streams)
        self.hud = hud
        self.windows: dict[int, str] = {}

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        reason = display_available()
        if reason is not None:
            raise SinkError(f"display:// cannot open a window: {reason}; on a headless device watch in a browser "
                            "with --sink http://0.0.0.0:8080, or write a file with --sink out.mp4")

    def write(self, out: Output) -> None:
        name = self.windows.get(out.stream_id)
        if name is None:
            label = self.ctx.streams[out.stream_id].label
            name = self.windows[out.stream_id] = f"{self.ctx.title} [{out.stream_id}] {label}"
            cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
            cv2.resizeWindow(name, out.image.shape[1], out.image.shape[0])
        image = draw_hud(out.image, hud_lines(self.ctx.stats(), out.stream_id)) if self.hud else out.image
        cv2.imshow(name, image)
        key = cv2.waitKey(1) & 0xFF
        closed = cv2.getWindowProperty(name, cv2.WND_PROP_VISIBLE) < 1
        if key in (ord("q"), 27) or closed:
            self.ctx.request_stop()
        self.frames_written += 1

    def close(self) -> None:
        for name in self.windows.values():
            try:
                cv2.destroyWindow(name)
                cv2.waitKey(1)  # let the GUI toolkit process the close in this (the window's) thread
            except cv2.error:
                pass
        self.windows.clear()


# ---- HTTP: MJPEG stream, page, statistics ---------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 1em; }}
.views {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; background: #000; display: block; }}
table {{ border-collapse: collapse; margin-top: 1em; font-size: 0.9em; }}
td, th {{ border-bottom: 1px solid #333; padding: 2px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
</style></head>
<body><h3>{title}</h3>
<div class="views">{views}</div>
<div id="summary"></div>
<table id="stages"></table>
<table id="streams"></table>
<script>
async function refresh() {{
  try {{
    const s = await (await fetch("stats.json", {{cache: "no-store"}})).json();
    document.getElementById("summary").textContent =
      `${{s.fps_now.toFixed(1)}} FPS now, ${{s.fps.toFixed(1)}} average, ${{s.frames}} frames in ${{s.elapsed_s.toFixed(0)}} s`;
    let rows = "<tr><th>stage (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>n</th></tr>";
    for (const [name, v] of Object.entries(s.stages))
      rows += `<tr><td>${{name}}</td><td>${{v.p50.toFixed(1)}}</td><td>${{v.p90.toFixed(1)}}</td><td>${{v.p99.toFixed(1)}}</td><td>${{v.n}}</td></tr>`;
    document.getElementById("stages").innerHTML = rows;
    rows = "<tr><th>stream</th><th>state</th><th>frames</th><th>drops</th><th>reconnects</th></tr>";
    for (const v of s.streams)
      rows += `<tr><td>${{v.uri}}</td><td>${{v.state_text}}</td><td>${{v.frames_processed}}</td><td>${{v.dropped}}</td><td>${{v.reconnects}}</td></tr>`;
    document.getElementById("streams").innerHTML = rows;
  }} catch (e) {{}}
}}
setInterval(refresh, 1000); refresh();
</script></body></html>
"""

BOUNDARY = "edgepixframe"


class _Latest:
    """The newest frame of one stream, JPEG-encoded on demand (once per frame, only while someone watches)."""

    def __init__(self) -> None:
        self.seq = 0
        self.image: np.ndarray | None = None
        self.jpeg: bytes | None = None
        self.jpeg_seq = -1


class HttpSink(Sink):
    """MJPEG over HTTP. Routes: `/` page, `/stream.mjpg` (stream 0) and `/stream/N.mjpg`, `/frame.jpg` and
    `/frame/N.jpg` (one JPEG), `/stats.json`. Every client waits for the newest frame on its own, so a slow or
    vanished client holds up only itself; a send that blocks longer than `client_timeout` drops the client.

    Bad clients cannot starve the server: a connection must deliver its whole request head within
    `request_timeout` seconds (a silent connection, or one that stops mid-header, is closed with a 408), at most
    `max_connections` connections are served at once (more get a 503 at once, without a thread), and at most
    `max_clients` of them may watch a stream (more get a 503 that says so; the page and /stats.json still work)."""

    lossless = False

    def __init__(self, uri: str, host: str, port: int, streams: frozenset[int] | None = None, *, quality: int = 80,
                 client_timeout: float = 10.0, request_timeout: float = 5.0, max_clients: int = 16,
                 max_connections: int = 128) -> None:
        super().__init__(uri, streams)
        if max_clients < 1 or max_connections < max_clients:
            raise SinkError(f"{uri}: expected 1 <= max_clients <= max_connections, got {max_clients} and "
                            f"{max_connections}")
        if not 0 < request_timeout <= 60 or not 0 < client_timeout <= 600:
            raise SinkError(f"{uri}: expected timeouts of 0..60 s (request) and 0..600 s (client), got "
                            f"{request_timeout} and {client_timeout}")
        self.host, self.port = host, port
        self.quality = quality
        self.client_timeout = client_timeout
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.max_connections = max_connections
        self.cond = threading.Condition()
        self.latest: dict[int, _Latest] = {}
        self.closed = False
        self.clients = 0
        self.clients_total = 0
        self.clients_timed_out = 0
        self.frames_sent = 0
        self.connections = 0  # open connections (each has a thread)
        self.requests_timed_out = 0  # connections closed because their request head did not arrive in time
        self.refused_busy = 0  # connections and viewers turned away with a 503
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/"

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        for s in ctx.streams:
            if self.accepts(s.stream_id):
                self.latest[s.stream_id] = _Latest()
        sink = self

        class Handler(_Handler):
            pass

        Handler.sink = sink
        try:
            server = _Server((self.host, self.port), Handler, sink)
        except OSError as e:
            raise SinkError(f"{self.uri}: cannot listen on {self.host}:{self.port}: {e.strerror or e}; pick another "
                            "port (or :0 for any free one)") from e
        self.server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http-sink", daemon=True)
        self._thread.start()
        if self.host in ("", "0.0.0.0", "::"):
            log.info("MJPEG server on all interfaces, port %d: http://<this device's address>:%d/ (here %s)",
                     self.port, self.port, self.url)
        else:
            log.info("watch the stream at %s", self.url)

    def write(self, out: Output) -> None:
        slot = self.latest.get(out.stream_id)
        if slot is None:
            return
        with self.cond:
            slot.image = out.image
            slot.seq += 1
            self.cond.notify_all()
        self.frames_written += 1

    def jpeg(self, stream_id: int) -> tuple[int, bytes | None]:
        """(sequence number, JPEG) of the stream's newest frame; encoded once per frame, by the first asker."""
        slot = self.latest[stream_id]
        with self.cond:
            seq, image = slot.seq, slot.image
            if slot.jpeg_seq == seq:
                return seq, slot.jpeg
        if image is None:
            return seq, None
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        data = buf.tobytes() if ok else None
        with self.cond:
            if slot.jpeg_seq < seq:
                slot.jpeg, slot.jpeg_seq = data, seq
        return seq, data

    def wait_newer(self, stream_id: int, seq: int, timeout: float) -> bool:
        slot = self.latest[stream_id]
        with self.cond:
            return self.cond.wait_for(lambda: slot.seq > seq or self.closed, timeout) and not self.closed

    def page(self) -> str:
        ids = sorted(self.latest)
        views = "".join(f'<figure><img src="stream/{i}.mjpg" alt="stream {i}"><figcaption>{i}: '
                        f'{_html(self.ctx.streams[i].label)}</figcaption></figure>' for i in ids)
        return PAGE.format(title=_html(self.ctx.title), views=views)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def admit(self, kind: str) -> bool:
        """Take a place for a new `connection` or `viewer` if one is free (under the lock); a refusal is counted."""
        count, limit = ("connections", self.max_connections) if kind == "connection" else ("clients", self.max_clients)
        with self.cond:
            if getattr(self, count) >= limit:
                self.refused_busy += 1
                return False
            setattr(self, count, getattr(self, count) + 1)
            if kind == "viewer":
                self.clients_total += 1
            return True

    def stats(self) -> dict:
        return {**super().stats(), "url": self.url, "clients": self.clients, "clients_total": self.clients_total,
                "clients_timed_out": self.clients_timed_out, "frames_sent": self.frames_sent,
                "connections": self.connections, "requests_timed_out": self.requests_timed_out,
                "refused_busy": self.refused_busy}


MAX_REQUEST_HEAD = 16 * 1024  # bytes of request line and headers; a GET needs a few hundred


def _send_and_close(conn: socket.socket, code: int, reason: str, text: str) -> None:
    """A short plain-text response on a connection that gets nothing else; never blocks (the kernel's send buffer
    of a fresh connection takes a few hundred bytes)."""
    body = text.encode()
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 5\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(head + body)


class _Server(ThreadingHTTPServer):
    """The stdlib's threading server with a cap on concurrent connections: one past `max_connections` gets a 503
    from the accepting thread itself, so a flood of connections costs neither threads nor the viewers' time."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of new connections waits instead of being refused

    def __init__(self, address: tuple[str, int], handler: type, sink: HttpSink) -> None:
        self.sink = sink
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        sink = self.sink
        if not sink.admit("connection"):
            _send_and_close(request, 503, "Service Unavailable",
                            f"busy: {sink.max_connections} connections are open; try again in a few seconds\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: this connection is not counted any more
            with sink.cond:
                sink.connections -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.sink.cond:
                self.sink.connections -= 1


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Handler(BaseHTTPRequestHandler):
    sink: HttpSink
    server_version = "edgepix"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http %s: " + format, self.address_string(), *args)

    def handle(self) -> None:
        """Read the request head under one deadline, then answer it. The stdlib reads headers line by line with
        no overall limit, so a client sending nothing, or a byte now and then, would hold its thread forever."""
        head = self._read_head()
        if head is not None:
            self.rfile.close()  # the socket's reader is not used: what arrived is all in `head`
            self.rfile = io.BytesIO(head)  # the parser reads the request from here; GET requests have no body
            self.handle_one_request()

    def _read_head(self) -> bytes | None:
        sink = self.sink
        deadline = time.monotonic() + sink.request_timeout
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            remaining = deadline - time.monotonic()
            if len(data) > MAX_REQUEST_HEAD:
                _send_and_close(self.connection, 431, "Request Header Fields Too Large", "request head too large\n")
                return None
            try:
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(4096)
            except TimeoutError:  # socket.timeout is TimeoutError
                with sink.cond:
                    sink.requests_timed_out += 1
                _send_and_close(self.connection, 408, "Request Timeout",
                                f"no complete request within {sink.request_timeout:g} s\n")
                return None
            except OSError:
                return None
            if not chunk:  # the client closed the connection
                return None
            data += chunk
        return data

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream_id(self, path: str, prefix: str, suffix: str) -> int | None:
        if path == f"/{prefix}{suffix}":
            return min(self.sink.latest) if self.sink.latest else None
        m = re.fullmatch(rf"/{prefix}/(\d+){re.escape(suffix)}", path)
        if m and int(m.group(1)) in self.sink.latest:
            return int(m.group(1))
        return None

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        sink = self.sink
        path = urllib.parse.urlsplit(self.path).path
        self.connection.settimeout(sink.client_timeout)
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", sink.page().encode())
            elif path == "/stats.json":
                body = json.dumps(sink.ctx.stats(), default=_json_default).encode()
                self._send(200, "application/json", body)
            elif (sid := self._stream_id(path, "stream", ".mjpg")) is not None:
                self._mjpeg(sid)
            elif (sid := self._stream_id(path, "frame", ".jpg")) is not None:
                _, data = sink.jpeg(sid)
                if data is None:
                    self._send(503, "text/plain", b"no frame yet\n")
                else:
                    self._send(200, "image/jpeg", data)
            else:
                self._send(404, "text/plain", b"not found: try / , /stream.mjpg, /frame.jpg or /stats.json\n")
        except TimeoutError:  # the client stopped reading: drop it, the pipeline never waited for it
            with sink.cond:
                sink.clients_timed_out += 1
        except OSError:
            pass  # the client went away

    def _mjpeg(self, stream_id: int) -> None:
        sink = self.sink
        if not sink.admit("viewer"):
            self.send_response(503)
            self.send_header("Retry-After", "5")
            body = f"busy: {sink.max_clients} viewers are watching already; try again later\n".encode()
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        try:
            self._mjpeg_frames(stream_id)
        finally:
            with sink.cond:
                sink.clients -= 1

    def _mjpeg_frames(self, stream_id: int) -> None:
        sink = self.sink
        # A small send buffer: frames a slow client has not taken wait here as one newest frame, not as seconds
        # of video queued in the kernel (which would also delay what it sees).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = 0  # frames are numbered from 1: a client that connects after the first frame gets it at once
        while not sink.closed:
            if not sink.wait_newer(stream_id, seq, 1.0):
                continue
            seq, data = sink.jpeg(stream_id)
            if data is None:
                continue
            self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                             .encode() + data + b"\r\n")
            self.wfile.flush()
            with sink.cond:
                sink.frames_sent += 1


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---- URIs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkSpec:
    uri: str
    kind: str  # display | video | images | http | null
    target: str
    streams: frozenset[int] | None = None
    params: dict = field(default_factory=dict)


_SINK_PARAMS = {"stream", "fps", "codec", "quality", "clients"}


def _split_params(text: str) -> tuple[str, dict]:
    """Split a trailing `?stream=1&fps=25` off a sink URI (only when every key is a sink parameter)."""
    base, sep, query = text.rpartition("?")
    if not sep:
        return text, {}
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if not params or any(k not in _SINK_PARAMS for k in params):
        bad = [k for k in params if k not in _SINK_PARAMS]
        if bad and "://" in base:
            raise SinkError(f"{text}: " + unknown_name("sink parameter", bad[0], sorted(_SINK_PARAMS)))
        return text, {}
    return base, params


def parse_sink(uri: str) -> SinkSpec:
    text = uri.strip()
    if not text:
        raise SinkError("empty sink URI; expected display://, a video file, a folder/, http://HOST:PORT or null://")
    base, params = _split_params(text)
    streams = None
    if "stream" in params:
        try:
            streams = frozenset(int(s) for s in params["stream"].split(","))
        except ValueError:
            raise SinkError(f"{uri}: stream: expected stream numbers such as 0 or 0,2, "
                            f"got {params['stream']!r}") from None
    scheme, sep, rest = base.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "display":
        return SinkSpec(text, "display", rest, streams, params)
    if scheme == "null":
        return SinkSpec(text, "null", "", streams, params)
    if scheme in ("http", "mjpeg"):
        return SinkSpec(text, "http", rest, streams, params)
    if scheme == "file":
        base = urllib.parse.unquote(rest)
    elif scheme:
        raise SinkError(unknown_name("sink scheme", scheme + "://", ["display://", "http://", "null://", "file://"])
                        + " (or a video file, a folder/ or an image pattern)")
    suffix = Path(base).suffix.lower()
    if suffix in VIDEO_CODECS:
        return SinkSpec(text, "video", base, streams, params)
    if base.endswith(("/", os.sep)) or "%" in base or os.path.isdir(base) or not suffix:
        return SinkSpec(text, "images", base, streams, params)
    raise SinkError(f"sink {uri!r}: cannot tell what to write for '{suffix}'; expected a video file "
                    f"({', '.join(VIDEO_CODECS)}), a folder ending in '/', an image pattern such as "
                    "out/%05d.png, display://, http://HOST:PORT or null://")


def parse_http_address(target: str, uri: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); an empty host or 'localhost' binds 127.0.0.1 only."""
    hostport = target.split("/", 1)[0]
    host, sep, port_text = hostport.rpartition(":")
    if not sep:
        host, port_text = hostport, "8080"
    host = host.strip("[]")
    if host in ("", "localhost"):
        host = "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise SinkError(f"{uri}: expected http://HOST:PORT such as http://127.0.0.1:8080, "
                        f"got port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise SinkError(f"{uri}: port must be 0..65535, got {port}")
    return host, port


def make_sink(uri: str | SinkSpec, *, hud: bool = True) -> Sink:
    spec = uri if isinstance(uri, SinkSpec) else parse_sink(uri)
    p = spec.params
    try:
        if spec.kind == "display":
            return DisplaySink(spec.uri, spec.streams, hud=hud)
        if spec.kind == "null":
            return NullSink(spec.uri, spec.streams)
        if spec.kind == "http":
            host, port = parse_http_address(spec.target, spec.uri)
            clients = int(p.get("clients", 16))  # viewers at once; connections in all: eight per viewer
            return HttpSink(spec.uri, host, port, spec.streams, quality=int(p.get("quality", 80)),
                            max_clients=clients, max_connections=max(128, 8 * clients))
        if spec.kind == "video":
            return VideoFileSink(spec.uri, Path(spec.target).expanduser(), spec.streams,
                                 fps=float(p["fps"]) if "fps" in p else None, codec=p.get("codec"))
        return ImageFolderSink(spec.uri, os.path.expanduser(spec.target), spec.streams)
    except ValueError as e:
        raise SinkError(f"{spec.uri}: bad parameter value ({e})") from None
