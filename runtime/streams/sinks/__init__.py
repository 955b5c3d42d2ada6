"""Frame sinks: where rendered frames go. Several at once; each runs in its own pipeline thread.

The URIs each kind accepts, and what the code does with them, are its module's `URI_HELP` rows; `URI_HELP`
here joins them in the order the `--sink` help and docs/streams.md list them.

`rtp://HOST:PORT` sends H.264 over RTP/UDP through a GStreamer pipeline (OpenCV with GStreamer needed).

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
that writes the same file (see `runtime.core.fileio`).

The package follows the data flow: `base` (the Sink interface and null://), one module per kind (`video`,
`folder`, `display`, `http`, `rtp`), and `uri` (what a sink string means, and `make_sink`).
"""

from __future__ import annotations

from . import base, display, folder, http, rtp, video
from .base import NullSink, Output, Sink, SinkContext, StreamInfo
from .display import DisplaySink, display_available, draw_hud, hud_lines
from .folder import ImageFolderSink
from .http import BOUNDARY, MAX_REQUEST_HEAD, PAGE, HttpSink
from .rtp import H264_ENCODERS, RtpSink, parse_rtp_address, rtp_pipeline
from .uri import SinkSpec, make_sink, parse_http_address, parse_sink
from .video import VIDEO_CODECS, VideoFileSink, VideoFileWriter

__all__ = [
    "URI_HELP",
    "BOUNDARY", "DisplaySink", "HttpSink", "ImageFolderSink", "MAX_REQUEST_HEAD", "NullSink", "Output", "PAGE",
    "Sink", "SinkContext", "SinkSpec", "StreamInfo", "VIDEO_CODECS", "VideoFileSink", "VideoFileWriter",
    "display_available", "draw_hud", "hud_lines", "make_sink", "parse_http_address", "parse_sink",
    "H264_ENCODERS", "RtpSink", "parse_rtp_address", "rtp_pipeline",
]

URI_HELP: tuple[tuple[str, str], ...] = (display.URI_HELP + video.URI_HELP + folder.URI_HELP + http.URI_HELP
                                         + rtp.URI_HELP + base.URI_HELP)
