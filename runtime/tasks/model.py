"""Opening a model for a task: a backend plus the ModelSpec that says how to feed it.

Shared by the Segmenter and the generators. The spec comes from the model (ONNX metadata, an engine's manifest
through its backend, a .tflite's NAME.spec.json or embedded spec); a model without one gets a spec inferred from its
shapes (`foreign.infer_spec`; for a .tflite, with what its TFLite metadata states).
Overrides (`classes`, `mean`, `std`, ...) replace spec fields in both cases.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..backends.profile import preferred_sibling
from ..backends.registry import ONNX_SUFFIXES, load_backend
from ..core.cpuinfo import warn_if_int8_is_slow_here
from ..core.errors import InputError, ModelFormatError
from ..core.formats import TFLITE_SUFFIXES
from ..description.foreign import infer_spec
from ..description.onnxproto import read_onnx_header
from ..description.spec import ModelSpec, Precision, Task, apply_overrides
from ..description.tensors import TensorMeta, tensor_meta
from ..description.tflite import read_tflite, spec_defaults
from ..description.tflite import stored_spec as tflite_spec

#: Spec fields a caller may override when loading (`classes` is the spec's `class_names`).
SPEC_OVERRIDES = ("classes", "mean", "std", "scale", "input_size", "channel_order", "resize", "pad_value",
                  "palette", "output_range", "output_layout", "output_kind", "threshold", "upsample")

#: the backends that compute on the CPU, where whether INT8 pays off depends on the CPU's instruction sets
CPU_BACKENDS = frozenset({"ort-cpu", "openvino", "opencv", "litert"})

log = logging.getLogger(__name__)

_TASK_CLASS = {Task.SEGMENTATION: "Segmenter", Task.GENERATION_NOISE: "NoiseGenerator",
               Task.GENERATION_IMAGE: "ImageGenerator"}


def open_model(model: str | os.PathLike | Backend, backend: str, *, task: Task, overrides: dict[str, Any],
               backend_options: dict[str, Any],
               fuse_argmax: Callable[[ModelSpec, Sequence[TensorMeta]], str | None] | None = None
               ) -> tuple[Backend, ModelSpec]:
    """Load `model` (a path, or an already-loaded Backend) and return it with its spec for `task`.

    For an ONNX file the spec is read from the file's header first (description.onnxproto, a few milliseconds), so
    a wrong task or a bad override fails before any session is built, and `fuse_argmax(spec, outputs)` can check
    the graph's outputs and name a logits output for the backend to end in an in-graph argmax.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not isinstance(model, (str, os.PathLike, Backend)):
        raise InputError(f"model: expected a model file's path or a loaded Backend, got {model!r:.60} "
                         f"({type(model).__name__})")
    if isinstance(model, Backend):
        if backend_options:
            raise InputError(f"backend options {sorted(backend_options)} cannot apply to an already-loaded backend")
        return model, _spec_for(model.path, model.spec, model.inputs, model.outputs, task, overrides)
    path = Path(model)
    if backend == "auto" and path.suffix.lower() in ONNX_SUFFIXES:
        measured = preferred_sibling(path, threads=backend_options.get("threads"))
        if measured is not None:  # `edgepix tune` found the file exported beside it faster here (a .tflite)
            log.info("backend auto: %s on %s, measured faster than %s on this machine (edgepix tune)", measured[1],
                     measured[0].name, path.name)
            path, backend = measured
    if path.suffix.lower() in ONNX_SUFFIXES:
        header = read_onnx_header(path)
        outputs = [tensor_meta(v, path) for v in header.outputs]
        spec = _spec_for(path, ModelSpec.from_onnx_metadata(header.metadata, source=str(path)),
                         [tensor_meta(v, path) for v in header.inputs], outputs, task, overrides)
        fuse = fuse_argmax(spec, outputs) if fuse_argmax is not None else None
        b = load_backend(path, backend, fuse_argmax=fuse, **backend_options)
        if spec.precision is Precision.INT8 and b.name in CPU_BACKENDS:
            warn_if_int8_is_slow_here()  # one line per process: INT8 may be no faster, or slower, than FP32 here
        return b, spec
    if path.suffix.lower() in TFLITE_SUFFIXES:  # read from the flatbuffer first, as for ONNX
        tfl = read_tflite(path)
        stored = tflite_spec(path, tfl)
        if stored is None:  # what the TFLite metadata and graph state, under what the caller gives
            stated = spec_defaults(tfl, task)
            if "class_names" in stated:
                stated["classes"] = stated.pop("class_names")
            overrides = {**stated, **overrides}
        spec = _spec_for(path, stored, [t.meta for t in tfl.inputs], [t.meta for t in tfl.outputs], task, overrides)
        return load_backend(path, backend, **backend_options), spec
    b = load_backend(path, backend, **backend_options)
    try:
        return b, _spec_for(path, b.spec, b.inputs, b.outputs, task, overrides)
    except BaseException:
        b.close()
        raise


def stored_spec(path: str | os.PathLike) -> ModelSpec | None:
    """The spec a model file carries (ONNX metadata, a .tflite's spec file or embedded spec, or the manifest beside
    an engine), read without loading the model; None when it has none."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"model file not found: {path}")
    if path.suffix.lower() in ONNX_SUFFIXES:
        return ModelSpec.from_onnx(path)
    if path.suffix.lower() in TFLITE_SUFFIXES:
        return tflite_spec(path)
    manifest = path.with_name(path.name + ".json")
    return ModelSpec.load_json(manifest) if manifest.exists() else None


def _spec_for(path: Path, spec: ModelSpec | None, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta],
              task: Task, overrides: dict[str, Any]) -> ModelSpec:
    if spec is None:
        args = dict(overrides)
        return infer_spec(path, inputs, outputs, task=task, classes=args.pop("classes", None),
                          mean=args.pop("mean", None), std=args.pop("std", None),
                          input_size=args.pop("input_size", None), **args)
    if spec.task is not task:
        raise ModelFormatError(f"{path.name} is a {spec.task.value} model; load it with "
                               f"{_TASK_CLASS[spec.task]}, not {_TASK_CLASS[task]}")
    return apply_overrides(spec, overrides)


def split_overrides(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec overrides, backend options) from the keyword arguments of a `load()`."""
    spec = {k: kwargs.pop(k) for k in list(kwargs) if k in SPEC_OVERRIDES}
    return spec, kwargs


def input_meta(b: Backend, spec: ModelSpec) -> TensorMeta:
    """The backend input the spec names (or the only input)."""
    names = [t.name for t in b.inputs]
    if spec.input_name in names:
        return b.input(spec.input_name)
    if len(names) == 1:
        return b.inputs[0]
    raise ModelFormatError(f"{b.path.name}: the spec names input {spec.input_name!r}, the model has {names}")


def output_meta(b: Backend, spec: ModelSpec) -> TensorMeta:
    for t in b.outputs:
        if t.name == spec.output_name:
            return t
    return b.outputs[0]


def static_batch(meta: TensorMeta) -> int | None:
    """The fixed batch size of an input, or None when the batch dimension is dynamic."""
    return meta.dim(0)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Pad a batch along dim 0 to `size` by repeating its last sample (a static-batch model needs a full batch)."""
    if batch.shape[0] == size:
        return batch
    pad = np.repeat(batch[-1:], size - batch.shape[0], axis=0)
    return np.concatenate([batch, pad], axis=0)


def tile_count(n: int, cols: int | None) -> tuple[int, int]:
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))
