"""A segmentation output, as the spec describes it, turned into class maps: at the model's size, and at the frame's.

The spec says where the channels are (`output_layout`), what they hold (`output_kind`: logits, probabilities, one
channel of a binary probability or logit, or a class map of any integer type) and how the output reaches the
frame (`upsample`):

- `scores`: the scores are cropped to the frame's content (letterbox), resized bilinearly to the frame, and the
  decision (argmax, or the threshold) is taken at the frame's size. This is how segmentation models are evaluated
  and how vendors' pipelines upsample a probability map, and it gives smooth edges at any zoom. The C planes are
  resized one `cv2.resize` each into a (C, H, W) buffer and reduced by the OpenCV argmax (`argmax_classes`):
  measured at 640x480 from 256x256 with 6 classes on the 2-core AMD EPYC, 1.3 ms, against 6.1 ms for one
  `cv2.resize` of the HWC array followed by numpy's argmax over its last axis (numpy reduces a short last axis
  slowly); the two differ only by float rounding (3 pixels in a million). A binary output is one plane.
- `classes`: the decision is taken at the model's size and the class map resized nearest-neighbour (cheaper: one
  byte per pixel is resized instead of C floats; blocky when the frame is much larger than the model).

A class-map output has no scores, so it is always resized nearest. docs/runtime.md measures both modes.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from ..description.outputs import decision_threshold
from ..description.spec import BINARY_KINDS, SCORE_KINDS, Layout, ModelSpec, OutputKind, Upsample
from .imageops import Geometry, argmax_classes, content_region, map_to_frame, softmax_confidence


class OutputDecoder:
    """Class maps from one sample of a segmentation output (the raw output's [i]).

    `graph_class_map`: the backend returns a class map although the spec describes scores (the argmax or the
    threshold was fused into the graph at load time), so the output is read as a class map.
    """

    def __init__(self, spec: ModelSpec, *, graph_class_map: bool = False) -> None:
        self.kind = OutputKind.CLASS_MAP if graph_class_map else spec.output_kind
        self.nhwc = spec.output_layout is Layout.NHWC
        self.binary = self.kind in BINARY_KINDS
        self.threshold = decision_threshold(spec) if self.binary else 0.0
        self.scores_upsample = spec.upsample is Upsample.SCORES and self.kind in SCORE_KINDS
        self.dtype = np.uint8 if spec.num_classes <= 256 else np.int32
        # The frame-size score planes of each calling thread (pipeline workers share a Segmenter), kept between
        # frames: a fresh (C, H, W) float32 array per frame (7 MB for 6 classes at 640x480) costs its page faults,
        # measured at up to 6 ms a frame, more than the resize itself.
        self._local = threading.local()

    # ---- at the model's size -------------------------------------------------------------------------------

    def model_map(self, sample: np.ndarray) -> np.ndarray:
        """The (h, w) class map at the output's own resolution (letterbox border included)."""
        if self.kind is OutputKind.CLASS_MAP:
            plane = sample if sample.ndim == 2 else (sample[..., 0] if self.nhwc else sample[0])
            return plane if plane.dtype == self.dtype else plane.astype(self.dtype)
        if self.binary:
            return self._above(self._plane(sample))
        if self.nhwc:  # the OpenCV argmax on class planes is many times faster than numpy's over a short last axis
            return argmax_classes(np.ascontiguousarray(sample.transpose(2, 0, 1)))
        return argmax_classes(sample)

    def _plane(self, sample: np.ndarray) -> np.ndarray:
        """A binary output's one channel as an (h, w) view."""
        return sample[..., 0] if self.nhwc else sample[0]

    def _above(self, plane: np.ndarray) -> np.ndarray:
        """Class 1 where the score is above the threshold (on the output's own scale), else 0; uint8."""
        return np.greater(plane, self.threshold).view(np.uint8)

    # ---- at the frame's size -------------------------------------------------------------------------------

    def frame_map(self, sample: np.ndarray, g: Geometry) -> np.ndarray:
        """The (H, W) class map at the frame's size, by the spec's upsampling."""
        if not self.scores_upsample:
            return map_to_frame(self.model_map(sample), g)
        if self.binary:
            return self._above(self._frame_scores(self._plane(sample)[None], g)[0])
        return argmax_classes(self._frame_scores(sample.transpose(2, 0, 1) if self.nhwc else sample, g))

    def _frame_scores(self, planes: np.ndarray, g: Geometry) -> np.ndarray:
        """(C, h, w) scores (any strides) -> the frame's content resized bilinearly, (C, H, W) float32: this
        thread's buffer, valid until its next call."""
        rows, cols = content_region(g, planes.shape[1:])
        content = np.ascontiguousarray(planes[:, rows, cols], dtype=np.float32)  # a copy only where it must be
        h, w = g.frame_hw
        if content.shape[1:] == (h, w):
            return content
        shape = (content.shape[0], h, w)
        out = getattr(self._local, "scores", None)
        if out is None or out.shape != shape:
            out = self._local.scores = np.empty(shape, np.float32)
        for c in range(content.shape[0]):
            plane = out[c]
            resized = cv2.resize(content[c], (w, h), dst=plane, interpolation=cv2.INTER_LINEAR)
            if not np.shares_memory(resized, plane):  # an OpenCV that hands back a new array: copy it in
                plane[...] = resized
        return out

    # ---- confidence ------------------------------------------------------------------------------------------

    @property
    def has_scores(self) -> bool:
        return self.kind in SCORE_KINDS

    def confidence(self, sample: np.ndarray, g: Geometry) -> np.ndarray:
        """The probability of the decided class per pixel, at the frame's size (bilinear), float32: the softmax of
        logits, the largest probability, or p / 1 - p of a binary output (the sigmoid of a logit)."""
        if self.binary:
            p = self._plane(sample).astype(np.float32)
            if self.kind is OutputKind.BINARY_LOGIT:
                p = 1.0 / (1.0 + np.exp(-p))
            conf = np.maximum(p, 1.0 - p)
        elif self.kind is OutputKind.PROBABILITIES:
            conf = sample.max(axis=-1 if self.nhwc else 0).astype(np.float32)
        else:
            conf = softmax_confidence(np.ascontiguousarray(sample.transpose(2, 0, 1)) if self.nhwc else sample)
        return map_to_frame(np.ascontiguousarray(conf, dtype=np.float32), g, nearest=False)
