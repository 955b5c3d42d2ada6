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
- postprocess: the output read as the spec describes it (`output_layout`, `output_kind`: logits,
  probabilities, a one-channel binary probability or logit with its `threshold`, or a class map of any integer
  type; tasks.decode), letterbox border cropped away, and brought to the frame's size by the spec's `upsample`:
  `scores` resizes the scores bilinearly to the frame and decides there, `classes` decides at the model's size
  (argmax or threshold; inside the graph when the ONNX Runtime backend fused it at load time) and resizes the class
  map nearest. Optionally the confidence of the decided class (bilinear to the frame). On the first output the
  data is checked against the spec once (shape, and 0..1 for probabilities): a contradiction is logged as one
  warning.
- render: palette lookup + blend (`render()`), timed when called.

Batches: `segment_batch(frames)` runs frames of any sizes together. A model with a static batch dimension B gets
chunks of B frames (the last chunk is zero-padded to B, and the padding's outputs dropped); a model with a dynamic
batch gets chunks of `max_batch` frames (all at once by default). Timings of a batched call are the chunk's stage
times divided by its frame count.

A Segmenter reuses one input buffer across calls, so one instance must not be used from two threads at once; the
stream pipeline calls `preprocess` / `run` / `postprocess` from its stages, which use buffers of their own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..core.errors import InputError, ModelFormatError
from ..description.onnxedit import ClassMapFusion, fusion_for
from ..description.outputs import channel_axis, check_output, expected_channels, spatial_axes, whole_stride
from ..description.spec import Layout, ModelSpec, OutputKind, Task, Upsample
from ..description.tensors import TensorMeta
from .decode import OutputDecoder
from .imageops import Geometry, Normalizer, as_bgr, map_to_frame
from .model import input_meta, open_model, output_meta, split_overrides, static_batch
from .processor import Prepared, prepare
from .render import Renderer, RenderOptions
from .temporal import SCORE_MODES, TemporalState


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
    # (h, w) class indices at the model's output resolution, letterbox border included: an array, or a function
    # that computes it when first read (with `upsample` scores the frame's map does not need it)
    model_map_source: np.ndarray | Callable[[], np.ndarray] = field(repr=False)
    geometry: Geometry  # where the frame sat inside the model input
    confidence: np.ndarray | None = None  # (H, W) float32 probability of the decided class
    timings: StageTimes = field(default_factory=StageTimes)
    batch_size: int = 1  # frames that shared the inference call

    @property
    def model_map(self) -> np.ndarray:
        if callable(self.model_map_source):
            self.model_map_source = self.model_map_source()
        return self.model_map_source

    @property
    def shape(self) -> tuple[int, int]:
        return self.class_map.shape[:2]

    def class_fractions(self, num_classes: int) -> np.ndarray:
        """The share of the frame's pixels assigned to each class, float64 (num_classes,)."""
        counts = np.bincount(self.class_map.ravel(), minlength=num_classes)[:num_classes]
        return counts / max(1, self.class_map.size)


log = logging.getLogger("edgepix.runtime.segmenter")

# How far outside 0..1 a probability may be (float16 outputs, resizing inside the graph) before the first-output
# check calls it a contradiction, and how far from 1 per-class probabilities may sum.
PROBABILITY_TOLERANCE = 1e-2


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
        self.decoder = OutputDecoder(spec, graph_class_map=self.graph_class_map)
        self._first_output_checked = False
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

        `fuse_argmax`: for a model whose spec decides at the model's size (`upsample` classes) on scores (logits,
        probabilities, a binary probability or logit), backends that can (the ONNX Runtime ones) append the
        decision to the graph at load time (ArgMax over the class axis, or a threshold, then Cast(uint8):
        description.onnxedit), so it runs inside the session and a 1-byte-per-pixel class map comes out instead of
        C floats per pixel. Not done with `confidence=True`, or with `upsample` scores: both need the scores.
        `upsample` (like `threshold`, `output_layout`, `output_kind`) is a spec field and can be given here.
        """
        for name, value in (("fuse_argmax", fuse_argmax), ("confidence", confidence)):
            if not isinstance(value, bool):
                raise InputError(f"{name}: expected True or False, got {value!r:.80} ({type(value).__name__})")
        overrides, backend_options = split_overrides(dict(options))
        overrides.update(classes=classes, mean=mean, std=std)

        def fusable(spec: ModelSpec, outputs: Sequence[TensorMeta]) -> ClassMapFusion | None:
            if not (fuse_argmax and not confidence and spec.upsample is Upsample.CLASSES and spec.num_classes <= 255):
                return None
            scores = next((t for t in outputs if t.name == spec.output_name), None)
            if scores is None:
                return None
            # The fused graph will not show the scores again: the spec is checked against them here.
            check_output(spec, scores, source=Path(str(model)).name)
            return fusion_for(spec)

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
        if not self.fused_argmax:
            check_output(spec, out, source=name)
        elif len(out.shape) not in (3, 4):
            raise ModelFormatError(f"{name}: expected a class map (N, H, W), found {out.describe()}")

    # ---- stages --------------------------------------------------------------------------------------------

    def preprocess(self, frames: Sequence[np.ndarray], *, out: np.ndarray | None = None) -> Prepared:
        """BGR frames -> the model's input tensor (a new array unless `out` is given). Frames are checked and
        grayscale/BGRA ones converted; the batch is padded with zeros to a static batch size."""
        return prepare(self.normalizer, self.static_batch, frames, out)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends `run` calls (the FrameProcessor protocol)."""
        return (self.backend,)

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
        if want_conf and not self.decoder.has_scores:
            raise InputError(
                "confidence needs scores, but " + (
                    "the argmax was fused into the graph at load time; load with confidence=True"
                    if self.fused_argmax else "this model's graph ends in ArgMax (output_kind class_map); "
                    "export it without --argmax to get confidences"))
        if not self._first_output_checked:
            self._first_output_checked = True  # once per Segmenter, whichever worker gets there first
            problem = self.output_problem(raw)
            if problem is not None:
                log.warning("%s: %s", self.backend.path.name, problem)
        decoder, results = self.decoder, []
        for i, g in enumerate(prepared.geometries):
            sample = raw[i]
            conf = decoder.confidence(sample, g) if want_conf else None
            if decoder.scores_upsample:  # the frame's map is decided on the resized scores: the model's on demand
                model_map: np.ndarray | Callable[[], np.ndarray] = partial(decoder.model_map, sample)
                frame_map = decoder.frame_map(sample, g)
            else:
                model_map = decoder.model_map(sample)
                frame_map = map_to_frame(model_map, g)
            results.append(SegmentationResult(frame_map, model_map, g, conf))
        return results

    def stabilize(self, raw: np.ndarray, states: Sequence[tuple[TemporalState, np.ndarray]]) -> np.ndarray:
        """The raw output with each sample passed through its stream's temporal state (tasks.temporal), given
        as (state, frame) per sample: scores are smoothed (ema, flow), a class map is held (hysteresis). The
        pipeline calls this in frame order per stream, before `postprocess`."""
        decoder = self.decoder
        if not decoder.has_scores and any(s.options.mode in SCORE_MODES for s, _ in states):
            raise InputError(f"--temporal {states[0][0].options.mode.value} smooths scores, but "
                             + ("the argmax was fused into the graph at load time; load with fuse_argmax=False"
                                if self.fused_argmax else
                                "this model outputs a class map; use --temporal hysteresis, or export it without "
                                "--argmax"))
        samples = []
        for sample, (state, frame) in zip(raw, states):
            if decoder.has_scores:  # (C, h, w) float32 planes whatever the layout; back in the output's layout
                planes = sample.transpose(2, 0, 1) if decoder.nhwc else sample
                smoothed = state.update(np.ascontiguousarray(planes, dtype=np.float32), frame, kind=decoder.kind,
                                        threshold=decoder.threshold)
                samples.append(smoothed.transpose(1, 2, 0) if decoder.nhwc else smoothed)
            else:
                plane = sample if sample.ndim == 2 else (sample[..., 0] if decoder.nhwc else sample[0])
                samples.append(state.update(plane, frame).reshape(sample.shape))
        samples += list(raw[len(samples):])  # padding slots of a static batch: as they came
        return samples[0][None] if len(samples) == 1 else np.stack(samples)

    def model_map(self, raw: np.ndarray, i: int) -> np.ndarray:
        """Sample `i` of a raw output as a class map at the model's output size (the decision taken there)."""
        return self.decoder.model_map(raw[i])

    def output_problem(self, raw: np.ndarray) -> str | None:
        """What in a raw output contradicts the spec (one line), or None: its shape against the spec's layout,
        channels and stride, and the values (probabilities within 0..1 and, per class, summing to 1; class
        indices below the number of classes). Logits that happen to look like probabilities are fine."""
        spec, kind = self.spec, self.decoder.kind
        h, w = self.input_size
        if kind is OutputKind.CLASS_MAP:
            top = int(raw.max()) if raw.size else 0
            if top >= spec.num_classes and top != spec.ignore_index:
                return (f"the class map holds class {top}, the spec lists {spec.num_classes} classes "
                        f"({', '.join(spec.class_names[:4])}{', ...' if spec.num_classes > 4 else ''}); check classes=")
            return None
        layout = spec.output_layout
        if raw.ndim != 4:
            return f"expected a rank-4 output in {layout.value}, got shape {raw.shape}"
        c = raw.shape[channel_axis(layout)]
        if c != expected_channels(spec):
            return (f"the output {raw.shape} has {c} channels read as {layout.value}, the spec expects "
                    f"{expected_channels(spec)} ({spec.output_kind.value}); check output_layout and classes=")
        a, b = spatial_axes(layout)
        if not whole_stride((h, w), (raw.shape[a], raw.shape[b])):
            return (f"the output {raw.shape} read as {layout.value} is a {raw.shape[a]}x{raw.shape[b]} map, not the "
                    f"{h}x{w} input divided by a whole stride; check output_layout")
        if kind in (OutputKind.PROBABILITIES, OutputKind.BINARY_PROBABILITY):
            lo, hi = float(raw.min()), float(raw.max())
            if lo < -PROBABILITY_TOLERANCE or hi > 1 + PROBABILITY_TOLERANCE:
                scores = "binary_logit" if kind is OutputKind.BINARY_PROBABILITY else "logits"
                return (f"output_kind {kind.value} says 0..1, the output holds {lo:.3g}..{hi:.3g}; if the graph ends "
                        f"without a sigmoid/softmax, set output_kind={scores}")
            if kind is OutputKind.PROBABILITIES:
                sums = raw.sum(axis=channel_axis(layout), dtype=np.float32)
                worst = float(np.abs(sums - 1).max())
                if worst > PROBABILITY_TOLERANCE:
                    return (f"output_kind probabilities says each pixel's classes sum to 1, they are off by up to "
                            f"{worst:.3g}; set output_kind=logits if the graph ends without a softmax")
        return None

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
        threshold = f" > {s.threshold:g}" if s.output_kind in (OutputKind.BINARY_PROBABILITY,
                                                               OutputKind.BINARY_LOGIT) else ""
        upsample = "scores" if self.decoder.scores_upsample else "classes"
        return (f"{s.model_name}: {s.num_classes} classes, input {s.input_size[0]}x{s.input_size[1]} "
                f"{s.input_layout.value} {s.channel_order.value} ({s.resize.value}), {batch}, output "
                f"{s.output_kind.value}{threshold} {s.output_layout.value}, upsampling {upsample}, backend "
                f"{self.backend.description}")

    def close(self) -> None:
        self.backend.close()
        self._buffer = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Segmenter {self.describe()}>"
