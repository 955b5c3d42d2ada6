"""Sink URIs: what a `--sink` string means, and the sink it makes."""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import SinkError, unknown_name
from .base import NullSink, Sink
from .display import DisplaySink
from .folder import ImageFolderSink
from .http import HttpSink
from .rtp import DEFAULT_BITRATE_KBITS, RtpSink, parse_rtp_address
from .video import VIDEO_CODECS, VideoFileSink

log = logging.getLogger(__name__)


# ---- URIs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkSpec:
    uri: str
    kind: str  # display | video | images | http | rtp | null
    target: str
    streams: frozenset[int] | None = None
    params: dict = field(default_factory=dict)


_SINK_PARAMS = {"stream", "fps", "codec", "quality", "clients", "bitrate"}


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
        raise SinkError("empty sink URI; expected display://, a video file, a folder/, http://HOST:PORT, "
                        "rtp://HOST:PORT or null://")
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
    if scheme == "rtp":
        parse_rtp_address(rest, uri)  # a bad address fails here, before anything opens
        return SinkSpec(text, "rtp", rest, streams, params)
    if scheme == "file":
        base = urllib.parse.unquote(rest)
    elif scheme:
        raise SinkError(unknown_name("sink scheme", scheme + "://",
                                     ["display://", "http://", "rtp://", "null://", "file://"])
                        + " (or a video file, a folder/ or an image pattern)")
    suffix = Path(base).suffix.lower()
    if suffix in VIDEO_CODECS:
        return SinkSpec(text, "video", base, streams, params)
    if base.endswith(("/", os.sep)) or "%" in base or os.path.isdir(base) or not suffix:
        return SinkSpec(text, "images", base, streams, params)
    raise SinkError(f"sink {uri!r}: cannot tell what to write for '{suffix}'; expected a video file "
                    f"({', '.join(VIDEO_CODECS)}), a folder ending in '/', an image pattern such as "
                    "out/%05d.png, display://, http://HOST:PORT, rtp://HOST:PORT or null://")


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
        if spec.kind == "rtp":
            host, port = parse_rtp_address(spec.target, spec.uri)
            return RtpSink(spec.uri, host, port, spec.streams,
                           bitrate_kbits=int(p.get("bitrate", DEFAULT_BITRATE_KBITS)),
                           fps=float(p["fps"]) if "fps" in p else None)
        if spec.kind == "video":
            return VideoFileSink(spec.uri, Path(spec.target).expanduser(), spec.streams,
                                 fps=float(p["fps"]) if "fps" in p else None, codec=p.get("codec"))
        return ImageFolderSink(spec.uri, os.path.expanduser(spec.target), spec.streams)
    except ValueError as e:
        raise SinkError(f"{spec.uri}: bad parameter value ({e})") from None
