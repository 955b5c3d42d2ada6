"""Frame sources: cameras, network streams, GStreamer pipelines, video files, images and synthetic scenes.

Every source yields `Frame(image, index, timestamp, stream_id)`: a BGR uint8 image (grayscale, BGRA and 16-bit
frames are converted), the frame's number in its stream, and `time.monotonic()` when it was read. URIs follow
jetson-inference's habits:

The URIs each kind accepts, and what the code does with them, are its module's `URI_HELP` rows; `URI_HELP`
here joins them in the order the `--source` help and docs/streams.md list them.

Live sources (cameras, network streams, GStreamer, paced synthetic scenes, files with `realtime`) are read in their
own thread that keeps only the newest frame: a frame that was not taken before the next one arrived is dropped and
counted, so the consumer never falls behind the camera. A live source that stops delivering (a read fails or
times out) is closed and reopened with exponential backoff, for `reconnect_attempts` tries (unlimited by default)
while the consumer keeps running; each outage is recorded. Files, images and unpaced synthetic scenes are read
frame by frame into a small bounded queue: nothing is dropped and the reader waits for the consumer.

    with open_source("rtsp://camera/stream") as source:
        for frame in source:                      # newest frames, until the source ends or close()
            ...

The package follows the data flow: `uri` (what a source string means), `reader` (frames and the reader
interface), one module per kind of reader (`capture`: cameras, CSI, GStreamer, network streams and video files;
`images`: images, folders and globs; `scenes`: synthetic scenes), and `live` (the threaded Source).
"""

from __future__ import annotations

from . import capture, images, scenes
from .capture import LIVE_PROBE_OPTIONS, CaptureReader, csi_pipeline, opencv_has_gstreamer, quiet_decoder_logs
from .images import ImageListReader
from .live import FrameBuffer, Outage, Source, SourceState, make_reader, open_source, open_sources
from .reader import Frame, Reader, sane_fps, to_bgr8
from .scenes import SyntheticReader
from .uri import (
    MAX_CAPTURE_SIDE,
    MAX_SANE_FPS,
    MAX_SYNTHETIC_SIDE,
    MIN_FPS,
    NETWORK_SCHEMES,
    SourceKind,
    SourceOptions,
    SourceSpec,
    check_fps,
    parse_size,
    parse_source,
    synthetic_fps,
    synthetic_size,
    synthetic_speed,
)

__all__ = [
    "URI_HELP",
    "CaptureReader", "Frame", "FrameBuffer", "ImageListReader", "LIVE_PROBE_OPTIONS", "MAX_CAPTURE_SIDE",
    "MAX_SANE_FPS", "MAX_SYNTHETIC_SIDE", "MIN_FPS", "NETWORK_SCHEMES", "Outage", "Reader", "Source",
    "SourceKind", "SourceOptions", "SourceSpec", "SourceState", "SyntheticReader", "check_fps", "csi_pipeline",
    "make_reader", "open_source", "open_sources", "opencv_has_gstreamer", "parse_size", "parse_source", "quiet_decoder_logs",
    "sane_fps", "synthetic_fps", "synthetic_size", "synthetic_speed", "to_bgr8",
]

URI_HELP: tuple[tuple[str, str], ...] = capture.URI_HELP + images.URI_HELP + scenes.URI_HELP
