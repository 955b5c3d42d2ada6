"""cv2.VideoCapture sources: V4L2 cameras, Jetson CSI cameras, GStreamer pipelines, network streams and video
files."""

from __future__ import annotations

import atexit
import contextlib
import glob as globlib
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator

import cv2
import numpy as np

from ...core.errors import SourceError
from .reader import Reader, sane_fps
from .uri import SourceKind, SourceOptions, SourceSpec

log = logging.getLogger(__name__)


#: URIs of this kind and what the code does with them (shown by the `--source` help and docs/streams.md)
URI_HELP = (
    ('`0`, `/dev/video0`, `v4l2:///dev/video0?size=1280x720&fps=30&codec=mjpg`',
     'V4L2 camera; FourCC, then size, then rate are requested (`--input-size/--input-fps/--input-codec` do '
     'the same)'),
    ('`csi://0`',
     'nvarguscamerasrc → nvvidconv → BGR appsink (`drop=true max-buffers=1`); without GStreamer in OpenCV: '
     "a one-line error pointing to `edgepix doctor` and JetPack's OpenCV"),
    ('`rtsp://`, `rtsps://`, `rtmp://`, `http(s)://`, `udp://`, `srt://`',
     'FFmpeg with `CAP_PROP_OPEN_TIMEOUT_MSEC` (`--open-timeout`, 10 s) and `CAP_PROP_READ_TIMEOUT_MSEC` '
     '(`--read-timeout`, 5 s) as open parameters; RTSP over TCP through `OPENCV_FFMPEG_CAPTURE_OPTIONS` '
     '(UDP when the server refuses TCP, or forced with `--rtsp-transport`). A URL of known length (an .mp4 '
     'over HTTP, a finished HLS playlist) is read frame by frame like a file and resumed where it broke '
     'off; live HLS (`.m3u8`) is paced by its timestamps, since it arrives a segment at a time'),
    ('`gst://PIPELINE`',
     'a raw GStreamer pipeline ending in appsink (same check). One whose sources GStreamer plays as non-live '
     '(`filesrc`, `multifilesrc`, `splitmuxsrc`, `videotestsrc` without `is-live=true`, a uri bin on a '
     '`file://` URI) is read like a file: every frame, the pipeline waiting for the model, and its end ends '
     'the stream (`--realtime` makes it live). Any other is live: newest frame; OpenCV opens it at its first '
     'frame (`--open-timeout` does not apply), and one silent for twice `--read-timeout` is reopened'),
    ('`video.mp4`, `file://...`',
     'a video file, frame by frame (nothing dropped); `--realtime` reads it at its frame rate like a '
     'camera'),
)

# A live network stream needs its codec parameters, not FFmpeg's default 5 s / 5 MB of analysis (nor 20 frames
# of timestamps for the frame rate): with these it opens in a fraction of a second, so a camera that reboots is
# back as soon as it serves again. 1 MB still holds a keyframe of a 4K H.264 stream.
LIVE_PROBE_OPTIONS = {"probesize": "1000000", "analyzeduration": "1000000", "fpsprobesize": "3"}


# FFmpeg takes its capture options from one process-wide environment variable read at open time.
_FFMPEG_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _ffmpeg_capture_options(options: dict[str, str]) -> Iterator[None]:
    with _FFMPEG_ENV_LOCK:
        before = os.environ.get(_FFMPEG_ENV)
        merged = dict(options)
        if before:  # the user's own options win
            for item in before.split("|"):
                key, _, value = item.partition(";")
                if key:
                    merged[key] = value
        if merged:
            os.environ[_FFMPEG_ENV] = "|".join(f"{k};{v}" for k, v in merged.items())
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_FFMPEG_ENV, None)
            else:
                os.environ[_FFMPEG_ENV] = before


# A read the watchdog abandoned (see `live`) may return at any time: a UDP pipeline's old socket gets the packets
# again once the pipeline that replaced it closes at exit. Its thread then releases the capture; if that happens
# while the interpreter finalizes, the thread is ended by a forced unwind inside OpenCV's binding, and the process
# aborts ("terminate called without an active exception"). So at exit, open captures get a moment to be released.
_OPEN_CAPTURES = [0]
_CAPTURES_CHANGED = threading.Condition()
EXIT_WAIT_S = 1.0


def _count_capture(delta: int) -> None:
    with _CAPTURES_CHANGED:
        _OPEN_CAPTURES[0] += delta
        _CAPTURES_CHANGED.notify_all()


@atexit.register
def _let_open_captures_close() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    with _CAPTURES_CHANGED:
        while _OPEN_CAPTURES[0] and (left := deadline - time.monotonic()) > 0:
            _CAPTURES_CHANGED.wait(left)


def quiet_decoder_logs() -> None:
    """FFmpeg and OpenCV print a line per damaged file, packet or reconnect attempt, for days; edgepix reports
    outages and undecodable inputs itself. FFmpeg reads its level when its backend loads; OpenCV's is set directly
    (older bindings without cv2.utils.logging, such as Debian 12's OpenCV 4.6, read OPENCV_LOG_LEVEL)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    cv_logging = getattr(cv2.utils, "logging", None)
    if cv_logging is not None:
        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_ERROR)


def opencv_has_gstreamer() -> bool:
    # getBackends() also lists backends that could only be loaded as plugins; hasBackend() says whether one is
    # built in or its plugin actually loaded.
    registry = getattr(cv2, "videoio_registry", None)
    if registry is not None and hasattr(registry, "hasBackend"):
        return bool(registry.hasBackend(cv2.CAP_GSTREAMER))
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


# GStreamer sources that GStreamer plays as non-live: a pipeline made of them has an end (num-buffers, the end of a
# file) and waits for a slow reader instead of dropping frames. Any other source element (v4l2src, nvarguscamerasrc,
# rtspsrc, udpsrc, souphttpsrc, appsrc, ...) makes a pipeline live.
FINITE_GST_SOURCES = frozenset({"filesrc", "multifilesrc", "splitmuxsrc", "videotestsrc"})
_GST_URI_BINS = frozenset({"uridecodebin", "uridecodebin3", "urisourcebin", "playbin", "playbin3"})
# An element name where an element can stand: not a property value (after '=', '/', ...) nor a property name.
_GST_SOURCE_ELEMENT = re.compile(r"(?<![\w=/.:,-])([a-z][a-z0-9_]*src|uridecodebin3?|urisourcebin|playbin3?)(?![\w.=-])")


def gst_pipeline_is_finite(pipeline: str) -> bool:
    """Whether a gst:// pipeline plays like a file: every source element is one GStreamer plays as non-live
    (FINITE_GST_SOURCES, or a uri bin on a file:// URI) and nothing sets is-live=true."""
    if re.search(r"\bis-live\s*=\s*(true|1)\b", pipeline, re.IGNORECASE):
        return False
    sources = _GST_SOURCE_ELEMENT.findall(pipeline)
    if not sources:
        return False
    if any(name in _GST_URI_BINS for name in sources):
        schemes = re.findall(r"\buri\s*=\s*[\"']?([A-Za-z][A-Za-z0-9+.-]*):", pipeline)
        if not schemes or any(s.lower() != "file" for s in schemes):
            return False
    return all(name in FINITE_GST_SOURCES or name in _GST_URI_BINS for name in sources)


def csi_pipeline(sensor: int, options: SourceOptions) -> str:
    """The nvarguscamerasrc pipeline for a Jetson CSI camera, ending in BGR frames for OpenCV."""
    w, h = options.size or (1280, 720)
    fps = int(round(options.fps or 30))
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={w}, height={h}, "
            f"framerate={fps}/1, format=NV12 ! nvvidconv flip-method={options.flip} ! video/x-raw, format=BGRx ! "
            "videoconvert ! video/x-raw, format=BGR ! appsink drop=true max-buffers=1 sync=false")


class CaptureReader(Reader):
    """cv2.VideoCapture behind cameras, CSI, GStreamer, network streams and video files."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        # A gst:// pipeline of non-live sources (a test pattern, a file) is read like a file: every frame.
        self.finite_pipeline = spec.kind is SourceKind.GSTREAMER and gst_pipeline_is_finite(spec.target)
        self.live = (spec.kind is not SourceKind.VIDEO and not self.finite_pipeline) or spec.options.realtime
        self.cap: cv2.VideoCapture | None = None
        self.nominal_fps = None
        self.frame_count: int | None = None
        self.delivered = 0  # frames read since the file was opened or rewound
        # A network URL with a known length (an .mp4 over HTTP, a finished HLS playlist) is a file that happens
        # to be remote: read frame by frame like a file, resumed where it broke off after a reconnect.
        self.remote_file = False
        self.last_pts: float | None = None
        self.transport: str | None = None  # the RTSP transport that opened
        # Live HLS arrives a segment (seconds of video) at a time: frames are paced by their timestamps so the
        # newest-frame policy does not throw most of each segment away.
        self.pace_by_pts = spec.kind is SourceKind.NETWORK and ".m3u8" in urllib.parse.urlsplit(spec.target).path

    def _needs_gstreamer(self) -> None:
        if not opencv_has_gstreamer():
            raise SourceError(
                f"{self.spec.uri} needs OpenCV built with GStreamer, and this OpenCV {cv2.__version__} has none "
                "(`edgepix doctor` lists its video I/O backends). On a Jetson use the OpenCV that JetPack ships "
                "(python3-opencv, with GStreamer) instead of the opencv-python wheel: pip uninstall opencv-python")

    def open(self) -> None:
        self.close()  # a reopen releases the capture it replaces
        spec, o = self.spec, self.spec.options
        kind = spec.kind
        t_open = time.monotonic()
        if kind is SourceKind.CAMERA:
            target: str | int = int(spec.target) if spec.target.isdigit() else spec.target
            api = cv2.CAP_V4L2 if os.name == "posix" and hasattr(cv2, "CAP_V4L2") else cv2.CAP_ANY
            if isinstance(target, str) and not os.path.exists(target):
                raise SourceError(f"camera {spec.uri}: {target} does not exist (cameras here: "
                                  f"{', '.join(sorted(globlib.glob('/dev/video*'))) or 'none'})")
            cap = cv2.VideoCapture(target, api)
            if cap.isOpened():
                # Order matters for V4L2: the pixel format first, then the size, then the rate.
                if o.codec:
                    cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*o.codec))
                if o.size:
                    cap.set(cv2.CAP_PROP_FRAME_WIDTH, o.size[0])
                    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, o.size[1])
                if o.fps:
                    cap.set(cv2.CAP_PROP_FPS, o.fps)
                cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        elif kind in (SourceKind.CSI, SourceKind.GSTREAMER):
            self._needs_gstreamer()
            pipeline = csi_pipeline(int(spec.target), o) if kind is SourceKind.CSI else spec.target
            # OpenCV bounds the appsink's queue (max-buffers=1 unless the pipeline sets it), so a finite pipeline
            # waits for a slow reader rather than filling memory.
            cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        elif kind is SourceKind.NETWORK:
            # A live HLS read waits for the next segment to be published: allow a few segments' time.
            read_timeout = max(o.read_timeout, 20.0) if self.pace_by_pts else o.read_timeout
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(o.open_timeout * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]
            transports: list[str | None] = [None]
            if spec.target.lower().startswith(("rtsp://", "rtsps://")):
                transports = ["tcp", "udp"] if o.rtsp_transport == "auto" else [o.rtsp_transport]
                if self.transport in transports:  # a reconnect: what worked before first
                    transports.remove(self.transport)
                    transports.insert(0, self.transport)
            for transport in transports:
                capture_options = dict(LIVE_PROBE_OPTIONS)
                if transport:
                    capture_options["rtsp_transport"] = transport
                with _ffmpeg_capture_options(capture_options):
                    cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, params)
                if cap.isOpened():
                    if transport and transport != transports[0]:
                        log.info("%s: the server refused RTSP over %s; using %s", spec.uri, transports[0], transport)
                    self.transport = transport
                    break
        else:  # a video file
            cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG)
            if not cap.isOpened():
                cap = cv2.VideoCapture(spec.target)  # another backend may know the format
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure(time.monotonic() - t_open))
        self.cap = cap
        _count_capture(+1)
        self.delivered = 0
        self.nominal_fps = sane_fps(cap.get(cv2.CAP_PROP_FPS))
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        known = count is not None and 0 < count < 1e9
        self.frame_count = int(count) if kind in (SourceKind.VIDEO, SourceKind.NETWORK) and known else None
        if kind is SourceKind.NETWORK:
            self.remote_file = self.frame_count is not None
            self.live = not self.remote_file or o.realtime
            self.pace_by_pts = self.pace_by_pts and not self.remote_file
            if self.remote_file and self.last_pts:  # a reconnect: resume where the stream broke off
                cap.set(cv2.CAP_PROP_POS_MSEC, self.last_pts)

    def _open_failure(self, seconds: float) -> str:
        spec, o = self.spec, self.spec.options
        if spec.kind is SourceKind.NETWORK:
            # A quick failure is an answer (a refused connection, an HTTP or RTSP error), a slow one silence.
            how = (f"within {o.open_timeout:g} s" if seconds >= 0.9 * o.open_timeout else
                   f"(it failed after {seconds:.2f} s: refused, or the server answered with an error)")
            return (f"cannot open {spec.uri} {how} (is the server up, the address and path right, and the "
                    "stream's codec supported by FFmpeg?)")
        if spec.kind is SourceKind.CAMERA:
            return (f"cannot open camera {spec.uri} (is it connected and not used by another program? "
                    f"cameras here: {', '.join(sorted(globlib.glob('/dev/video*'))) or 'none'})")
        if spec.kind is SourceKind.VIDEO:
            return f"cannot open video file {spec.target}: not a video OpenCV/FFmpeg can decode"
        return f"cannot open GStreamer pipeline {spec.uri} (run it with gst-launch-1.0 to see why)"

    def read(self) -> tuple[np.ndarray, float | None] | None:
        if self.cap is None:
            return None
        ok, image = self.cap.read()
        if not ok or image is None or image.size == 0:
            # A finite GStreamer pipeline ends at its EOS; a live one that fails is reopened (its reads block
            # while it is silent, and the watchdog in `live` reopens it).
            self.ended_cleanly = (self.spec.kind is SourceKind.VIDEO or self.finite_pipeline
                                  or (self.remote_file and self._near_end()))
            # Containers that estimate their length from the duration may be one frame off: allow that.
            if self.spec.kind is SourceKind.VIDEO and self.frame_count and self.delivered < self.frame_count - 1:
                self.truncated = (f"{self.spec.target}: its container promised {self.frame_count} frames, "
                                  f"{self.delivered} could be decoded (a truncated or damaged file)")
            return None
        pts = self.cap.get(cv2.CAP_PROP_POS_MSEC) if self.spec.kind in (SourceKind.VIDEO, SourceKind.NETWORK) else None
        self.last_pts = pts
        self.delivered += 1
        return image, pts

    def nothing_read(self) -> str:
        if self.spec.kind is SourceKind.VIDEO:
            return f"{self.spec.target} holds no decodable frame"
        return "no frame could be read"

    def _near_end(self) -> bool:
        """A remote file that stopped within a second of its length ended; earlier, the connection broke."""
        if self.frame_count is None or self.last_pts is None:
            return True
        duration_ms = self.frame_count / (self.nominal_fps or 30.0) * 1000.0
        return self.last_pts >= duration_ms - 1000.0

    def rewind(self) -> bool:
        if self.spec.kind is not SourceKind.VIDEO or self.cap is None:
            return False
        self.ended_cleanly = False
        self.delivered = 0
        if not self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self.close()
            self.open()
        return True

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
            _count_capture(-1)

