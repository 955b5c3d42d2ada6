"""What the stream pipeline runs: a FrameProcessor turns a batch of BGR frames into one rendered image per frame.

    preprocess(frames, out=buffer) -> Prepared     the model input, written into the worker's own buffer
    run(tensor) -> raw                             the backend call(s); K workers call it at once when its
                                                   backends are thread-safe, else each has its own processor
    postprocess(raw, prepared) -> [result, ...]    one result per frame, at the frame's geometry
    render(frame, result) -> image                 what the sinks get

plus `normalizer` (the input tensor's shape), `static_batch`, `max_batch`, `backend` (for its description and
statistics), `backends` (every backend `run` calls: the pipeline asks each whether it is thread-safe), `describe()`
and `close()`. `Segmenter` (class maps, drawn over the frame), `ImageGenerator` (pix2pix-style image -> image) and
`SegmentThenGenerate` (a segmenter's class maps into a mask -> image generator) implement it, so every source,
sink, statistic and the HTTP page serve all three (`runtime.streams.pipeline.Pipeline`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from ..backends.base import Backend
from ..core.errors import InputError, ModelFormatError
from .imageops import Geometry, Normalizer, as_bgr, content_region


@dataclass
class Prepared:
    """A pre-processed batch: the model input tensor and where each frame sits inside it."""

    tensor: np.ndarray
    geometries: list[Geometry]
    ms: float = 0.0

    @property
    def n(self) -> int:
        return len(self.geometries)


@runtime_checkable
class FrameProcessor(Protocol):
    backend: Backend
    normalizer: Normalizer
    static_batch: int | None
    max_batch: int | None

    @property
    def backends(self) -> tuple[Backend, ...]: ...

    def preprocess(self, frames: Sequence[np.ndarray], *, out: np.ndarray | None = None) -> Prepared: ...

    def run(self, tensor: np.ndarray) -> np.ndarray: ...

    def postprocess(self, raw: np.ndarray, prepared: Prepared) -> list[Any]: ...

    def render(self, frame: np.ndarray, result: Any) -> np.ndarray: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def prepare(normalizer: Normalizer, static_batch: int | None, frames: Sequence[np.ndarray],
            out: np.ndarray | None = None) -> Prepared:
    """BGR frames -> a model input tensor (a new array unless `out` is given), the preprocess of every processor.
    Frames are checked and grayscale/BGRA ones converted; the batch is padded with zeros to a static batch."""
    start = time.perf_counter()
    frames = [as_bgr(f, name=f"frame {i}" if len(frames) > 1 else "frame") for i, f in enumerate(frames)]
    n_slots = max(len(frames), static_batch or 0)
    if out is None:
        out = normalizer.empty(n_slots)
    elif out.shape != normalizer.tensor_shape(n_slots) or out.dtype != np.float32:
        raise InputError(f"out: expected float32 {normalizer.tensor_shape(n_slots)}, got {out.dtype.name} "
                         f"{out.shape}")
    geometries = [normalizer.fill(f, out[i]) for i, f in enumerate(frames)]
    if n_slots > len(frames):
        out[len(frames):] = 0.0
    return Prepared(out, geometries, (time.perf_counter() - start) * 1e3)


def to_frame_geometry(image: np.ndarray, g: Geometry, *, resize: bool) -> np.ndarray:
    """A model-resolution image back to its frame: the letterbox border cropped away and, with `resize`, scaled
    to the frame's size (bilinear: these are pictures, not class maps)."""
    if g.padded:
        rows, cols = content_region(g, image.shape[:2])
        image = np.ascontiguousarray(image[rows, cols])
    if resize and image.shape[:2] != tuple(g.frame_hw):
        image = cv2.resize(image, (g.frame_hw[1], g.frame_hw[0]), interpolation=cv2.INTER_LINEAR)
    return image


class SegmentThenGenerate:
    """A chain: each frame is segmented, its class map painted with the generator's palette, and that mask turned
    into a picture by a mask -> image generator (a pix2pix model trained on palette-coloured masks, whose spec
    carries the palette). Both models run in `run`, so the pipeline's workers overlap them like any other model.

    `show`: "generated" (the picture, at the frame's size) or "side" (the frame and the picture side by side).
    """

    SHOW = ("generated", "side")

    def __init__(self, segmenter, generator, *, show: str = "side") -> None:
        gen_spec = generator.spec
        if not gen_spec.palette:
            raise ModelFormatError(f"{generator.backend.path.name}: a chain needs a mask -> image generator (its "
                                   "spec has a class palette); this one turns images into images")
        if len(gen_spec.palette) < segmenter.num_classes:
            raise ModelFormatError(f"{generator.backend.path.name}: its palette has {len(gen_spec.palette)} "
                                   f"classes, the segmenter gives {segmenter.num_classes}")
        if show not in self.SHOW:
            raise InputError(f"show: expected one of {', '.join(self.SHOW)}, got {show!r}")
        self.segmenter, self.generator, self.show = segmenter, generator, show
        self.backend = segmenter.backend
        self.normalizer = segmenter.normalizer
        self.static_batch = segmenter.static_batch
        self.max_batch = segmenter.max_batch
        # The generator's own palette (what it was trained on), RGB -> BGR, as a lookup table over class indices.
        self._lut = np.zeros((256, 3), np.uint8)
        for i, (r, g, b) in enumerate(gen_spec.palette[:256]):
            self._lut[i] = (b, g, r)
        self._gen_hw = generator.normalizer.input_hw

    def preprocess(self, frames: Sequence[np.ndarray], *, out: np.ndarray | None = None) -> Prepared:
        return self.segmenter.preprocess(frames, out=out)

    def masks(self, raw: np.ndarray) -> list[np.ndarray]:
        """The segmenter's raw output -> palette-coloured masks at the generator's input size (nearest-neighbour,
        so no colour that is not a class appears)."""
        h, w = self._gen_hw
        masks = []
        for i in range(raw.shape[0]):
            model_map = np.asarray(self.segmenter.model_map(raw, i), np.uint8)  # as the spec says to read it
            if model_map.shape != (h, w):
                model_map = cv2.resize(model_map, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            masks.append(self._lut[model_map])
        return masks

    @property
    def backends(self) -> tuple[Backend, ...]:
        """Both models' backends: `run` calls the two."""
        return (self.segmenter.backend, self.generator.backend)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        masks = self.masks(self.segmenter.run(tensor))
        gen = self.generator
        step = gen.static_batch or len(masks)  # a static-batch generator takes its own batch size
        pictures = []
        for s in range(0, len(masks), step):
            chunk = masks[s:s + step]
            pictures.append(gen.run(prepare(gen.normalizer, gen.static_batch, chunk).tensor)[:len(chunk)])
        return pictures[0] if len(pictures) == 1 else np.concatenate(pictures)

    def postprocess(self, raw: np.ndarray, prepared: Prepared) -> list[np.ndarray]:
        # The masks kept the segmenter's letterbox border, so its geometry (relative sizes) crops the pictures too.
        return [to_frame_geometry(image, g, resize=True)
                for image, g in zip(self.generator.to_images(raw[:prepared.n]), prepared.geometries)]

    def render(self, frame: np.ndarray, result: np.ndarray) -> np.ndarray:
        if self.show == "generated":
            return result
        return np.hstack([as_bgr(frame), result])

    def describe(self) -> str:
        return f"{self.segmenter.describe()}; then {self.generator.describe()}"

    def close(self) -> None:
        self.segmenter.close()
        self.generator.close()
