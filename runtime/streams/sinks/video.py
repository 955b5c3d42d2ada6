"""Video file sinks: cv2.VideoWriter behind a locked partial file, every write checked, renamed when complete."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from ...core.errors import SinkError, unknown_name
from ...core.fileio import PartialFile, check_writable, remove_stale_partials
from .base import Output, Sink, SinkContext

log = logging.getLogger(__name__)


#: URIs of this sink and what it does (shown by the `--sink` help and docs/streams.md)
URI_HELP = (
    ('`out.mp4`, `.avi`, `.mkv`, `.webm`',
     "`cv2.VideoWriter`: H.264 (`avc1`) when OpenCV's FFmpeg has an encoder, else `mp4v` (.mp4/.mkv), MJPG "
     "(.avi), VP9/VP8 (.webm); the first frame's size (even), the source's frame rate (30 if unknown). "
     'Frames of live sources are placed by timestamp at that constant rate (repeated over gaps, at most 5 '
     "s), so the file plays at the scene's speed; file frames are written one for one. Written to a locked "
     '`.NAME.XXXXXXXX.partial.EXT` and renamed when finished; every write and the finished file are '
     'checked (its frames counted), so the path holds a complete, playable file or nothing: a full disk '
     'ends the run with one line naming the file, and the statistics say `complete: false`'),
)

VIDEO_CODECS: dict[str, tuple[str, ...]] = {
    # first the codec players like best, then one the opencv-python wheel's FFmpeg always has
    ".mp4": ("avc1", "mp4v"),
    ".m4v": ("avc1", "mp4v"),
    ".mov": ("avc1", "mp4v"),
    ".mkv": ("avc1", "mp4v", "MJPG"),
    ".avi": ("MJPG", "XVID"),
    ".webm": ("VP90", "VP80"),
}

# ---- video files -------------------------------------------------------------------------------------------


_CODEC_WORKS: dict[str, bool] = {}  # fourcc -> whether this process's OpenCV could open a writer with it
_OPENING = threading.Lock()  # a codec's verdict is read and recorded by one thread at a time
# File descriptor 2 is the process's: two threads silencing it at once (archive workers opening, closing or
# abandoning their videos) would restore each other's devnull, or let FFmpeg's messages through; and a line the
# main thread prints meanwhile (the last one before the process ends) would go to devnull. One thread at a time.
_SILENCING = threading.Lock()


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """Silence file descriptor 2 (where FFmpeg logs) for a moment."""
    if not quiet:
        yield
        return
    with _SILENCING:
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


def keep_stderr_for_last_words(timeout: float = 2.0) -> bool:
    """Before the process ends at once (`os._exit`) while writer threads still run: wait until none has file
    descriptor 2 silenced (at most `timeout` seconds) and keep any from silencing it again, so that the last line
    reaches the terminal. Never released: call it only on the way out. False if the wait timed out."""
    return _SILENCING.acquire(timeout=timeout)


def _disk_full(folder: Path) -> str | None:
    """'no space left on device' if the file system holding `folder` is (nearly) full, else None."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return None
    # root may use the blocks reserved for it, other users may not
    free = (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free < 1 << 20:
        return f"no space left on device ({free // 1024} KiB free on the disk holding {folder})"
    return None


class VideoFileWriter:
    """One cv2.VideoWriter: opened at the first frame, written to a locked partial file beside the target and
    renamed over the target only once it is closed and verified, so the target is a complete, playable video
    or absent.

    Every write is checked (OpenCV says whether FFmpeg wrote the frame) and so is the finished file (reopened,
    its frames counted): a full disk or an I/O error becomes one SinkError naming the file and the cause, and the
    partial file is deleted (an MP4 without its index is unplayable, so there is nothing worth keeping)."""

    def __init__(self, path: Path, fps: float, live: bool, codecs: Sequence[str]) -> None:
        self.path, self.fps, self.live, self.codecs = path, fps, live, codecs
        self.part: PartialFile | None = None
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (W, H)
        self.fourcc = ""
        self.written = 0  # frames in the file (repeats included)
        self.t0: float | None = None
        self.error: str | None = None  # why the file was given up
        self.complete = False  # closed, verified and renamed to `path`

    def _open(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        # Most encoders want even sizes; an odd camera mode is scaled by a pixel.
        self.size = (w + (w & 1), h + (h & 1))
        try:
            self.part = PartialFile(self.path)
        except OSError as e:
            raise SinkError(f"cannot write video {self.path}: {e.strerror or e}") from None
        for i, fourcc in enumerate(self.codecs):
            with _OPENING:
                if _CODEC_WORKS.get(fourcc) is False:
                    continue
                last = i == len(self.codecs) - 1
                # FFmpeg prints its own errors for an encoder it lacks (the opencv-python wheel has no H.264
                # encoder); a fallback follows, so keep the first trial of each codec quiet.
                with _quiet_stderr(not last and fourcc not in _CODEC_WORKS):
                    writer = cv2.VideoWriter(str(self.part.path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc),
                                             self.fps, self.size)
                if writer.isOpened():
                    _CODEC_WORKS[fourcc] = True
                    self.writer, self.fourcc = writer, fourcc
                    return
                writer.release()
                full = _disk_full(self.path.parent)
                if full:  # FFmpeg could not even write the header: no verdict on the codec (the next run retries it)
                    self.part.discard()
                    raise SinkError(f"cannot write video {self.path}: {full}")
                _CODEC_WORKS[fourcc] = False
        self.part.discard()
        raise SinkError(f"cannot write video {self.path}: OpenCV's FFmpeg has none of the codecs "
                        f"{', '.join(self.codecs)} for {self.path.suffix} (try .avi, which uses MJPG)")

    def write(self, image: np.ndarray, timestamp: float) -> None:
        if self.error is not None:
            return
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
            # False: FFmpeg could not write the frame (a full disk, an I/O error); None: an OpenCV too old to say
            # (4.6), whose FFmpeg truncates the file silently, so the disk itself is looked at
            status = self.writer.write(image)  # type: ignore[union-attr]
            if status is False or (status is None and _disk_full(self.path.parent)):
                self._give_up(f"FFmpeg could not write frame {self.written + 1}")
            self.written += 1

    def _give_up(self, cause: str) -> None:
        """Delete the partial file and raise one SinkError with the cause (a full disk is named as such)."""
        cause = _disk_full(self.path.parent) or cause
        if self.writer is not None:
            with _quiet_stderr(True):  # FFmpeg complains about the trailer it cannot write either
                self.writer.release()
            self.writer = None
        if self.part is not None:
            self.part.discard()
        self.error = f"cannot write video {self.path}: {cause}; the unfinished file ({self.written} frames) was deleted"
        raise SinkError(self.error)

    def _verify(self) -> str | None:
        """Why the finished partial file is not a complete, playable video, or None if it is."""
        with _quiet_stderr(True):
            cap = cv2.VideoCapture(str(self.part.path), cv2.CAP_FFMPEG)  # type: ignore[union-attr]
            try:
                if not cap.isOpened():
                    return "the finished file does not open (its index could not be written)"
                count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
                # Some containers estimate their frame count from the duration: allow one frame of rounding.
                if 0 < count < self.written - 1:
                    return f"the finished file holds {int(count)} of the {self.written} frames written"
                if not cap.read()[0]:
                    return "no frame of the finished file decodes"
            finally:
                cap.release()
        return None

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        if not self.written:
            self.part.discard()  # type: ignore[union-attr]
            return
        problem = self._verify()
        if problem is not None:
            self._give_up(problem)
        try:
            self.part.commit()  # type: ignore[union-attr]
        except OSError as e:
            self._give_up(e.strerror or str(e))
        self.complete = True

    def abandon(self) -> None:
        """Stop without finishing: the partial file is deleted, the target left as it was."""
        if self.writer is not None:
            with _quiet_stderr(True):
                self.writer.release()
            self.writer = None
        if self.part is not None:
            self.part.discard()

    def stats(self) -> dict:
        d = {"frames": self.written if self.error is None else 0, "fps": self.fps, "size": self.size,
             "codec": self.fourcc, "complete": self.complete}
        if self.error is not None:
            d["error"] = self.error
        return d


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
        self.writers: dict[int, VideoFileWriter] = {}

    def preflight(self) -> None:
        check_writable(self.path, "video", SinkError)

    def open(self, ctx: SinkContext) -> None:
        super().open(ctx)
        self.preflight()
        if self.multi():  # one file per stream: their partial files from a killed run go too
            for s in ctx.streams:
                if self.accepts(s.stream_id):
                    remove_stale_partials(self.path_for(s.stream_id))

    def path_for(self, stream_id: int) -> Path:
        if not self.multi():
            return self.path
        return self.path.with_name(f"{self.path.stem}_{stream_id}{self.path.suffix}")

    def write(self, out: Output) -> None:
        w = self.writers.get(out.stream_id)
        if w is None:
            info = self.ctx.streams[out.stream_id]
            fps = self.fps_override or info.fps or 30.0
            w = self.writers[out.stream_id] = VideoFileWriter(self.path_for(out.stream_id), fps, info.live, self.codecs)
        w.write(out.image, out.timestamp)
        self.frames_written += 1

    def close(self) -> None:
        errors = []
        for w in self.writers.values():  # every file is finished, even when one of them fails
            try:
                w.close()
            except SinkError as e:
                errors.append(str(e))
        if errors:
            raise SinkError("; ".join(errors))

    def stats(self) -> dict:
        return {**super().stats(), "files": {str(w.path): w.stats() for w in self.writers.values()}}

