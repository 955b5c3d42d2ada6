"""Stable masks on video: a temporal stabilizer for a segmenter's scores, one state per stream.

A segmenter decides every frame on its own, so on video the class of a boundary pixel (or of a noisy region) can
change from one frame to the next although nothing moved there: the mask blinks. Averaging the last N masks hides
that, but a moving object's mask then trails behind the object. The stabilizer here smooths only where the picture
did not change:

- `ema`: an exponential moving average of the class scores (logits or probabilities, at the model's resolution,
  before the decision), `s = w * new + (1 - w) * s_prev`, except where the frame changed since the previous one (the
  motion gate: the largest change of any colour channel between the two frames, at the pixel and around it; colour,
  not only brightness, since an object and its background can be equally bright): there the state takes the new
  scores at once. The weight `w` of the new frame follows how sure its decision is: `alpha` where the top score
  leads the runner-up by `confident_margin` logits or more, down to `alpha_min` where the two tie. Flicker is where
  the decision is unsure (a boundary, a region the model hesitates over), so that is where the history weighs
  most, while a sure change of class passes as fast as with `alpha`. Within `near_motion` pixels of the gate the
  weight is at least `alpha`: a moving edge is always unsure, and held back it would trail. Static regions are
  smoothed, moving objects follow without lag.
- `flow`: the same, with the previous scores first moved along the optical flow (OpenCV's DIS) from the previous
  frame to this one, and the gate taken on what the flow could not explain (the warped previous frame against this
  one). It also smooths a moving camera's static scene, at the cost of the flow and the warp of every class plane.
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
from ..description.spec import BINARY_KINDS, OutputKind


class TemporalMode(str, enum.Enum):
    OFF = "off"
    EMA = "ema"
    FLOW = "flow"
    HYSTERESIS = "hysteresis"


SCORE_MODES = (TemporalMode.EMA, TemporalMode.FLOW)  # the modes that need scores, not a class map


@dataclass(frozen=True, kw_only=True)
class TemporalOptions:
    mode: TemporalMode = TemporalMode.OFF
    alpha: float = 0.3  # weight of the new frame's sure scores where nothing moved (lower: smoother, slower to settle)
    alpha_min: float = 0.05  # ... and of its unsure ones (top two tied; at most alpha): the history weighs most
    confident_margin: float = 2.0  # logits by which the top score leads the runner-up in a sure decision
    motion_threshold: float = 10.0  # grey levels (0..255) of frame change that count as motion
    motion_dilate: int = 0  # pixels (at the model's resolution) by which the motion mask is grown
    near_motion: int = 2  # ema/flow: pixels around the motion mask where unsure scores weigh alpha, not less
    cut_threshold: float = 40.0  # mean grey-level change of the whole frame that counts as a scene cut
    hold: int = 2  # hysteresis: frames a new class must hold before a static pixel takes it

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", TemporalMode(self.mode))
        except ValueError:
            raise InputError(unknown_name("temporal mode", str(self.mode), [m.value for m in TemporalMode])) from None
        if not 0.0 < self.alpha <= 1.0:
            raise InputError(f"temporal alpha: expected a value in (0, 1], got {self.alpha}")
        if not 0.0 < self.alpha_min <= 1.0 or self.confident_margin <= 0.0:
            raise InputError(f"temporal: expected alpha_min in (0, 1] and confident_margin > 0, got alpha_min "
                             f"{self.alpha_min}, confident_margin {self.confident_margin}")
        object.__setattr__(self, "alpha_min", min(self.alpha_min, self.alpha))  # a lower alpha lowers both
        if not 0.0 <= self.motion_threshold <= 255.0 or not 0.0 < self.cut_threshold <= 255.0:
            raise InputError("temporal thresholds: expected grey levels in 0..255, got "
                             f"motion {self.motion_threshold}, cut {self.cut_threshold}")
        if self.motion_dilate < 0 or self.near_motion < 0 or self.hold < 1:
            raise InputError(f"temporal: expected motion_dilate >= 0, near_motion >= 0 and hold >= 1, got "
                             f"{self.motion_dilate}, {self.near_motion}, {self.hold}")


def small_frame(frame: np.ndarray, size: tuple[int, int], *, blur: bool = False) -> np.ndarray:
    """The frame at (H, W) `size`, with sensor noise averaged out (noise is not motion): what the motion gate
    compares. Colour is kept: two colours of equal brightness (an object on a background) differ in colour only.
    `blur`: a 3x3 mean after the resize as well, for fewer false alarms at the cost of a gate spread one pixel
    wider (hysteresis takes a new class outright wherever the gate opens)."""
    h, w = size
    # Halved (2x2 means) while both sides stay at least 3/4 of the target's, then bilinear: each halving averages
    # the noise of 4 pixels at a fifth of the cost of INTER_AREA's general path (over 1 ms at 640x480 -> 256x256).
    # A frame not halved at all gets the 3x3 mean instead. No blur after halving for ema and flow: it would spread
    # the gate a model pixel beyond a moving edge, where the new frame's unsteady boundary then passes unsmoothed.
    halved = False
    while frame.shape[0] >= 1.5 * h and frame.shape[1] >= 1.5 * w:
        fh, fw = frame.shape[0] // 2, frame.shape[1] // 2
        frame = cv2.resize(frame[:2 * fh, :2 * fw], (fw, fh), interpolation=cv2.INTER_AREA)
        halved = True
    if frame.shape[:2] != size:
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.blur(frame, (3, 3)) if blur or not halved else frame


def _logit(p):
    p = np.clip(p, np.float32(1e-6), np.float32(1 - 1e-6))
    return np.log(p / (1 - p))


def decision_margin(scores: np.ndarray, kind: OutputKind = OutputKind.LOGITS, threshold: float = 0.0) -> np.ndarray:
    """How sure the decision on (C, H, W) float32 scores is, per pixel, in logits: (H, W) float32, >= 0.

    Logits: the top score minus the runner-up's. Probabilities: the log of their ratio (the same number, for a
    softmax). A binary output (C = 1): the distance of its logit from the threshold's (`threshold` on the output's
    own scale, as the decoder reads it)."""
    if kind in BINARY_KINDS:
        plane, t = scores[0], np.float32(threshold)
        if kind is OutputKind.BINARY_PROBABILITY:
            plane, t = _logit(plane), _logit(t)
        return np.abs(plane - t, dtype=np.float32)
    top = scores[0].copy()
    second = np.full_like(top, -np.inf)
    lower = np.empty_like(top)
    for c in range(1, scores.shape[0]):  # running top two, one OpenCV pass per plane (numpy's sort is 20x slower)
        cv2.min(top, scores[c], dst=lower)
        cv2.max(second, lower, dst=second)
        cv2.max(top, scores[c], dst=top)
    if kind is OutputKind.PROBABILITIES:
        cv2.log(np.maximum(top, 1e-6, out=top), dst=top)
        cv2.log(np.maximum(second, 1e-6, out=second), dst=second)
    return cv2.subtract(top, second, dst=top)


def _disc(radius: int) -> np.ndarray | None:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)) if radius else None


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
        self._gate_kernel = _disc(options.motion_dilate)
        self._near_kernel = _disc(options.near_motion)

    def reset(self) -> None:
        self.scores = self.frame = self.candidate = self.count = None
        self.resets += 1

    def _moved(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Where two frames differ by more than the motion threshold in any channel, both at the pixel and on
        average over its 3x3 neighbourhood (a lone noisy pixel is not motion, and the pixels beside a moving edge,
        whose own change is small, stay out), grown by `motion_dilate`."""
        diff = cv2.absdiff(a, b)
        if diff.ndim == 3:  # the largest change of any channel, per pixel (planes: 6x faster than cv2.reduce)
            planes = cv2.split(diff)
            diff = planes[0]
            for plane in planes[1:]:
                cv2.max(diff, plane, dst=diff)
        threshold = self.options.motion_threshold
        _, moved = cv2.threshold(diff, threshold, 1, cv2.THRESH_BINARY)
        _, around = cv2.threshold(cv2.blur(diff, (3, 3)), threshold, 1, cv2.THRESH_BINARY)
        cv2.bitwise_and(moved, around, dst=moved)
        kernel = self._gate_kernel
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

    def update(self, values: np.ndarray, frame: np.ndarray, *, kind: OutputKind = OutputKind.LOGITS,
               threshold: float = 0.0) -> np.ndarray:
        """`kind` and `threshold` say how to read scores (logits unless told; see `decision_margin`)."""
        mode = self.options.mode
        if mode is TemporalMode.OFF:
            return values
        size = values.shape[-2:]
        small = small_frame(frame, size, blur=mode is TemporalMode.HYSTERESIS)
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
        blended = np.subtract(values, state, dtype=np.float32)  # state + w * (new - state), in place
        blended *= self._weights(values, moved, kind, threshold)
        blended += state
        self.scores = blended
        return blended

    def _weights(self, values: np.ndarray, moved: np.ndarray, kind: OutputKind, threshold: float) -> np.ndarray:
        """The new frame's weight per pixel (H, W): 1 where the frame changed (no lag), else from `alpha_min` (a
        tie between the top two classes) up to `alpha` (a lead of `confident_margin` logits or more)."""
        o = self.options
        weight = decision_margin(values, kind, threshold)
        np.minimum(weight, np.float32(o.confident_margin), out=weight)
        weight *= np.float32((o.alpha - o.alpha_min) / o.confident_margin)
        weight += np.float32(o.alpha_min)
        if o.near_motion:  # next to a moving edge (always unsure) held-back scores would make the edge trail
            near = cv2.dilate(moved.view(np.uint8), self._near_kernel).view(bool)
            np.maximum(weight, np.float32(o.alpha), out=weight, where=near)
        weight[moved] = 1.0
        return weight

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
