"""Temporal quality of masks on video: flicker, lag and accuracy, measured only when asked (numpy + OpenCV).

- Flicker: the share of pixels whose class changes between consecutive frames where the scene did not change
  there. With exact masks (the synthetic moving scenes) "did not change" is where the true class is the same in
  both frames (`flicker`), or, stricter about what counts as still, where no true class changed within
  `edge_px` pixels (`flicker_static`): a model's edge is only as sharp as its output grid, so the pixels just
  beside a moving edge change with the edge, which is motion, not flicker. On real video "did not change" is where
  the previous frame, moved along the optical flow (OpenCV's DIS) onto
  this one, matches this frame within `tolerance` grey levels; the previous class map is moved along the same flow
  before the comparison, so a moving camera or object is not counted as flicker.
- Lag: how many frames a moving object's mask trails behind the object. On the pixels where the truth changed
  between frame t-k and frame t, the prediction at t is compared with the truth of t, t-1, ... t-k; the lag is the
  k whose truth it matches best (0: the mask keeps up).
- Accuracy: mIoU against the exact masks (ConfusionMatrix).
"""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np

from .metrics import ConfusionMatrix

MAX_WIDTH = 320  # real video: flicker is measured at this width at most (the flow costs ~1 ms there)


class FlickerMeter:
    """Feed one stream's frames and class maps in order; `flicker` is changed pixels / unchanged-scene pixels."""

    def __init__(self, *, tolerance: float = 12.0, max_width: int = MAX_WIDTH) -> None:
        self.tolerance = tolerance
        self.max_width = max_width
        self.changed = 0
        self.stable = 0
        self._previous: tuple[np.ndarray, np.ndarray] | None = None  # (grey, classes) at the measuring size
        self._flow = None

    @property
    def flicker(self) -> float:
        return self.changed / self.stable if self.stable else float("nan")

    def reset(self) -> None:
        """A scene cut or a reconnect: the next frame is compared with nothing."""
        self._previous = None

    def count(self, classes: np.ndarray, previous_classes: np.ndarray, still: np.ndarray) -> None:
        """Add one frame pair: `still` is where the scene did not change."""
        self.stable += int(still.sum())
        self.changed += int((still & (classes != previous_classes)).sum())

    def update(self, frame: np.ndarray, classes: np.ndarray) -> None:
        """A frame (BGR or grey) and its class map (any size: it is brought to the frame's measuring size)."""
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_width / w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if grey.shape[::-1] != size:
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        if classes.shape[::-1] != size:
            classes = cv2.resize(classes.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if self._previous is not None:
            previous_grey, previous_classes = self._previous
            if self._flow is None:
                self._flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
            flow = self._flow.calc(grey, previous_grey, None)  # this frame -> the previous one
            xs, ys = np.meshgrid(np.arange(size[0], dtype=np.float32), np.arange(size[1], dtype=np.float32))
            mx, my = xs + flow[..., 0], ys + flow[..., 1]
            warped = cv2.remap(previous_grey, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            warped_classes = cv2.remap(previous_classes, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
            self.count(classes, warped_classes, cv2.absdiff(warped, grey) <= self.tolerance)
        self._previous = (grey, classes.astype(np.uint8, copy=False))


class LagMeter:
    """Frames of delay between a mask and the moving objects it should follow, from exact masks."""

    def __init__(self, max_lag: int = 3) -> None:
        self.max_lag = max_lag
        self.truths: deque[np.ndarray] = deque(maxlen=max_lag + 1)
        self.matches = np.zeros(max_lag + 1)  # matches[k]: agreements with the truth of k frames ago
        self.counts = np.zeros(max_lag + 1)

    def update(self, classes: np.ndarray, truth: np.ndarray) -> None:
        self.truths.appendleft(truth)
        if len(self.truths) <= self.max_lag:
            return
        oldest = self.truths[-1]
        moving = oldest != truth  # where the scene changed within the window: where a lag shows
        n = int(moving.sum())
        if n == 0:
            return
        for k, past in enumerate(self.truths):
            self.matches[k] += int((classes[moving] == past[moving]).sum())
            self.counts[k] += n

    @property
    def lag(self) -> int:
        """The delay (frames) whose truth the masks matched best; 0 with no motion seen."""
        if not self.counts.any():
            return 0
        return int(np.argmax(self.matches / np.maximum(self.counts, 1)))

    def agreement(self) -> list[float]:
        return [float(m / c) if c else float("nan") for m, c in zip(self.matches, self.counts)]


class TemporalScore:
    """Flicker, lag and mIoU of one stream against exact masks (the synthetic moving scenes)."""

    def __init__(self, num_classes: int, *, max_lag: int = 3, edge_px: int = 4) -> None:
        self.flicker = FlickerMeter()
        self.static = FlickerMeter()
        self.edge = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * edge_px + 1, 2 * edge_px + 1))
        self.lag = LagMeter(max_lag)
        self.confusion = ConfusionMatrix(num_classes, ignore_index=None)
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, classes: np.ndarray, truth: np.ndarray) -> None:
        if classes.shape != truth.shape:
            classes = cv2.resize(classes.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
        if self._previous is not None:
            previous_classes, previous_truth = self._previous
            changed = (previous_truth != truth).astype(np.uint8)
            self.flicker.count(classes, previous_classes, changed == 0)
            self.static.count(classes, previous_classes, cv2.dilate(changed, self.edge) == 0)
        self.lag.update(classes, truth)
        self.confusion.update(classes, truth)
        self._previous = (classes, truth)

    def summary(self) -> dict:
        return {"flicker": self.flicker.flicker, "flicker_static": self.static.flicker, "lag_frames": self.lag.lag,
                "miou": self.confusion.miou(),
                "lag_agreement": self.lag.agreement()}
