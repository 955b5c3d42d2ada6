"""Frame sources: cameras, network streams, GStreamer pipelines, video files, images and synthetic scenes.

Every source yields `Frame(image, index, timestamp, stream_id)`: a BGR uint8 image (grayscale, BGRA and 16-bit
frames are converted), the frame's number in its stream, and `time.monotonic()` when it was read. URIs follow
jetson-inference's habits:

| URI                                   | what                                                                     |
|---------------------------------------|--------------------------------------------------------------------------|
| `0`, `/dev/video0`, `v4l2:///dev/video0` | a V4L2 camera; `?size=1280x720&fps=30&codec=mjpg` requests a mode     |
| `csi://0`                             | a Jetson CSI camera through nvarguscamerasrc (needs OpenCV + GStreamer)  |
| `rtsp://`, `rtsps://`, `rtmp://`, `http(s)://` | network streams through FFmpeg, with open and read timeouts; RTSP over TCP |
| `gst://<pipeline>`                    | a raw GStreamer pipeline ending in appsink                               |
| `video.mp4`, `file://video.mkv`       | a video file                                                             |
| `image.jpg`, `folder/`, `'frames/*.png'` | one image, a folder, a glob (images and videos, in natural order)     |
| `synthetic://?size=640x480&fps=30&seed=0&frames=N` | moving synthetic scenes (the default); `fps=0`: as fast as read; `shading=1`: shaded objects |

Live sources (cameras, network streams, GStreamer, paced synthetic scenes, files with `realtime`) are read in their
own thread that keeps only the newest frame: a frame that was not taken before the next one arrived is dropped and
counted, so the consumer never falls behind the camera. A live source that stops delivering (a read fails or
times out) is closed and reopened with exponential backoff, for `reconnect_attempts` tries (unlimited by default)
while the consumer keeps running; each outage is recorded. Files, images and unpaced synthetic scenes are read
frame by frame into a small bounded queue: nothing is dropped and the reader waits for the consumer.

    with open_source("rtsp://camera/stream") as source:
        for frame in source:                      # newest frames, until the source ends or close()
            ...
"""

from __future__ import annotations

import contextlib
import enum
import glob as globlib
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError, SourceError, unknown_name
from .formats import IMAGE_SUFFIXES, VIDEO_SUFFIXES

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
MAX_SANE_FPS = 240.0
MIN_FPS = 0.1  # slowest rate a source may be asked for (one frame per 10 s): slower is a typo, not a camera
MAX_CAPTURE_SIDE = 16384  # no camera mode is wider or taller
MAX_SYNTHETIC_SIDE = 4096  # synthetic scenes: 4K is plenty for a test pattern (frames and grain stay < 0.5 GB)
# A live network stream needs its codec parameters, not FFmpeg's default 5 s / 5 MB of analysis (nor 20 frames
# of timestamps for the frame rate): with these it opens in a fraction of a second, so a camera that reboots is
# back as soon as it serves again. 1 MB still holds a keyframe of a 4K H.264 stream.
LIVE_PROBE_OPTIONS = {"probesize": "1000000", "analyzeduration": "1000000", "fpsprobesize": "3"}


# ---- frames ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One frame of one stream."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    index: int  # the frame's number in its stream, from 0 (frames the source dropped leave gaps)
    timestamp: float  # time.monotonic() when the frame was read from the device, stream or file
    stream_id: int = 0
    pts_ms: float | None = None  # the stream's own presentation time, when it has one


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any image a camera or decoder hands over -> contiguous (H, W, 3) uint8 BGR.

    Grayscale (H, W) / (H, W, 1), BGRA (H, W, 4), 16-bit (scaled by 1/256) and 0..1 float images are converted.
    """
    if not isinstance(image, np.ndarray) or image.size == 0:
        found = getattr(image, "shape", type(image).__name__)
        raise InputError(f"frame: expected a non-empty image array, got {found}")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        elif image.dtype.kind == "f":
            image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        else:
            raise InputError(f"frame: expected uint8, uint16 or float pixels, got {image.dtype.name} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 3:
        return image if image.flags.c_contiguous else np.ascontiguousarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2BGR)
    raise InputError(f"frame: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")


def sane_fps(value: float | None) -> float | None:
    """A container's frame rate if it is believable, else None (streams report 0, 1000 or 90000)."""
    try:
        fps = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return fps if 1.0 <= fps <= MAX_SANE_FPS else None


# ---- options and URIs ---------------------------------------------------------------------------------------


class SourceKind(str, enum.Enum):
    CAMERA = "camera"  # V4L2 device (index, /dev/videoN, v4l2://)
    CSI = "csi"  # Jetson CSI camera (nvarguscamerasrc)
    NETWORK = "network"  # rtsp/rtmp/http(s)/... through FFmpeg
    GSTREAMER = "gstreamer"  # gst://<pipeline>
    VIDEO = "video"  # one video file
    IMAGES = "images"  # one image, a folder or a glob
    SYNTHETIC = "synthetic"  # MovingScene


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """How to open and read a source. Sizes are (width, height), as cameras list their modes."""

    size: tuple[int, int] | None = None  # requested capture size (cameras, CSI, synthetic)
    fps: float | None = None  # requested frame rate (cameras, CSI, synthetic); also paces files with realtime
    codec: str | None = None  # requested camera pixel format / FourCC, e.g. "MJPG" (USB cameras need it for 30 fps HD)
    open_timeout: float = 10.0  # seconds allowed to open a network stream
    read_timeout: float = 5.0  # seconds a network read may block before the stream counts as stalled
    # "auto": TCP (no smeared frames from lost packets), UDP if the server refuses TCP; "tcp" or "udp" force one
    rtsp_transport: str = "auto"
    reconnect_attempts: int | None = None  # live sources: reopen tries per outage; None: unlimited, 0: never
    backoff_initial: float = 0.25  # seconds before the second reopen; doubles on each failure ...
    # ... up to this: a refused connection costs the server nothing, and a short wait is what lets a stream
    # be back within a second of its server's return
    backoff_max: float = 0.5
    realtime: bool = False  # files: read at their frame rate and keep only the newest frame, like a camera
    loop: bool = False  # files and image lists: start again at the end
    queue_size: int = 3  # frame-by-frame sources: frames decoded ahead of the consumer
    flip: int = 0  # CSI: nvvidconv flip-method (0..7)

    def __post_init__(self) -> None:
        if self.size is not None:
            w, h = self.size
            if not (1 <= w <= MAX_CAPTURE_SIDE and 1 <= h <= MAX_CAPTURE_SIDE):
                raise SourceError(f"size: expected WIDTHxHEIGHT of 1..{MAX_CAPTURE_SIDE} each, got {w}x{h}")
        if self.fps is not None:
            check_fps(self.fps, "fps")
        for name in ("open_timeout", "read_timeout", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 3600):
                raise SourceError(f"{name}: expected a positive number of seconds (at most 3600), got {value}")
        if self.rtsp_transport not in ("auto", "tcp", "udp"):
            raise SourceError(unknown_name("RTSP transport", self.rtsp_transport, ("auto", "tcp", "udp")))
        if self.reconnect_attempts is not None and self.reconnect_attempts < 0:
            raise SourceError(f"reconnect_attempts: expected >= 0 or None (unlimited), got {self.reconnect_attempts}")
        if self.queue_size < 1:
            raise SourceError(f"queue_size: expected >= 1, got {self.queue_size}")
        if self.codec is not None and len(self.codec) != 4:
            raise SourceError(f"codec: expected a four-character code such as MJPG or YUYV, got {self.codec!r}")


def _short(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for an error message (a URI or value may be thousands long)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_fps(fps: float, what: str) -> float:
    """A requested frame rate: 0 (as fast as possible / the device's default) or MIN_FPS..1000."""
    if not (fps == 0 or MIN_FPS <= fps <= 1000):  # NaN fails both
        raise SourceError(f"{what}: expected 0 (as fast as possible) or {MIN_FPS:g}..1000 frames per second, "
                          f"got {fps}")
    return fps


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source URI: what to open and how."""

    uri: str
    kind: SourceKind
    target: str  # device path, URL, pipeline, file path or glob
    options: SourceOptions = field(default_factory=SourceOptions)
    params: tuple[tuple[str, str], ...] = ()  # synthetic:// parameters

    @property
    def live(self) -> bool:
        if self.kind in (SourceKind.VIDEO, SourceKind.IMAGES):
            return self.options.realtime
        if self.kind is SourceKind.SYNTHETIC:
            return (synthetic_fps(self) or 0) > 0
        return True


_QUERY_KEYS = {"size", "width", "height", "fps", "codec", "format", "fourcc", "flip"}
_SYNTHETIC_KEYS = {"size", "fps", "seed", "frames", "speed", "shading"}


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,9})\s*[xX,]\s*(\d{1,9})\s*", text)
    if not m:
        raise SourceError(f"size: expected WIDTHxHEIGHT such as 640x480, got {_short(text)!r}")
    return int(m.group(1)), int(m.group(2))


def _query_options(query: str, options: SourceOptions, *, allowed: set[str], uri: str) -> tuple[SourceOptions, dict]:
    """Apply `?size=..&fps=..&codec=..` to options; returns (options, all parameters)."""
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    for key in params:
        if key not in allowed:
            raise SourceError(f"{uri}: " + unknown_name("source parameter", key, sorted(allowed)))
    changes: dict = {}
    try:
        if "size" in params:
            changes["size"] = parse_size(params["size"])
        elif "width" in params or "height" in params:
            if not ("width" in params and "height" in params):
                raise SourceError(f"{uri}: give both width and height (or size=WIDTHxHEIGHT)")
            changes["size"] = (int(params["width"]), int(params["height"]))
        if "fps" in params:
            changes["fps"] = float(params["fps"])
        for key in ("codec", "format", "fourcc"):
            if key in params:
                changes["codec"] = params[key].upper()
        if "flip" in params:
            changes["flip"] = int(params["flip"])
    except ValueError as e:
        raise SourceError(f"{uri}: bad parameter value ({e})") from None
    if changes:
        options = SourceOptions(**{**_fields(options), **changes})
    return options, params


def _fields(options: SourceOptions) -> dict:
    return {f: getattr(options, f) for f in SourceOptions.__dataclass_fields__}


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def parse_source(uri: str | int | os.PathLike | None, options: SourceOptions = SourceOptions()) -> SourceSpec:
    """Parse a source URI (see the module docstring). Nothing is opened; errors name the URI and the fix."""
    if uri is None or (isinstance(uri, str) and not uri.strip()):
        uri = "synthetic://"
    if isinstance(uri, int):
        uri = str(uri)
    text = os.fspath(uri).strip() if not isinstance(uri, str) else uri.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower() if sep else ""
    if re.fullmatch(r"\d+", text):
        return SourceSpec(text, SourceKind.CAMERA, text, options)
    if scheme == "synthetic":
        _, _, query = rest.partition("?")
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        for key in params:
            if key not in _SYNTHETIC_KEYS:
                raise SourceError(f"{_short(text)}: " + unknown_name("synthetic:// parameter", _short(key),
                                                                     sorted(_SYNTHETIC_KEYS)))
        spec = SourceSpec(text, SourceKind.SYNTHETIC, "", options, tuple(params.items()))
        synthetic_fps(spec), synthetic_size(spec), synthetic_speed(spec)
        _int_param(spec, "seed", 0, low=0, high=2**63 - 1), _int_param(spec, "frames", None, low=1)
        return spec
    if scheme in ("v4l2", "") and (text.startswith("/dev/video") or scheme == "v4l2"):
        path, _, query = (rest if scheme else text).partition("?")
        path = path or "/dev/video0"
        if re.fullmatch(r"\d+", path):
            path = f"/dev/video{path}"
        options, _ = _query_options(query, options, allowed=_QUERY_KEYS - {"flip"}, uri=text)
        return SourceSpec(text, SourceKind.CAMERA, path, options)
    if scheme == "csi":
        sensor, _, query = rest.partition("?")
        sensor = sensor or "0"
        if not re.fullmatch(r"\d+", sensor):
            raise SourceError(f"{text}: expected csi://N with a sensor number such as csi://0")
        options, _ = _query_options(query, options, allowed=_QUERY_KEYS, uri=text)
        return SourceSpec(text, SourceKind.CSI, sensor, options)
    if scheme == "gst":
        if not rest.strip():
            raise SourceError(f"{text}: expected gst://<pipeline ending in appsink>")
        return SourceSpec(text, SourceKind.GSTREAMER, rest.strip(), options)
    if scheme in NETWORK_SCHEMES:
        return SourceSpec(text, SourceKind.NETWORK, text, options)  # the URL keeps its own query string
    if scheme == "file":
        text_path = urllib.parse.unquote(rest)
    elif scheme:
        valid = ["synthetic", "v4l2", "csi", "gst", "file", *NETWORK_SCHEMES]
        raise SourceError(unknown_name("source scheme", scheme + "://", [v + "://" for v in valid])
                          + " (or a camera number, /dev/videoN, a file, a folder or a glob)")
    else:
        text_path = text
    path = Path(text_path).expanduser()
    if _has_glob(text_path) and not path.exists():
        return SourceSpec(text, SourceKind.IMAGES, str(path), options)
    if path.is_dir():
        return SourceSpec(text, SourceKind.IMAGES, str(path), options)
    if not path.exists():
        raise SourceError(f"source {text!r}: no such file or folder (expected a camera number, /dev/videoN, "
                          "csi://N, rtsp://..., http(s)://..., gst://..., a video, an image, a folder, a glob "
                          "or synthetic://)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return SourceSpec(text, SourceKind.IMAGES, str(path), options)
    return SourceSpec(text, SourceKind.VIDEO, str(path), options)


def synthetic_fps(spec: SourceSpec) -> float:
    params = dict(spec.params)
    if "fps" in params:
        try:
            fps = float(params["fps"])
        except ValueError:
            raise SourceError(f"{_short(spec.uri)}: fps: expected a number, got {_short(params['fps'])!r}") from None
    else:
        fps = spec.options.fps if spec.options.fps is not None else 30.0
    return check_fps(fps, f"{_short(spec.uri)}: fps")


def synthetic_size(spec: SourceSpec) -> tuple[int, int]:
    params = dict(spec.params)
    w, h = parse_size(params["size"]) if "size" in params else (spec.options.size or (640, 480))
    if not (16 <= w <= MAX_SYNTHETIC_SIDE and 16 <= h <= MAX_SYNTHETIC_SIDE):
        raise SourceError(f"{_short(spec.uri)}: size: expected 16..{MAX_SYNTHETIC_SIDE} pixels each way, got {w}x{h}")
    return w, h


def synthetic_speed(spec: SourceSpec) -> float:
    text = dict(spec.params).get("speed", "4")
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not 0 <= speed <= 1000:  # NaN fails too
        raise SourceError(f"{_short(spec.uri)}: speed: expected 0..1000 pixels per frame, got {_short(text)!r}")
    return speed


def _int_param(spec: SourceSpec, key: str, default: int | None, *, low: int | None = None,
               high: int | None = None) -> int | None:
    params = dict(spec.params)
    if key not in params:
        return default
    text = params[key]
    # Digits only, and not thousands of them: int() of a huge literal is slow and means nothing here.
    if not re.fullmatch(r"\s*[-+]?\d{1,20}\s*", text):
        raise SourceError(f"{_short(spec.uri)}: {key}: expected an integer of at most 20 digits, got {_short(text)!r}")
    value = int(text)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        raise SourceError(f"{_short(spec.uri)}: {key}: expected an integer {bounds}, got {value}")
    return value


# ---- readers: synchronous open/read/close ------------------------------------------------------------------


class Reader:
    """Opens a device, stream or file and reads images from it, synchronously. `read()` returns None when
    the source ended (files) or failed (live sources: the caller reopens)."""

    live: bool = False
    nominal_fps: float | None = None  # frames per second the source claims (sanitised), or None
    ended_cleanly: bool = False  # True after a file reached its end (as opposed to failing)
    frame_count: int | None = None  # frames the container says it holds (files), or None
    truncated: str | None = None  # set at the end of a file that delivered fewer frames than its container promised

    def nothing_read(self) -> str:
        """Why a source that ended delivered no frame at all (for its error)."""
        return "no frame could be read"

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> tuple[np.ndarray, float | None] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def rewind(self) -> bool:
        """Start again from the beginning (files with loop); False if this reader cannot."""
        return False


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


def opencv_has_gstreamer() -> bool:
    # getBackends() also lists backends that could only be loaded as plugins; hasBackend() says whether one is
    # built in or its plugin actually loaded.
    registry = getattr(cv2, "videoio_registry", None)
    if registry is not None and hasattr(registry, "hasBackend"):
        return bool(registry.hasBackend(cv2.CAP_GSTREAMER))
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


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
        self.live = spec.kind is not SourceKind.VIDEO or spec.options.realtime
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
            self.ended_cleanly = self.spec.kind is SourceKind.VIDEO or (self.remote_file and self._near_end())
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
            self.cap.release()
            self.open()
        return True

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


class ImageListReader(Reader):
    """One image, a folder or a glob: images are one frame each, videos in the list are read to their end."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.live = spec.options.realtime
        self.paths: list[str] = []
        self._i = 0
        self._video: CaptureReader | None = None
        self.nominal_fps = None
        self.skipped = 0
        self.skipped_names: list[str] = []

    def open(self) -> None:
        target = self.spec.target
        if os.path.isdir(target):
            names = [os.path.join(target, n) for n in os.listdir(target)]
        elif _has_glob(target):
            names = globlib.glob(target, recursive=True)
        else:
            names = [target]
        suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
        self.paths = sorted((p for p in names if os.path.isfile(p) and p.lower().endswith(suffixes)), key=_natural_key)
        if not self.paths:
            raise SourceError(f"source {self.spec.uri!r}: no images or videos found (looked for "
                              f"{', '.join(IMAGE_SUFFIXES)} and video files)")
        self._i = 0

    def read(self) -> tuple[np.ndarray, float | None] | None:
        while True:
            if self._video is not None:
                got = self._video.read()
                if got is not None:
                    return got
                self.truncated = self._video.truncated or self.truncated
                self._video.close()
                self._video = None
            if self._i >= len(self.paths):
                self.ended_cleanly = True
                return None
            path = self.paths[self._i]
            self._i += 1
            if path.lower().endswith(VIDEO_SUFFIXES):
                video = CaptureReader(SourceSpec(path, SourceKind.VIDEO, path, self.spec.options))
                try:
                    video.open()
                except SourceError as e:
                    self._skip(path)
                    log.warning("skipping %s: %s", path, e)
                    continue
                self._video = video
                continue
            # IMREAD_COLOR: grayscale, BGRA and 16-bit images arrive as 8-bit BGR, EXIF orientation applied.
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                self._skip(path)
                log.warning("skipping %s: not an image OpenCV can decode", path)
                continue
            return image, None

    def _skip(self, path: str) -> None:
        self.skipped += 1
        if len(self.skipped_names) < 3:
            self.skipped_names.append(os.path.basename(path))

    def nothing_read(self) -> str:
        if self.skipped:
            more = ", ..." if self.skipped > len(self.skipped_names) else ""
            return (f"none of the {len(self.paths)} file(s) could be decoded ({', '.join(self.skipped_names)}{more}); "
                    f"expected images ({', '.join(IMAGE_SUFFIXES)}) or videos OpenCV/FFmpeg can read")
        return "no frame could be read"

    def rewind(self) -> bool:
        self.close()
        self._i = 0
        self.ended_cleanly = False
        return True

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None


class SyntheticReader(Reader):
    """Moving synthetic scenes (runtime.synthetic.MovingScene); paced at `fps` by the Source when fps > 0."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.fps = synthetic_fps(spec)
        self.live = self.fps > 0
        self.nominal_fps = self.fps if self.fps > 0 else 30.0
        self.size = synthetic_size(spec)
        self.seed = _int_param(spec, "seed", 0, low=0, high=2**63 - 1)
        self.limit = _int_param(spec, "frames", None, low=1)
        self.speed = synthetic_speed(spec)
        self.shading = dict(spec.params).get("shading", "0") not in ("0", "", "false", "no")
        self.scene = None
        self.count = 0

    def open(self) -> None:
        from .synthetic import MovingScene, SceneConfig

        w, h = self.size
        # Per-frame Gaussian noise and blur cost ~35 ms at 640x480, more than the model; a camera-like grain from
        # a few precomputed noise fields costs well under a millisecond.
        config = SceneConfig(size=(h, w), blur_probability=0.0, max_noise_sigma=0.0)
        self.scene = MovingScene(seed=self.seed or 0, config=config, max_speed=self.speed)
        if not self.shading:
            # Flat-coloured objects are drawn by fillPoly alone; shading needs full-frame coordinate grids per
            # frame (~8 MB of temporaries and ~10 ms at 640x480). `?shading=1` keeps it.
            for obj in self.scene.objects:
                obj.shade = (obj.shade[0], 0.0)
        rng = np.random.default_rng(self.seed)
        # uint8 grain drawn directly (no float temporaries: a long-running process keeps a low peak)
        self._grain = [(rng.integers(0, 7, size=(h, w, 3), dtype=np.uint8),
                        rng.integers(0, 7, size=(h, w, 3), dtype=np.uint8)) for _ in range(4)]
        self.count = 0

    def read(self) -> tuple[np.ndarray, float | None] | None:
        if self.limit is not None and self.count >= self.limit:
            self.ended_cleanly = True
            return None
        image, _ = self.scene.next()
        up, down = self._grain[self.count % len(self._grain)]
        self.count += 1
        cv2.add(image, up, dst=image)
        cv2.subtract(image, down, dst=image)
        return image, None

    def rewind(self) -> bool:
        self.open()
        self.ended_cleanly = False
        return True


def make_reader(spec: SourceSpec) -> Reader:
    if spec.kind is SourceKind.SYNTHETIC:
        return SyntheticReader(spec)
    if spec.kind is SourceKind.IMAGES:
        return ImageListReader(spec)
    return CaptureReader(spec)


# ---- the threaded source ---------------------------------------------------------------------------------


class SourceState(str, enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"  # an outage: reconnecting
    ENDED = "ended"  # a file ended, or a live source gave up (see `error`)


@dataclass
class Outage:
    start: float  # time.monotonic()
    end: float | None = None  # the stream reopened
    attempts: int = 0
    reason: str = ""
    # The attempt that succeeded started within one retry interval of the server's return (the one before it was
    # turned away): `answered` is when that attempt started, `end` when the stream was open and probed, and
    # `first_frame` when its first frame was decoded.
    answered: float | None = None
    first_frame: float | None = None

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start


class FrameBuffer:
    """Frames between a reader thread and the consumer. Newest-only (`capacity=1, drop=True`): a new frame
    replaces an untaken one (a counted drop). Frame by frame (`drop=False`): `put` waits while full.
    Every change notifies `cond`, which several buffers may share so a consumer can wait on all of them."""

    def __init__(self, capacity: int, *, drop: bool, cond: threading.Condition | None = None) -> None:
        self.capacity, self.drop = capacity, drop
        self.cond = cond or threading.Condition()
        self.items: deque[Frame] = deque()
        self.dropped = 0
        self.closed = False  # no more frames will come

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        with self.cond:
            if self.drop:
                while len(self.items) >= self.capacity:
                    self.items.popleft()
                    self.dropped += 1
            else:
                while len(self.items) >= self.capacity and not stop.is_set():
                    self.cond.wait(0.1)
                if stop.is_set():
                    return False
            self.items.append(frame)
            self.cond.notify_all()
            return True

    def ready(self) -> bool:
        """A frame is waiting (call with `cond` held)."""
        return bool(self.items)

    def take(self) -> Frame | None:
        """The oldest waiting frame, or None (call with `cond` held)."""
        if not self.items:
            return None
        frame = self.items.popleft()
        self.cond.notify_all()
        return frame

    def finish(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Source:
    """A reader pumped by its own thread into a FrameBuffer, with reconnects for live sources.

    `start()` opens the source once in the caller's thread, so a wrong URI, a missing file or a camera that does
    not open fails at once with SourceError; after that the thread reads, and for live sources reopens after a
    failure with exponential backoff. Iterate (`for frame in source`) or, as the pipeline does, wait on
    `buffer.cond` and `take()` from `buffer`.
    """

    def __init__(self, spec: SourceSpec | str, *, stream_id: int = 0, cond: threading.Condition | None = None,
                 reader: Reader | None = None) -> None:
        self.spec = spec if isinstance(spec, SourceSpec) else parse_source(spec)
        self.stream_id = stream_id
        self.reader = reader or make_reader(self.spec)
        self.live = self.reader.live
        o = self.spec.options
        self.buffer = FrameBuffer(1 if self.live else o.queue_size, drop=self.live, cond=cond)
        self.state = SourceState.STARTING
        self.error: str | None = None  # why a live source gave up, or why a file failed
        self.warning: str | None = None  # e.g. a file that ended before the frames its container promised
        self.frames_promised: int | None = None  # a truncated file: what its container promised
        self.frames_read = 0
        self.read_ms: deque[float] = deque(maxlen=4096)  # decode time per frame
        self.read_ms_total = 0.0
        self.outages: list[Outage] = []
        self.reconnects = 0
        self.size: tuple[int, int] | None = None  # (W, H) of the last frame
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pace_fps: float | None = None
        self._generation = 0  # the reader thread's number; a thread from an older generation was abandoned
        self._lock = threading.Lock()
        self._next_index = 0
        self.last_frame_at: float | None = None

    # ---- description -------------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.spec.uri

    @property
    def fps(self) -> float | None:
        """The source's believable nominal frame rate, or None."""
        return self.reader.nominal_fps

    @property
    def dropped(self) -> int:
        return self.buffer.dropped

    @property
    def running(self) -> bool:
        """`start()` was called (the reader thread exists)."""
        return self._thread is not None

    @property
    def ended(self) -> bool:
        return self.state is SourceState.ENDED

    def outage_seconds(self) -> float:
        return sum(o.duration for o in self.outages)

    def describe_state(self) -> str:
        if self.state is SourceState.ENDED and self.warning and not self.error:
            return f"ENDED early ({self.warning})"
        if self.state is SourceState.DOWN and self.outages:
            o = self.outages[-1]
            return f"DOWN {o.duration:.1f}s (attempt {o.attempts}: {o.reason})"
        if self.state is SourceState.ENDED and self.error:
            return f"ENDED ({self.error})"
        return self.state.value

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Source:
        if self._thread is not None:
            return self
        self.reader.open()  # SourceError on a bad source: fail before anything runs
        if self.reader.live != self.live:  # only known once open (a network URL that is a file)
            self.live = self.reader.live
            o = self.spec.options
            self.buffer = FrameBuffer(1 if self.live else o.queue_size, drop=self.live, cond=self.buffer.cond)
        self.state = SourceState.UP
        self.started_at = self.last_frame_at = time.monotonic()
        if self.spec.kind is SourceKind.SYNTHETIC and self.live:
            self._pace_fps = self.reader.fps  # type: ignore[attr-defined]
        elif self.spec.options.realtime and (self.spec.kind in (SourceKind.VIDEO, SourceKind.IMAGES)
                                             or getattr(self.reader, "remote_file", False)):
            self._pace_fps = self.spec.options.fps or self.reader.nominal_fps or 30.0
        self._spawn(self.reader)
        return self

    def _spawn(self, reader: Reader) -> None:
        self._generation += 1
        self._thread = threading.Thread(target=self._run, args=(self._generation, reader),
                                        name=f"source-{self.stream_id}", daemon=True)
        self._thread.start()

    @property
    def stall_timeout(self) -> float:
        """Seconds without a frame after which a live source that says it is up counts as stuck."""
        timeout = self.spec.options.read_timeout
        if getattr(self.reader, "pace_by_pts", False):
            timeout = max(timeout, 20.0)
        return max(1.0, 2.0 * timeout)

    def check_stall(self, now: float | None = None) -> bool:
        """Watchdog, called periodically (the pipeline does, ten times a second; so does iterating).

        A live source that is up but has delivered no frame for `stall_timeout` seconds is stuck in a read its
        backend does not time out. Its reader is abandoned (its thread finishes, and releases it, whenever the
        read returns), the outage is recorded, and a fresh reader reconnects in a new thread. True if so."""
        if not (self.live and self._reconnects_live()) or self.state is not SourceState.UP or self._stop.is_set():
            return False
        now = time.monotonic() if now is None else now
        quiet = now - (self.last_frame_at or now)
        if quiet < self.stall_timeout:
            return False
        with self._lock:
            if self.state is not SourceState.UP:
                return False
            self.reader = make_reader(self.spec)
            self.state = SourceState.DOWN
            self._record_outage(now, f"no frame for {quiet:.1f} s (a read that never returned)")
            log.warning("source %s: no frame for %.1f s; abandoning the stuck read and reconnecting", self.label,
                        quiet)
            self._spawn(self.reader)
        return True

    def _reconnects_live(self) -> bool:
        return self.spec.kind in (SourceKind.CAMERA, SourceKind.CSI, SourceKind.GSTREAMER, SourceKind.NETWORK)

    def close(self, timeout: float = 2.0) -> None:
        """Stop reading and release the device. A read blocked inside the driver is abandoned after `timeout`
        (its thread releases the device when the read returns)."""
        self._stop.set()
        with self.buffer.cond:
            self.buffer.cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self.reader.close()
        if self.state is not SourceState.ENDED:
            self.state = SourceState.ENDED
        self.buffer.finish()

    def __enter__(self) -> Source:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        self.start()
        while True:
            cond = self.buffer.cond
            with cond:
                while not self.buffer.ready() and not self.buffer.closed:
                    cond.wait(0.5)
                    self.check_stall()
                frame = self.buffer.take()
            if frame is None:
                return
            yield frame

    # ---- the reader thread -------------------------------------------------------------------------------

    def _current(self, generation: int) -> bool:
        """This thread is still the source's reader (not abandoned by the watchdog) and not stopped."""
        return generation == self._generation and not self._stop.is_set()

    def _run(self, generation: int, reader: Reader) -> None:
        try:
            self._loop(generation, reader)
        except Exception as e:  # a bug or an unexpected decoder error: end this stream, keep the others
            if generation == self._generation:
                log.exception("source %s failed", self.label)
                self.error = f"{type(e).__name__}: {e}"
        finally:
            reader.close()
            if generation == self._generation:
                self.state = SourceState.ENDED
                self.buffer.finish()

    def _loop(self, generation: int, reader: Reader) -> None:
        o = self.spec.options
        next_due = time.monotonic()
        pts_clock: tuple[float, float] | None = None  # (pts ms, monotonic s) of the frame the schedule started at
        while self._current(generation):
            if self.state is SourceState.DOWN:
                if not self._reconnect(generation, reader):
                    return
                pts_clock = None
            t0 = time.perf_counter()
            got = reader.read()
            ms = (time.perf_counter() - t0) * 1e3
            if not self._current(generation):
                return
            if got is None:
                if reader.truncated and self.warning is None:
                    self.warning = reader.truncated
                    self.frames_promised = reader.frame_count
                    log.warning("source %s: %s", self.label, reader.truncated)
                if reader.ended_cleanly or not self._reconnects_live():
                    # A source that never delivered a frame is an error, whatever the reason (and is not looped:
                    # a folder of undecodable files would spin forever).
                    if self.frames_read == 0:
                        self.error = reader.nothing_read()
                        return
                    if o.loop and reader.rewind():
                        continue
                    return
                self._begin_outage(reader, "read failed or timed out")
                continue
            image, pts = got
            if self._pace_fps:  # paced sources: synthetic scenes and files read in real time
                # The first frame goes out at once, each next one an interval after the one before.
                delay = next_due - time.monotonic()
                if delay > 0:
                    if self._stop.wait(delay):
                        return
                else:
                    next_due = time.monotonic()  # fell behind: do not try to catch up in a burst
                next_due += 1.0 / self._pace_fps
            elif getattr(reader, "pace_by_pts", False) and pts is not None:
                now = time.monotonic()
                if pts_clock is None:
                    pts_clock = (pts, now)
                delay = (pts - pts_clock[0]) / 1000.0 - (now - pts_clock[1])
                if delay < -1.0 or delay > 2.0:  # late (never catch up) or a timestamp jump: restart the clock
                    pts_clock = (pts, now)
                elif delay > 0:  # ahead of the stream's own clock (a segment arrived at once)
                    if self._stop.wait(delay):
                        return
            try:
                image = to_bgr8(image)
            except InputError as e:
                log.warning("source %s: skipping a frame: %s", self.label, e)
                continue
            self.read_ms.append(ms)
            self.read_ms_total += ms
            self.size = (image.shape[1], image.shape[0])
            now = time.monotonic()
            if self.outages and self.outages[-1].end is not None and self.outages[-1].first_frame is None:
                self.outages[-1].first_frame = now
            frame = Frame(image, self._next_index, now, self.stream_id, pts)
            self._next_index += 1
            self.frames_read += 1
            self.last_frame_at = now
            if not self.buffer.put(frame, self._stop):
                return

    def _begin_outage(self, reader: Reader, reason: str) -> None:
        log.warning("source %s: %s; reconnecting", self.label, reason)
        reader.close()
        self.state = SourceState.DOWN
        self._record_outage(time.monotonic(), reason)

    def _record_outage(self, now: float, reason: str) -> None:
        last = self.outages[-1] if self.outages else None
        if last is not None and last.end is not None and last.first_frame is None:
            # Reopened but failed again before its first frame: the stream never came back, the outage goes on.
            last.end = last.answered = None
            last.reason = reason
            self.reconnects -= 1
        else:
            self.outages.append(Outage(now, reason=reason))

    def _reconnect(self, generation: int, reader: Reader) -> bool:
        """Reopen after an outage with exponential backoff; False when the attempts are used up or on stop."""
        o = self.spec.options
        outage = self.outages[-1]
        delay = 0.0  # the first attempt is immediate: a dropped connection often reopens at once
        while self._current(generation):
            if delay and self._stop.wait(delay):
                return False
            if o.reconnect_attempts is not None and outage.attempts >= o.reconnect_attempts:
                self.error = (f"gave up after {outage.attempts} reconnect attempt(s) ({outage.reason}); "
                              "--reconnect-attempts sets the limit")
                return False
            outage.attempts += 1
            attempt_start = time.monotonic()
            try:
                reader.open()
            except SourceError as e:
                outage.reason = str(e)
                delay = o.backoff_initial if not delay else min(o.backoff_max, delay * 2)
                log.info("source %s: reconnect attempt %d failed; next in %.2f s", self.label, outage.attempts, delay)
                continue
            if not self._current(generation):
                return False
            outage.answered = attempt_start
            outage.end = time.monotonic()
            self.reconnects += 1
            self.last_frame_at = time.monotonic()  # the new connection gets a full stall timeout
            self.state = SourceState.UP
            log.warning("source %s: reconnected after %.1f s (%d attempt(s))", self.label, outage.duration,
                        outage.attempts)
            return True
        return False

    # ---- statistics --------------------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "uri": self.label, "kind": self.spec.kind.value, "live": self.live, "state": self.state.value,
            "error": self.error, "fps_nominal": self.fps, "size": list(self.size) if self.size else None,
            "frames_read": self.frames_read, "dropped": self.dropped, "reconnects": self.reconnects,
            "outages": [self._outage_stats(o) for o in self.outages],
            "outage_s": round(self.outage_seconds(), 3),
            "warning": self.warning, "frames_promised": self.frames_promised,
        }

    def _outage_stats(self, o: Outage) -> dict:
        """An outage in seconds since the source started (`answered_s`: the start of the attempt that got through;
        `reopened_s`: the stream was open; `first_frame_s`: its first frame was decoded)."""
        t0 = self.started_at or o.start

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 3)

        return {"start_s": since(o.start), "duration_s": round(o.duration, 3), "attempts": o.attempts,
                "reason": o.reason, "ongoing": o.end is None, "answered_s": since(o.answered),
                "reopened_s": since(o.end), "first_frame_s": since(o.first_frame)}


def open_source(uri: str | int | os.PathLike | None, options: SourceOptions = SourceOptions(), *,
                stream_id: int = 0, cond: threading.Condition | None = None) -> Source:
    """Parse `uri` and return a Source (not started; `start()`, iterate or use `with`)."""
    return Source(parse_source(uri, options), stream_id=stream_id, cond=cond)


def open_sources(uris: Sequence[str], options: SourceOptions = SourceOptions()) -> list[Source]:
    """Several sources sharing one condition, numbered 0..N-1, as the pipeline uses them."""
    cond = threading.Condition()
    return [open_source(u, options, stream_id=i, cond=cond) for i, u in enumerate(uris)]
