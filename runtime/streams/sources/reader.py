"""Frames and the synchronous reader interface every kind of source implements."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from ...core.errors import InputError
from .uri import MAX_SANE_FPS

log = logging.getLogger(__name__)


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

