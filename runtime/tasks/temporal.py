"""Stable masks on video: a temporal stabilizer for a segmenter's scores, one state per stream.

A segmenter decides every frame on its own, so on video the class of a boundary pixel (or of a noisy region) can
change from one frame to the next although nothing moved there: the mask blinks. Averaging the last N masks hides
that, but a moving object's mask then trails behind the object. The stabilizer here smooths only where the picture
did not change:

- `ema`: an exponential moving average of the class scores (logits or probabilities, at the model's resolution,
  before the decision), `s = alpha * new + (1 - alpha) * s_prev`, except where the frame changed since the previous
  one (the motion gate: the absolute difference of the two frames, blurred and dilated so that an object's edge
  counts as changed; colour, not only brightness, since an object and its background can be equally bright): there
  the state takes the new scores at once. Static regions are smoothed, moving objects
  follow without lag.
- `flow`: the same, with the previous scores first moved along the optical flow (OpenCV's DIS) from the previous
  frame to this one, and the gate taken on what the flow could not explain (the warped previous frame against this
  one). It also smooths a moving camera's static scene, at the cost of the flow (about a millisecond at 256x256).
- Class-map models (argmax in the graph) have no scores: `hysteresis` keeps a pixel's class until another class
  holds there for `hold` consecutive frames, except where the frame changed.

A scene cut (the mean frame difference above `cut_threshold`) or a reconnect resets the state. The state belongs
to one stream: the pipeline keeps one `TemporalState` per stream id (`Stabilizer.state(stream_id)`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import cv2
import numpy as np

from ..core.errors import InputError, unknown_name


class TemporalMode(str, enum.Enum):
    OFF = "off"
    EMA = "ema"
    FLOW = "flow"
    HYSTERESIS = "hysteresis"


SCORE_MODES = (TemporalMode.EMA, TemporalMode.FLOW)  # the modes that need scores, not a class map


@dataclass(frozen=True, kw_only=True)
class TemporalOptions:
    mode: TemporalMode = TemporalMode.OFF
    alpha: float = 0.3  # weight of the new frame's scores where nothing moved (lower: smoother, slower to settle)
    motion_threshold: float = 10.0  # grey levels (0..255) of frame change that count as motion
    motion_dilate: int = 2  # pixels (at the model's resolution) by which the motion mask is grown
    cut_threshold: float = 40.0  # mean grey-level change of the whole frame that counts as a scene cut
    hold: int = 2  # hysteresis: frames a new class must hold before a static pixel takes it

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", TemporalMode(self.mode))
        except ValueError:
            raise InputError(unknown_name("temporal mode", str(self.mode), [m.value for m in TemporalMode])) from None
        if not 0.0 < self.alpha <= 1.0:
            raise InputError(f"temporal alpha: expected a value in (0, 1], got {self.alpha}")
        if not 0.0 <= self.motion_threshold <= 255.0 or not 0.0 < self.cut_threshold <= 255.0:
            raise InputError("temporal thresholds: expected grey levels in 0..255, got "
                             f"motion {self.motion_threshold}, cut {self.cut_threshold}")
        if self.motion_dilate < 0 or self.hold < 1:
            raise InputError(f"temporal: expected motion_dilate >= 0 and hold >= 1, got {self.motion_dilate}, "
                             f"{self.hold}")


def small_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The frame at (H, W) `size`, lightly blurred (sensor noise is not motion): what the motion gate compares.
    Colour is kept: two colours of equal brightness (an object on a background) differ in colour only."""
    if frame.shape[:2] != size:
        frame = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return cv2.blur(frame, (3, 3))


def _grey(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


class TemporalState:
    """One stream's memory: the smoothed scores (or the held class map) and the previous frame, both at the
    model's resolution. `update()` takes this frame's scores (C, H, W) or class map (H, W) and returns the
    stabilized one, of the same shape and dtype."""

    def __init__(self, options: TemporalOptions) -> None:
        self.options = options
        self.scores: np.ndarray | None = None
        self.frame: np.ndarray | None = None
        self.candidate: np.ndarray | None = None  # hysteresis: the class waiting to take over, and for how long
        self.count: np.ndarray | None = None
        self.resets = 0
        self._flow = None
        self._grid: np.ndarray | None = None

    def reset(self) -> None:
        self.scores = self.frame = self.candidate = self.count = None
        self.resets += 1

    def _kernel(self) -> np.ndarray | None:
        d = self.options.motion_dilate
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1)) if d else None

    def _moved(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Where two frames differ by more than the motion threshold in any channel, grown by `motion_dilate`."""
        diff = cv2.absdiff(a, b)
        if diff.ndim == 3:  # the largest change of any channel, per pixel
            diff = cv2.reduce(diff.reshape(-1, diff.shape[2]), 1, cv2.REDUCE_MAX).reshape(diff.shape[:2])
        _, moved = cv2.threshold(diff, self.options.motion_threshold, 1, cv2.THRESH_BINARY)
        kernel = self._kernel()
        return (cv2.dilate(moved, kernel) if kernel is not None else moved).view(bool)

    def _warp(self, small: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """The flow from this frame back to the previous one, as a remap map (H, W, 2) of (x, y)."""
        if self._flow is None:
            self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        flow = self._flow.calc(_grey(small), _grey(previous), None)
        h, w = small.shape[:2]
        if self._grid is None or self._grid.shape[:2] != (h, w):
            xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
            self._grid = np.dstack([xs, ys])
        flow += self._grid
        return flow

    def update(self, values: np.ndarray, frame: np.ndarray) -> np.ndarray:
        mode = self.options.mode
        if mode is TemporalMode.OFF:
            return values
        size = values.shape[-2:]
        small = small_frame(frame, size)
        previous = self.frame
        self.frame = small
        if previous is None or previous.shape != small.shape or \
                cv2.norm(previous, small, cv2.NORM_L1) / small.size > self.options.cut_threshold:  # per channel
            if previous is not None:
                self.resets += 1  # a scene cut (or another frame size): nothing of the old state applies
            self.scores, self.candidate, self.count = None, None, None
            return self._first(values)
        if mode is TemporalMode.HYSTERESIS:
            return self._hysteresis(values, self._moved(previous, small))
        state = self.scores
        assert state is not None
        if mode is TemporalMode.FLOW:
            xy = self._warp(small, previous)
            moved = self._moved(cv2.remap(previous, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
                                small)
            # remap moves every class plane in one call when they are the last axis
            state = np.ascontiguousarray(cv2.remap(np.ascontiguousarray(state.transpose(1, 2, 0)), xy, None,
                                                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                                         .reshape(*state.shape[1:], -1).transpose(2, 0, 1))
        else:
            moved = self._moved(previous, small)
        blended = np.subtract(values, state, dtype=np.float32)  # state + alpha * (new - state), in place
        blended *= self.options.alpha
        blended += state
        np.copyto(blended, values, where=moved[None])  # where the frame changed: this frame's scores, no lag
        self.scores = blended
        return blended

    def _first(self, values: np.ndarray) -> np.ndarray:
        if self.options.mode is TemporalMode.HYSTERESIS:
            self.scores = values.copy()
            self.candidate = values.copy()
            self.count = np.zeros(values.shape, np.uint8)
            return values
        self.scores = values.astype(np.float32, copy=True)
        return values

    def _hysteresis(self, classes: np.ndarray, moved: np.ndarray) -> np.ndarray:
        held, candidate, count = self.scores, self.candidate, self.count
        same = classes == candidate  # type: ignore[operator]
        count = np.where(same, np.minimum(count + 1, 255), 1).astype(np.uint8)  # type: ignore[operator]
        candidate = classes
        take = moved | (count >= self.options.hold) | (classes == held)
        held = np.where(take, classes, held)
        self.scores, self.candidate, self.count = held, candidate, count
        return held


class Stabilizer:
    """The temporal states of a run, one per stream id, created on a stream's first frame."""

    def __init__(self, options: TemporalOptions) -> None:
        self.options = options
        self.states: dict[int, TemporalState] = {}

    @property
    def active(self) -> bool:
        return self.options.mode is not TemporalMode.OFF

    def state(self, stream_id: int) -> TemporalState:
        state = self.states.get(stream_id)
        if state is None:
            state = self.states[stream_id] = TemporalState(self.options)
        return state

    def reset(self, stream_id: int) -> None:
        """A stream reconnected: its next frame starts afresh."""
        if stream_id in self.states:
            self.states[stream_id].reset()

    def resets(self) -> int:
        return sum(s.resets for s in self.states.values())
