"""The Segmenter: BGR frames in, class maps (and overlays) out, with any backend, without torch.

    from edgepix.runtime import Segmenter
    with Segmenter.load("model.onnx") as seg:          # backend "auto": ort-trt > ort-cuda > ort-cpu > opencv
        result = seg.segment(frame)                      # frame: HxWx3 uint8 BGR (grayscale and BGRA converted)
        result.class_map                                 # HxW uint8 at the frame's size
        image = seg.render(frame, result)                # overlay / mask / side by side, optional legend

Stages, each timed in milliseconds (`result.timings`):
- preprocess: resize (stretch, or letterbox with the spec's pad value), BGR->RGB, scale/mean/std folded into one
  float32 multiply-add per channel, written straight into a preallocated NCHW (or NHWC) tensor.
- infer: the backend call.
- postprocess: argmax at the model's output resolution (or the graph's own uint8 class map when the spec says
  `output_kind = class_map`, or when the ONNX Runtime backend fused the argmax into the graph at load time,
  the default for logits models), letterbox border cropped away, nearest-neighbour resize to the frame, and
  optionally the softmax confidence of the winning class (bilinear to the frame).
- render: palette lookup + blend (`render()`), timed when called.

Batches: `segment_batch(frames)` runs frames of any sizes together. A model with a static batch dimension B gets
chunks of B frames (the last chunk is zero-padded to B, and the padding's outputs dropped); a model with a dynamic
batch gets chunks of `max_batch` frames (all at once by default). Timings of a batched call are the chunk's stage
times divided by its frame count.

A Segmenter reuses one input buffer across calls, so one instance must not be used from two threads at once; the
stream pipeline calls `preprocess` / `run` / `postprocess` from its stages, which use buffers of their own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..core.errors import InputError, ModelFormatError
from ..description.spec import Layout, ModelSpec, OutputKind, Task
from ..description.tensors import TensorMeta
from .imageops import Geometry, Normalizer, argmax_classes, as_bgr, map_to_frame, softmax_confidence
from .model import input_meta, open_model, output_meta, split_overrides, static_batch
from .processor import Prepared, prepare
from .render import Renderer, RenderOptions


@dataclass
class StageTimes:
    """Milliseconds per stage for one frame (a batch's times divided by its frame count)."""

    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    render: float = 0.0

    @property
    def total(self) -> float:
        return self.preprocess + self.infer + self.postprocess + self.render

    def as_dict(self) -> dict[str, float]:
        return {"preprocess": self.preprocess, "infer": self.infer, "postprocess": self.postprocess,
                "render": self.render, "total": self.total}


@dataclass
class SegmentationResult:
    class_map: np.ndarray  # (H, W) class indices at the frame's size; uint8 (int32 above 255 classes)
    model_map: np.ndarray  # (h, w) class indices at the model's output resolution, letterbox border included
    geometry: Geometry  # where the frame sat inside the model input
    confidence: np.ndarray | None = None  # (H, W) float32 softmax probability of the winning class
    timings: StageTimes = field(default_factory=StageTimes)
    batch_size: int = 1  # frames that shared the inference call

    @property
    def shape(self) -> tuple[int, int]:
        return self.class_map.shape[:2]

    def class_fractions(self, num_classes: int) -> np.ndarray:
        """The share of the frame's pixels assigned to each class, float64 (num_classes,)."""
        counts = np.bincount(self.class_map.ravel(), minlength=num_classes)[:num_classes]
        return counts / max(1, self.class_map.size)


def check_logits(out: TensorMeta, spec: ModelSpec, name: str) -> None:
    if len(out.shape) != 4:
        raise ModelFormatError(f"{name}: expected logits (N, C, H, W), found {out.describe()}")
    if out.dim(1) is not None and out.dim(1) != spec.num_classes:
        raise ModelFormatError(f"{name}: the spec lists {spec.num_classes} classes, the output has "
                               f"{out.dim(1)} channels ({out.describe()})")


class Segmenter:
    def __init__(self, backend: Backend, spec: ModelSpec, *, confidence: bool = False, max_batch: int | None = None,
                 render: RenderOptions = RenderOptions()) -> None:
        if spec.task is not Task.SEGMENTATION:
            raise ModelFormatError(f"{backend.path.name} is a {spec.task.value} model, not a segmentation model")
        self.backend, self.spec = backend, spec
        self.confidence = confidence
        self._in = input_meta(backend, spec)
        # The backend may have ended the graph in ArgMax (see Segmenter.load): then it returns class maps.
        self.fused_argmax = backend.fused_argmax is not None
        self._out = backend.output(backend.fused_argmax) if self.fused_argmax else output_meta(backend, spec)
        self.graph_class_map = self.fused_argmax or spec.output_kind is OutputKind.CLASS_MAP
        if self.fused_argmax and confidence:
            raise InputError("confidence needs the logits, but the backend was loaded with the argmax fused into "
                             "the graph; load the Segmenter with confidence=True")
        self.input_size = self._check_input_size()
        self._check_output()
        self.static_batch = static_batch(self._in)
        if max_batch is not None and max_batch < 1:
            raise InputError(f"max_batch: expected a positive integer or None, got {max_batch!r}")
        self.max_batch = self.static_batch or max_batch
        self.normalizer = Normalizer(spec, self.input_size)
        self._buffer: np.ndarray | None = None
        self._checked_shape: tuple[int, ...] | None = None
        self.renderer = Renderer(spec.class_names, spec.colours(), render)  # for the Segmenter's own options
        self._renderers: dict[RenderOptions, Renderer] = {}

    # ---- construction --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str | os.PathLike | Backend, backend: str = "auto", *, confidence: bool = False,
             max_batch: int | None = None, render: RenderOptions = RenderOptions(), fuse_argmax: bool = True,
             classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, **options: Any) -> Segmenter:
        """Load a segmentation model.

        `backend`: a registry name or "auto". `classes`, `mean`, `std` (and the other spec fields in
        `model.SPEC_OVERRIDES`, e.g. `input_size` for dynamic-size models) override the model's spec, or stand
        in for the spec a foreign ONNX file lacks. Any other keyword is an option of the backend (`threads`,
        `fp16`, `engine_cache_dir`, `target`, ...); an unknown one is an error naming the valid ones.

        `fuse_argmax`: for a model that outputs logits, backends that can (the ONNX Runtime ones) append
        ArgMax + Cast(uint8) to the graph at load time (description.onnxedit), so the argmax runs inside the session
        and a 1-byte-per-pixel class map comes out instead of C floats per pixel. Not done with
        `confidence=True`, which needs the logits.
        """
        overrides, backend_options = split_overrides(dict(options))
        overrides.update(classes=classes, mean=mean, std=std)

        def fusable(spec: ModelSpec, outputs: Sequence[TensorMeta]) -> str | None:
            if not (fuse_argmax and not confidence and spec.output_kind is OutputKind.LOGITS
                    and spec.num_classes <= 255):
                return None
            logits = next((t for t in outputs if t.name == spec.output_name), None)
            if logits is None:
                return None
            check_logits(logits, spec, Path(str(model)).name)  # the fused graph will not show the logits again
            return spec.output_name

        b, spec = open_model(model, backend, task=Task.SEGMENTATION, overrides=overrides,
                             backend_options=backend_options, fuse_argmax=fusable)
        try:
            return cls(b, spec, confidence=confidence, max_batch=max_batch, render=render)
        except BaseException:
            if not isinstance(model, Backend):
                b.close()
            raise

    def _check_input_size(self) -> tuple[int, int]:
        meta, spec = self._in, self.spec
        if len(meta.shape) != 4:
            raise ModelFormatError(f"{self.backend.path.name}: expected a rank-4 image input, found {meta.describe()}")
        c_dim, hw_dims = (1, (2, 3)) if spec.input_layout is Layout.NCHW else (3, (1, 2))
        if meta.dim(c_dim) not in (3, None):
            raise ModelFormatError(f"{self.backend.path.name}: the spec says {spec.input_layout.value} with 3 "
                                   "channels, "
                                   f"the model's input is {meta.describe()}")
        fixed = tuple(meta.dim(i) for i in hw_dims)
        if all(d is not None for d in fixed) and fixed != tuple(spec.input_size):
            raise ModelFormatError(f"{self.backend.path.name}: the spec says input {spec.input_size}, the model's "
                                   "input "
                                   f"is fixed at {fixed} ({meta.describe()}); re-export the model")
        return tuple(spec.input_size)  # type: ignore[return-value]

    def _check_output(self) -> None:
        out, spec, name = self._out, self.spec, self.backend.path.name
        if not self.graph_class_map:
            check_logits(out, spec, name)
        elif len(out.shape) not in (3, 4) or (len(out.shape) == 4 and out.dim(1) not in (1, None)):
            raise ModelFormatError(f"{name}: expected a class map (N, H, W), found {out.describe()}")

    # ---- stages --------------------------------------------------------------------------------------------

    def preprocess(self, frames: Sequence[np.ndarray], *, out: np.ndarray | None = None) -> Prepared:
        """BGR frames -> the model's input tensor (a new array unless `out` is given). Frames are checked and
        grayscale/BGRA ones converted; the batch is padded with zeros to a static batch size."""
        return prepare(self.normalizer, self.static_batch, frames, out)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """The backend call on a prepared tensor; returns the raw output (logits or class map)."""
        # Validate the first tensor of each shape; later ones come from the same normaliser.
        check = tensor.shape != self._checked_shape
        outputs = self.backend.infer({self._in.name: tensor}, check=check)
        self._checked_shape = tensor.shape
        return outputs[self._out.name]

    def postprocess(self, raw: np.ndarray, prepared: Prepared, *, confidence: bool | None = None
                    ) -> list[SegmentationResult]:
        """Raw model output -> one SegmentationResult per frame (padding slots dropped)."""
        want_conf = self.confidence if confidence is None else confidence
        results = []
        for i, g in enumerate(prepared.geometries):
            if not self.graph_class_map:
                scores = raw[i]
                model_map = argmax_classes(scores)
                conf = map_to_frame(softmax_confidence(scores), g, nearest=False) if want_conf else None
            else:
                model_map = raw[i, 0] if raw.ndim == 4 else raw[i]
                if model_map.dtype != np.uint8 and self.spec.num_classes <= 256:
                    model_map = model_map.astype(np.uint8)
                if want_conf:
                    raise InputError(
                        "confidence needs logits, but " + (
                            "the argmax was fused into the graph at load time; load with confidence=True"
                            if self.fused_argmax else "this model's graph ends in ArgMax (output_kind class_map); "
                            "export it without --argmax to get confidences"))
                conf = None
            results.append(SegmentationResult(map_to_frame(model_map, g), model_map, g, conf))
        return results

    # ---- all stages ----------------------------------------------------------------------------------------

    def segment(self, frame: np.ndarray, *, confidence: bool | None = None) -> SegmentationResult:
        """Segment one BGR uint8 frame (H, W, 3); grayscale and BGRA frames are converted."""
        return self._segment_chunk([frame], confidence)[0]

    def segment_batch(self, frames: Sequence[np.ndarray], *, confidence: bool | None = None
                      ) -> list[SegmentationResult]:
        """Segment frames (of any sizes) in batches; see the module docstring for how batches are chunked."""
        if len(frames) == 0:
            return []
        step = self.max_batch or len(frames)
        results: list[SegmentationResult] = []
        for start in range(0, len(frames), step):
            results.extend(self._segment_chunk(list(frames[start:start + step]), confidence))
        return results

    def _segment_chunk(self, frames: list[np.ndarray], confidence: bool | None) -> list[SegmentationResult]:
        shape = self.normalizer.tensor_shape(max(len(frames), self.static_batch or 0))
        if self._buffer is None or self._buffer.shape != shape:
            self._buffer = np.empty(shape, np.float32)
        prepared = self.preprocess(frames, out=self._buffer)
        t0 = time.perf_counter()
        raw = self.run(prepared.tensor)
        t1 = time.perf_counter()
        results = self.postprocess(raw, prepared, confidence=confidence)
        t2 = time.perf_counter()
        n = len(frames)
        for r in results:
            r.timings = StageTimes(prepared.ms / n, (t1 - t0) * 1e3 / n, (t2 - t1) * 1e3 / n)
            r.batch_size = n
        return results

    # ---- drawing -------------------------------------------------------------------------------------------

    def render(self, frame: np.ndarray, result: SegmentationResult, options: RenderOptions | None = None
               ) -> np.ndarray:
        """Draw `result` on `frame` with the Segmenter's render options (or `options`); adds the time to
        `result.timings.render`."""
        start = time.perf_counter()
        renderer = self.renderer if options is None else self.renderer_for(options)
        image = renderer.render(as_bgr(frame), result.class_map)
        result.timings.render = (time.perf_counter() - start) * 1e3
        return image

    def renderer_for(self, options: RenderOptions) -> Renderer:
        """A renderer (lookup tables, legend) for `options`, built once and kept."""
        if options == self.renderer.options:
            return self.renderer
        if options not in self._renderers:
            if len(self._renderers) >= 16:
                self._renderers.clear()
            self._renderers[options] = Renderer(self.spec.class_names, self.spec.colours(), options)
        return self._renderers[options]

    # ---- description and resources ------------------------------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def describe(self) -> str:
        s = self.spec
        batch = f"static batch {self.static_batch}" if self.static_batch else "dynamic batch"
        return (f"{s.model_name}: {s.num_classes} classes, input {s.input_size[0]}x{s.input_size[1]} "
                f"{s.input_layout.value} {s.channel_order.value} ({s.resize.value}), {batch}, output "
                f"{s.output_kind.value}, backend {self.backend.description}")

    def close(self) -> None:
        self.backend.close()
        self._buffer = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Segmenter {self.describe()}>"
