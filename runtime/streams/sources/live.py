"""The threaded Source: a reader in its own thread, newest-frame buffering for live sources, reconnect with
backoff, outages and statistics."""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...core.errors import InputError, SourceError
from .capture import CaptureReader
from .images import ImageListReader
from .reader import Frame, Reader, to_bgr8
from .scenes import SyntheticReader
from .uri import SourceKind, SourceOptions, SourceSpec, parse_source

log = logging.getLogger(__name__)


def make_reader(spec: SourceSpec) -> Reader:
    if spec.kind is SourceKind.SYNTHETIC:
        return SyntheticReader(spec)
    if spec.kind is SourceKind.IMAGES:
        return ImageListReader(spec)
    return CaptureReader(spec)


# ---- the threaded source ---------------------------------------------------------------------------------


MAX_OUTAGES_KEPT = 64  # outages listed in a source's statistics; older ones are counted and timed only


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
        self.outages: list[Outage] = []  # the last MAX_OUTAGES_KEPT; older ones only counted (a run of months)
        self.older_outages = 0
        self.older_outage_s = 0.0
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
        return self.older_outage_s + sum(o.duration for o in self.outages)

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
            if len(self.outages) >= MAX_OUTAGES_KEPT:  # a flaky camera over weeks: memory stays bounded
                old = self.outages.pop(0)
                self.older_outages += 1
                self.older_outage_s += old.duration
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
            "outages_total": self.older_outages + len(self.outages),
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
