"""Source URIs and options: what a `--source` string means, checked before anything opens."""

from __future__ import annotations

import enum
import logging
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import SourceError, unknown_name
from ...core.fields import flag
from ...core.formats import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
MAX_SANE_FPS = 240.0
MIN_FPS = 0.1  # slowest rate a source may be asked for (one frame per 10 s): slower is a typo, not a camera
MAX_CAPTURE_SIDE = 16384  # no camera mode is wider or taller
MAX_SYNTHETIC_SIDE = 4096  # synthetic scenes: 4K is plenty for a test pattern (frames and grain stay < 0.5 GB)
RTSP_TRANSPORTS = ("auto", "tcp", "udp")

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
    # requested frame rate (cameras, CSI, synthetic); also paces files with realtime
    fps: float | None = field(default=None, metadata=flag("requested camera frame rate", name="--input-fps",
                                                          metavar="FPS"))
    codec: str | None = None  # requested camera pixel format / FourCC, e.g. "MJPG" (USB cameras need it for 30 fps HD)
    open_timeout: float = field(default=10.0, metadata=flag("network streams: seconds allowed to open one",
                                                            metavar="S"))
    read_timeout: float = field(default=5.0, metadata=flag(
        "network streams: a read that blocks this many seconds counts as an outage", metavar="S"))
    # "auto": TCP (no smeared frames from lost packets), UDP if the server refuses TCP; "tcp" or "udp" force one
    rtsp_transport: str = field(default="auto", metadata=flag("auto: TCP, or UDP when the server refuses TCP",
                                                              choices=RTSP_TRANSPORTS))
    reconnect_attempts: int | None = field(default=None, metadata=flag(
        "live sources: reopen tries per outage; 0 ends the stream", metavar="N", default="unlimited"))
    backoff_initial: float = 0.25  # seconds before the second reopen; doubles on each failure ...
    # ... up to this: a refused connection costs the server nothing, and a short wait is what lets a stream
    # be back within a second of its server's return
    backoff_max: float = field(default=0.5, metadata=flag(
        "live sources: the longest wait in seconds between reopen tries; the wait doubles after each",
        metavar="S"))
    realtime: bool = field(default=False, metadata=flag(
        "read video files at their frame rate, keeping only the newest frame like a camera; off: every frame, as "
        "fast as the model goes"))
    loop: bool = field(default=False, metadata=flag("restart video files and image lists at their end"))
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
        if self.rtsp_transport not in RTSP_TRANSPORTS:
            raise SourceError(unknown_name("RTSP transport", self.rtsp_transport, RTSP_TRANSPORTS))
        if self.reconnect_attempts is not None and self.reconnect_attempts < 0:
            raise SourceError(f"reconnect_attempts: expected >= 0 or None (unlimited), got {self.reconnect_attempts}")
        if self.queue_size < 1:
            raise SourceError(f"queue_size: expected >= 1, got {self.queue_size}")
        if self.codec is not None and len(self.codec) != 4:
            raise SourceError(f"codec: expected a four-character code such as MJPG or YUYV, got {self.codec!r}")


def short_uri(text: str, limit: int = 80) -> str:
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
        raise SourceError(f"size: expected WIDTHxHEIGHT such as 640x480, got {short_uri(text)!r}")
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


def has_glob(text: str) -> bool:
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
                raise SourceError(f"{short_uri(text)}: " + unknown_name("synthetic:// parameter", short_uri(key),
                                                                     sorted(_SYNTHETIC_KEYS)))
        spec = SourceSpec(text, SourceKind.SYNTHETIC, "", options, tuple(params.items()))
        synthetic_fps(spec), synthetic_size(spec), synthetic_speed(spec)
        int_param(spec, "seed", 0, low=0, high=2**63 - 1), int_param(spec, "frames", None, low=1)
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
        check_url(text)
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
    if has_glob(text_path) and not path.exists():
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


def check_url(text: str) -> None:
    """A network URL that urllib (and so the readers) can take apart: a bracketed IPv6 host, a numeric port."""
    try:
        urllib.parse.urlsplit(text).port  # noqa: B018 - reading .port checks it (ValueError when not 0..65535)
    except ValueError as e:
        raise SourceError(f"{short_uri(text)}: not a valid URL ({e}); expected SCHEME://HOST[:PORT]/PATH, an IPv6 "
                          "host in brackets, e.g. rtsp://[::1]:8554/cam") from None


def synthetic_fps(spec: SourceSpec) -> float:
    params = dict(spec.params)
    if "fps" in params:
        try:
            fps = float(params["fps"])
        except ValueError:
            raise SourceError(f"{short_uri(spec.uri)}: fps: expected a number, "
                              f"got {short_uri(params['fps'])!r}") from None
    else:
        fps = spec.options.fps if spec.options.fps is not None else 30.0
    return check_fps(fps, f"{short_uri(spec.uri)}: fps")


def synthetic_size(spec: SourceSpec) -> tuple[int, int]:
    params = dict(spec.params)
    w, h = parse_size(params["size"]) if "size" in params else (spec.options.size or (640, 480))
    if not (16 <= w <= MAX_SYNTHETIC_SIDE and 16 <= h <= MAX_SYNTHETIC_SIDE):
        raise SourceError(f"{short_uri(spec.uri)}: size: expected 16..{MAX_SYNTHETIC_SIDE} pixels each way, "
                          f"got {w}x{h}")
    return w, h


def synthetic_speed(spec: SourceSpec) -> float:
    text = dict(spec.params).get("speed", "4")
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not 0 <= speed <= 1000:  # NaN fails too
        raise SourceError(f"{short_uri(spec.uri)}: speed: expected 0..1000 pixels per frame, got {short_uri(text)!r}")
    return speed


def int_param(spec: SourceSpec, key: str, default: int | None, *, low: int | None = None,
               high: int | None = None) -> int | None:
    params = dict(spec.params)
    if key not in params:
        return default
    text = params[key]
    # Digits only, and not thousands of them: int() of a huge literal is slow and means nothing here.
    if not re.fullmatch(r"\s*[-+]?\d{1,20}\s*", text):
        raise SourceError(f"{short_uri(spec.uri)}: {key}: expected an integer of at most 20 digits, "
                          f"got {short_uri(text)!r}")
    value = int(text)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        raise SourceError(f"{short_uri(spec.uri)}: {key}: expected an integer {bounds}, got {value}")
    return value

