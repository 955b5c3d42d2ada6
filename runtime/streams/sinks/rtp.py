"""The RTP/UDP network video sink: H.264 over RTP to HOST:PORT through cv2.VideoWriter with a GStreamer pipeline."""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from ...core.errors import SinkError
from .base import Output, Sink, SinkContext
from .video import _quiet_stderr

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`rtp://HOST:PORT`',
     'H.264 over RTP/UDP to HOST:PORT (a multicast address works too; `?bitrate=KBITS`, 4000 by default) through '
     '`cv2.VideoWriter` and GStreamer: appsrc → videoconvert → nvv4l2h264enc on a Jetson, x264enc '
     '(`tune=zerolatency`) elsewhere, whichever is installed → rtph264pay (SPS/PPS with every key frame, one a '
     "second, so a viewer can join at any time) → udpsink. The first frame's size (even), the source's frame rate; "
     'newest frame, skipped frames counted. One stream per sink (`?stream=N`). Needs OpenCV with GStreamer: '
     'without, one line that says so and points to `edgepix doctor`. RTSP is not provided'),
)

DEFAULT_BITRATE_KBITS = 4000
# H.264 encoders in the order they are tried; the first whose GStreamer element is installed is used. Jetson's
# hardware encoder takes NV12 in NVMM memory (nvvidconv puts it there), x264enc system memory.
H264_ENCODERS: tuple[tuple[str, str], ...] = (
    ("nvv4l2h264enc", "video/x-raw, format=BGRx ! nvvidconv ! video/x-raw(memory:NVMM), format=NV12 ! "
                      "nvv4l2h264enc bitrate={bits} iframeinterval={gop} idrinterval={gop} insert-sps-pps=true "
                      "! h264parse"),
    ("x264enc", "video/x-raw, format=I420 ! x264enc tune=zerolatency speed-preset=ultrafast bitrate={kbits} "
                "key-int-max={gop}"),
)


def parse_rtp_address(target: str, uri: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); the port is required, an empty host or 'localhost' is 127.0.0.1."""
    hostport = target.split("/", 1)[0]
    host, sep, port_text = hostport.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise SinkError(f"{uri}: expected rtp://HOST:PORT with a port of 1..65535, such as rtp://192.168.1.20:5000")
    host = host.strip("[]")
    if host in ("", "localhost"):
        host = "127.0.0.1"
    if any(c.isspace() or c in "!\"'" for c in host):  # the host goes into a pipeline description
        raise SinkError(f"{uri}: {host!r} is not a host name or address")
    return host, int(port_text)


def rtp_pipeline(encoder: str, host: str, port: int, *, fps: float, bitrate_kbits: int) -> str:
    """The writer pipeline for `encoder` (a name in H264_ENCODERS): BGR frames from OpenCV's appsrc to udpsink."""
    gop = max(1, int(round(fps)))  # a key frame a second
    encode = dict(H264_ENCODERS)[encoder].format(bits=bitrate_kbits * 1000, kbits=bitrate_kbits, gop=gop)
    # sync=false: frames leave as soon as they are encoded (the pipeline already runs at the source's pace).
    return (f"appsrc ! videoconvert ! {encode} ! rtph264pay config-interval=-1 pt=96 ! "
            f"udpsink host={host} port={port} sync=false async=false")


def _open_writer(pipeline: str, fps: float, size: tuple[int, int], *, quiet: bool) -> cv2.VideoWriter | None:
    # OpenCV prints GStreamer's error for an element that is not installed; a fallback follows, so keep it quiet.
    with _quiet_stderr(quiet):
        writer = cv2.VideoWriter(pipeline, cv2.CAP_GSTREAMER, 0, fps, size, True)
    if writer.isOpened():
        return writer
    writer.release()
    return None


class RtpSink(Sink):
    """H.264 over RTP/UDP. Lossy like display:// and http://: a slow encoder never holds up the pipeline."""

    lossless = False

    def __init__(self, uri: str, host: str, port: int, streams: frozenset[int] | None = None, *,
                 bitrate_kbits: int = DEFAULT_BITRATE_KBITS, fps: float | None = None) -> None:
        super().__init__(uri, streams)
        if not 16 <= bitrate_kbits <= 200_000:
            raise SinkError(f"{uri}: bitrate: expected 16..200000 kbit/s, got {bitrate_kbits}")
        if fps is not None and not (math.isfinite(fps) and 0 < fps <= 240):
            raise SinkError(f"{uri}: fps: expected 0 < fps <= 240, got {fps}")
        self.host, self.port, self.bitrate_kbits, self.fps_override = host, port, bitrate_kbits, fps
        self.encoder: str | None = None
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (W, H)
        self.fps: float | None = None

    def preflight(self) -> None:
        """OpenCV must have GStreamer, and GStreamer an H.264 encoder: checked before the model loads."""
        from ..sources import opencv_has_gstreamer

        if not opencv_has_gstreamer():
            raise SinkError(f"{self.uri} needs OpenCV built with GStreamer, and this OpenCV {cv2.__version__} has "
                            "none: `edgepix doctor` says which OpenCV is in use and how to use one with GStreamer")
        if self.encoder is None:
            self.encoder = self._find_encoder()

    def _find_encoder(self) -> str:
        """The first H.264 encoder element GStreamer has: a small writer is opened (and closed) with each."""
        for i, (name, _) in enumerate(H264_ENCODERS):
            pipeline = rtp_pipeline(name, self.host, self.port, fps=30.0, bitrate_kbits=self.bitrate_kbits)
            writer = _open_writer(pipeline, 30.0, (64, 64), quiet=i < len(H264_ENCODERS) - 1)
            if writer is not None:
                writer.release()
                return name
        raise SinkError(f"{self.uri}: GStreamer has no H.264 encoder ({', '.join(n for n, _ in H264_ENCODERS)}): "
                        "install x264enc (Debian/Ubuntu: apt-get install gstreamer1.0-plugins-ugly); on a Jetson "
                        "nvv4l2h264enc comes with JetPack")

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        if self.multi():
            raise SinkError(f"{self.uri} sends one stream and {len(ctx.streams)} go to it: add ?stream=N "
                            "(one rtp:// sink per stream, each on its own port)")
        self.preflight()

    def write(self, out: Output) -> None:
        image = out.image
        if self.writer is None:
            self._open(image, self.ctx.streams[out.stream_id].fps)
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(image)  # type: ignore[union-attr]
        self.frames_written += 1

    def _open(self, image: np.ndarray, source_fps: float | None) -> None:
        h, w = image.shape[:2]
        self.size = (w + (w & 1), h + (h & 1))  # 4:2:0 encoders need even sizes
        self.fps = self.fps_override or source_fps or 30.0
        assert self.encoder is not None  # open() ran preflight()
        pipeline = rtp_pipeline(self.encoder, self.host, self.port, fps=self.fps, bitrate_kbits=self.bitrate_kbits)
        self.writer = _open_writer(pipeline, self.fps, self.size, quiet=False)
        if self.writer is None:
            raise SinkError(f"{self.uri}: GStreamer could not start `{pipeline}` (run it with gst-launch-1.0, "
                            "appsrc replaced by videotestsrc, to see why)")
        log.info("%s: H.264 (%s, %d kbit/s) over RTP to %s:%d, %dx%d at %.3g fps", self.uri, self.encoder,
                 self.bitrate_kbits, self.host, self.port, *self.size, self.fps)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()  # sends EOS through the pipeline
            self.writer = None

    def stats(self) -> dict:
        return {**super().stats(), "host": self.host, "port": self.port, "encoder": self.encoder,
                "size": list(self.size) if self.size else None, "fps": self.fps,
                "bitrate_kbits": self.bitrate_kbits}
