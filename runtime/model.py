"""Opening a model for a task: a backend plus the ModelSpec that says how to feed it.

Shared by the Segmenter and the generators. The spec comes from the model (ONNX metadata, or an engine's
manifest through its backend); a model without one gets a spec inferred from its shapes (`foreign.infer_spec`).
Overrides (`classes`, `mean`, `std`, ...) replace spec fields in both cases.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .backends.base import Backend, TensorMeta
from .backends.registry import load_backend
from .errors import InputError, ModelFormatError, SpecError
from .foreign import infer_spec
from .spec import ModelSpec, Task

#: Spec fields a caller may override when loading (`classes` is the spec's `class_names`).
SPEC_OVERRIDES = ("classes", "mean", "std", "scale", "input_size", "channel_order", "resize", "pad_value",
                  "palette", "output_range")

_TASK_CLASS = {Task.SEGMENTATION: "Segmenter", Task.GENERATION_NOISE: "NoiseGenerator",
               Task.GENERATION_IMAGE: "ImageGenerator"}


def open_model(model: str | os.PathLike | Backend, backend: str, *, task: Task, overrides: dict[str, Any],
               backend_options: dict[str, Any]) -> tuple[Backend, ModelSpec]:
    """Load `model` (a path, or an already-loaded Backend) and return it with its spec for `task`."""
    if isinstance(model, Backend):
        if backend_options:
            raise InputError(f"backend options {sorted(backend_options)} cannot apply to an already-loaded backend")
        b = model
    else:
        b = load_backend(model, backend, **backend_options)
    try:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        spec = b.spec
        if spec is None:
            args = dict(overrides)
            spec = infer_spec(b.path, b.inputs, b.outputs, task=task, classes=args.pop("classes", None),
                              mean=args.pop("mean", None), std=args.pop("std", None),
                              input_size=args.pop("input_size", None), **args)
        else:
            if spec.task is not task:
                raise ModelFormatError(f"{b.path.name} is a {spec.task.value} model; load it with "
                                       f"{_TASK_CLASS[spec.task]}, not {_TASK_CLASS[task]}")
            spec = apply_overrides(spec, overrides)
        return b, spec
    except BaseException:
        if not isinstance(model, Backend):
            b.close()
        raise


def apply_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> ModelSpec:
    changes = dict(overrides)
    if "classes" in changes:
        classes = tuple(changes.pop("classes"))
        if spec.task is Task.SEGMENTATION and len(classes) != spec.num_classes:
            raise SpecError(f"classes: the model has {spec.num_classes} classes {list(spec.class_names)}, "
                            f"got {len(classes)} names")
        changes["class_names"] = classes
    if "input_size" in changes and tuple(changes["input_size"]) != tuple(spec.input_size) and not spec.dynamic_size:
        raise SpecError(f"input_size: the model was exported at a fixed {spec.input_size[0]}x{spec.input_size[1]}, "
                        f"got {tuple(changes['input_size'])}; re-export with a dynamic size to change it")
    if "input_size" in changes and spec.dynamic_size:
        h, w = changes["input_size"]
        if h % spec.size_divisor or w % spec.size_divisor:
            raise SpecError(f"input_size: expected multiples of {spec.size_divisor}, got {h}x{w}")
    return spec.replace(**changes) if changes else spec


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


def chunks(n: int, size: int | None) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in chunks of `size` (one chunk when size is None)."""
    step = n if not size else size
    for start in range(0, n, max(step, 1)):
        yield start, min(n, start + step)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Pad a batch along dim 0 to `size` by repeating its last sample (a static-batch model needs a full batch)."""
    if batch.shape[0] == size:
        return batch
    pad = np.repeat(batch[-1:], size - batch.shape[0], axis=0)
    return np.concatenate([batch, pad], axis=0)


def tile_count(n: int, cols: int | None) -> tuple[int, int]:
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    return cols, max(1, math.ceil(n / cols))


def as_class_names(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if classes is None else tuple(str(c) for c in classes)
