"""The sink interface: what a sink is given (StreamInfo, SinkContext, Output) and what it does (Sink), and
null://."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`null://`',
     'counts frames (for measuring)'),
)


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

