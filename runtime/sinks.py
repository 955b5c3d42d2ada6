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
pipeline. An HTTP client that reads slowly gets fewer frames; one that vanishes is dropped after a timeout.
"""

from __future__ import annotations

import contextlib
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
IMAGE_SINK_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
    """Base class. `open()` checks what can be checked before frames flow (folders, ports, the screen);
    `write()` runs in the sink's own thread; `close()` finishes files."""

    lossless = True  # False: the pipeline hands over the newest frame and counts skipped ones
    uri: str = ""

    def __init__(self, uri: str, streams: frozenset[int] | None = None) -> None:
        self.uri = uri
        self.streams = streams  # None: every stream
        self.frames_written = 0

    def accepts(self, stream_id: int) -> bool:
        return self.streams is None or stream_id in self.streams

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


class _Writer:
    """One cv2.VideoWriter: opened at the first frame, written to a temporary name, renamed on close."""

    def __init__(self, path: Path, fps: float, live: bool, codecs: Sequence[str]) -> None:
        self.path, self.fps, self.live, self.codecs = path, fps, live, codecs
        self.tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (W, H)
        self.fourcc = ""
        self.written = 0  # frames in the file (repeats included)
        self.t0: float | None = None

    def _open(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        # Most encoders want even sizes; an odd camera mode is scaled by a pixel.
        self.size = (w + (w & 1), h + (h & 1))
        for i, fourcc in enumerate(self.codecs):
            if _CODEC_WORKS.get(fourcc) is False:
                continue
            last = i == len(self.codecs) - 1
            # FFmpeg prints its own errors for an encoder it lacks (the opencv-python wheel has no H.264
            # encoder); a fallback follows, so keep the first trial of each codec quiet.
            with _quiet_stderr(not last and fourcc not in _CODEC_WORKS):
                writer = cv2.VideoWriter(str(self.tmp), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), self.fps,
                                         self.size)
            _CODEC_WORKS[fourcc] = writer.isOpened()
            if writer.isOpened():
                self.writer, self.fourcc = writer, fourcc
                return
            writer.release()
        raise SinkError(f"cannot write video {self.path}: OpenCV's FFmpeg has none of the codecs "
                        f"{', '.join(self.codecs)} for {self.path.suffix} (try .avi, which uses MJPG)")

    def write(self, image: np.ndarray, timestamp: float) -> None:
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
            self.writer.write(image)  # type: ignore[union-attr]
        self.written += repeats

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        if self.written:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


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
        self.writers: dict[int, _Writer] = {}

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"cannot create the folder for {self.path}: {e.strerror or e}") from e
        if not os.access(folder, os.W_OK):
            raise SinkError(f"cannot write {self.path}: the folder {folder} is not writable")

    def path_for(self, stream_id: int) -> Path:
        if not self.multi():
            return self.path
        return self.path.with_name(f"{self.path.stem}_{stream_id}{self.path.suffix}")

    def write(self, out: Output) -> None:
        w = self.writers.get(out.stream_id)
        if w is None:
            info = self.ctx.streams[out.stream_id]
            fps = self.fps_override or info.fps or 30.0
            w = self.writers[out.stream_id] = _Writer(self.path_for(out.stream_id), fps, info.live, self.codecs)
        w.write(out.image, out.timestamp)
        self.frames_written += 1

    def close(self) -> None:
        errors = []
        for w in self.writers.values():
            try:
                w.close()
            except OSError as e:
                errors.append(f"{w.path}: {e}")
        if errors:
            raise SinkError("cannot finish video file(s): " + "; ".join(errors))

    def stats(self) -> dict:
        return {**super().stats(), "files": {str(w.path): {"frames": w.written, "fps": w.fps, "size": w.size,
                                                         "codec": w.fourcc} for w in self.writers.values()}}


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
            if not self.pattern.lower().endswith(IMAGE_SINK_SUFFIXES):
                raise SinkError(f"{uri}: the pattern must end in an image type ({', '.join(IMAGE_SINK_SUFFIXES)})")
        else:
            self.folder, self.pattern = Path(target), "%06d.jpg"

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SinkError(f"cannot create image folder {self.folder}: {e.strerror or e}") from e

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
    vanished client holds up only itself; a send that blocks longer than `client_timeout` drops the client."""

    lossless = False

    def __init__(self, uri: str, host: str, port: int, streams: frozenset[int] | None = None, *, quality: int = 80,
                 client_timeout: float = 10.0) -> None:
        super().__init__(uri, streams)
        self.host, self.port = host, port
        self.quality = quality
        self.client_timeout = client_timeout
        self.cond = threading.Condition()
        self.latest: dict[int, _Latest] = {}
        self.closed = False
        self.clients = 0
        self.clients_total = 0
        self.clients_timed_out = 0
        self.frames_sent = 0
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
            server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as e:
            raise SinkError(f"{self.uri}: cannot listen on {self.host}:{self.port}: {e.strerror or e}; pick another "
                            "port (or :0 for any free one)") from e
        server.daemon_threads = True
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

    def stats(self) -> dict:
        return {**super().stats(), "url": self.url, "clients": self.clients, "clients_total": self.clients_total,
                "clients_timed_out": self.clients_timed_out, "frames_sent": self.frames_sent}


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Handler(BaseHTTPRequestHandler):
    sink: HttpSink
    server_version = "edgepix"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("http %s: " + format, self.address_string(), *args)

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
        except socket.timeout:  # the client stopped reading: drop it, the pipeline never waited for it
            with sink.cond:
                sink.clients_timed_out += 1
        except OSError:
            pass  # the client went away

    def _mjpeg(self, stream_id: int) -> None:
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
        with sink.cond:
            sink.clients += 1
            sink.clients_total += 1
        seq = 0  # frames are numbered from 1: a client that connects after the first frame gets it at once
        try:
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
        finally:
            with sink.cond:
                sink.clients -= 1


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


_SINK_PARAMS = {"stream", "fps", "codec", "quality"}


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
            raise SinkError(f"{uri}: stream: expected stream numbers such as 0 or 0,2, got {params['stream']!r}") from None
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
        raise SinkError(f"{uri}: expected http://HOST:PORT such as http://127.0.0.1:8080, got port {port_text!r}") from None
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
            return HttpSink(spec.uri, host, port, spec.streams, quality=int(p.get("quality", 80)))
        if spec.kind == "video":
            return VideoFileSink(spec.uri, Path(spec.target).expanduser(), spec.streams,
                                 fps=float(p["fps"]) if "fps" in p else None, codec=p.get("codec"))
        return ImageFolderSink(spec.uri, os.path.expanduser(spec.target), spec.streams)
    except ValueError as e:
        raise SinkError(f"{spec.uri}: bad parameter value ({e})") from None


def open_sinks(uris: Sequence[str], *, hud: bool = True) -> list[Sink]:
    return [make_sink(u, hud=hud) for u in uris]


def wait_for_http(url: str, timeout: float = 5.0) -> bool:
    """Poll `url` until it answers (tests and scripts)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False
