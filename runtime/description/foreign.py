"""Specs for foreign models: ONNX files exported by other tools, without an edgepix spec in their metadata.

What the input and output shapes allow is inferred: an image input (NCHW, or NHWC when the last dim is 3) of
float32/float16, its size when fixed (512x512, or `input_size`, when dynamic), and from the output either a
segmentation output or a generated image (N, 3, H, W). A segmentation output is read as it is
(description.outputs): its layout is the one whose reading is a map of the input with a possible channel count (a
(1, 256, 256, 1) output is NHWC with one channel), and its kind comes from the graph: integers are a class map (the
number of classes must then be given), one float channel after a Sigmoid is a binary probability (a binary logit
without one), several channels after a Softmax are probabilities (logits without one). The rest gets the common
defaults: RGB, ImageNet mean/std (segmentation) or [-1, 1] (generators, the pix2pix/DCGAN convention), stretch
resize, the Pascal VOC palette, background/foreground for a binary output. Every default can be overridden, a spec
that cannot be right for the graph is refused (description.outputs.check_output), and the model is reported once
per file with a ForeignModelWarning saying what was assumed.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import ModelFormatError
from ..core.formats import ONNX_SUFFIXES
from .onnxproto import output_activation
from .outputs import channel_axis, check_output, infer_output_layout, spatial_axes, whole_stride
from .spec import Layout, ModelSpec, OutputKind, Task, coerce_field, default_palette
from .tensors import TensorMeta

DEFAULT_FOREIGN_SIZE = (512, 512)
_warned: set[str] = set()


class ForeignModelWarning(UserWarning):
    """A model without an edgepix spec is being run with inferred settings."""


def _warn_once(path: Path, text: str) -> None:
    key = str(path.resolve()) if path.exists() else str(path)
    if key in _warned:
        return
    _warned.add(key)
    # Point the warning at the first caller outside edgepix.runtime (the user's load() call).
    here, level, frame = os.path.dirname(os.path.abspath(__file__)), 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(text, ForeignModelWarning, stacklevel=level + 1)


def _image_input(inputs: Sequence[TensorMeta], source: str) -> tuple[TensorMeta, str]:
    if len(inputs) != 1:
        raise ModelFormatError(f"{source}: expected one image input, found {len(inputs)} "
                               f"({', '.join(t.describe() for t in inputs)})")
    t = inputs[0]
    if len(t.shape) != 4 or t.dtype.kind != "f":
        raise ModelFormatError(f"{source}: expected a float image input of rank 4 (N, 3, H, W), found {t.describe()}")
    c1, c3 = t.dim(1), t.dim(3)
    if c1 == 3 or (c1 is None and c3 != 3):
        return t, "NCHW"
    if c3 == 3:
        return t, "NHWC"
    raise ModelFormatError(f"{source}: expected 3 colour channels in dim 1 (NCHW) or dim 3 (NHWC), "
                           f"found {t.describe()}")


def _input_size(t: TensorMeta, layout: str, input_size: tuple[int, int] | None, source: str) -> tuple[
        tuple[int, int], bool]:
    h, w = (t.dim(2), t.dim(3)) if layout == "NCHW" else (t.dim(1), t.dim(2))
    if h is not None and w is not None:
        if input_size is not None and tuple(input_size) != (h, w):
            raise ModelFormatError(f"{source}: input_size {tuple(input_size)} does not match the model's fixed input "
                                   f"size {(h, w)}")
        return (h, w), False
    return (tuple(input_size) if input_size is not None else DEFAULT_FOREIGN_SIZE), True  # type: ignore[return-value]


def infer_spec(path: Path, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta], *, task: Task | str,
               classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, input_size: tuple[int, int] | None = None,
               **overrides: Any) -> ModelSpec:
    """A ModelSpec for a model without one, from its input and output shapes and the overrides given."""
    task = Task(task)
    source = path.name
    if not outputs:
        raise ModelFormatError(f"{source}: the model has no outputs")
    fields: dict[str, Any] = dict(task=task, model_name=path.stem or "model", input_layout="NCHW")
    assumed: list[str] = []  # what was not in the model or the overrides, for the warning
    if task is Task.GENERATION_NOISE:
        fields.update(_latent_input_fields(inputs, outputs[0], source))
    else:
        fields.update(_image_input_fields(inputs, input_size, source, assumed))
    out = outputs[0]
    fields["output_name"] = out.name
    if task is Task.SEGMENTATION:
        fields.update(_segmentation_output_fields(path, out, classes, fields, overrides, assumed))
        if mean is None or std is None:
            assumed.append("ImageNet mean/std on RGB 0..1 (pass mean=, std=)")
    else:
        fields.update(_generated_output_fields(out, overrides.get("output_range", (-1.0, 1.0)), source, assumed))
        if task is Task.GENERATION_IMAGE:
            fields.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
            if mean is None or std is None:
                assumed.append("input scaled to [-1, 1] (mean 0.5, std 0.5; pass mean=, std=)")
    if mean is not None:
        fields["mean"] = tuple(mean)
    if std is not None:
        fields["std"] = tuple(std)
    fields.update(overrides)
    spec = ModelSpec(**fields)
    check_output(spec, out, source=source)
    _warn_once(path, f"{source} has no edgepix spec; running it as {task.value} with inferred settings: "
               + ", ".join([f"input {spec.input_name} {spec.input_layout.value} {spec.channel_order.value}",
                            *assumed]))
    return spec


def _latent_input_fields(inputs: Sequence[TensorMeta], out: TensorMeta, source: str) -> dict[str, Any]:
    """A noise generator's latent input (N, L) or (N, L, 1, 1); the size it draws comes from its output."""
    t = inputs[0] if len(inputs) == 1 else None
    if t is None or t.dtype.kind != "f" or len(t.shape) not in (2, 4) or t.dim(1) is None:
        raise ModelFormatError(f"{source}: expected one float latent input (N, L) or (N, L, 1, 1), found "
                               f"{', '.join(x.describe() for x in inputs) or 'no inputs'}")
    return dict(latent_size=t.dim(1), input_name=t.name, dynamic_batch=t.dim(0) is None,
                input_size=(out.dim(2) or 64, out.dim(3) or 64) if len(out.shape) == 4 else (64, 64))


def _image_input_fields(inputs: Sequence[TensorMeta], input_size: tuple[int, int] | None, source: str,
                        assumed: list[str]) -> dict[str, Any]:
    """An image input: its layout, its size (fixed, or `input_size` / the default when dynamic) and dynamic dims."""
    t, layout = _image_input(inputs, source)
    size, dynamic_size = _input_size(t, layout, input_size, source)
    if dynamic_size and input_size is None:
        assumed.append(f"input {size[0]}x{size[1]} (the model's size is dynamic; pass input_size=(H, W))")
    return dict(input_name=t.name, input_layout=layout, input_size=size, dynamic_size=dynamic_size,
                dynamic_batch=t.dim(0) is None)


def _segmentation_output_fields(path: Path, out: TensorMeta, classes: Sequence[str] | None, image: dict[str, Any],
                                overrides: dict[str, Any], assumed: list[str]) -> dict[str, Any]:
    """The output as it is: its layout and kind (`output_layout`, `output_kind` when given in `overrides`, which
    keeps them, else read from the graph), class names, palette and stride."""
    source = path.name
    layout, kind = overrides.pop("output_layout", None), overrides.pop("output_kind", None)
    layout = coerce_field("output_layout", layout) if layout is not None else None
    kind = coerce_field("output_kind", kind) if kind is not None else None
    if out.dtype.kind in "iu" and len(out.shape) in (3, 4) and kind in (None, OutputKind.CLASS_MAP):
        kind = OutputKind.CLASS_MAP
        if layout is None:  # (N, H, W, 1) is a class map with its channel last
            layout = Layout.NHWC if len(out.shape) == 4 and out.dim(3) == 1 and out.dim(1) != 1 else Layout.NCHW
        if classes is None:
            raise ModelFormatError(f"{source}: the output {out.describe()} is a class map, so the number of "
                                   "classes cannot be read from it; pass classes=[...names...]")
    elif out.dtype.kind == "f" and len(out.shape) == 4:
        layout = layout or _output_layout(out, classes, kind, image)
        activation = output_activation(path, out.name) if _onnx_file(path) else None
        channels = out.dim(channel_axis(layout))
        if kind is None:
            kind = _score_kind(channels, activation)
            after = f"after {activation}" if activation else "from its shape"
            assumed.append(f"output {layout.value} {kind.value} ({after}; pass output_kind=, output_layout=)")
        classes = _score_classes(out, layout, kind, classes, source, assumed)
    else:
        what = "a classifier's scores" if len(out.shape) == 2 else "not a segmentation output"
        raise ModelFormatError(f"{source}: expected a segmentation output (N, C, H, W), (N, H, W, C) or a class map "
                               f"(N, H, W), found {out.describe()} ({what})")
    fields: dict[str, Any] = dict(output_kind=kind, output_layout=layout, class_names=tuple(classes),
                                  palette=default_palette(len(classes)))
    if len(classes) > 255 and "ignore_index" not in overrides:
        fields["ignore_index"] = None  # 255 is a class here: no label is left to mean "ignore"
    if not image["dynamic_size"]:
        a, b = spatial_axes(layout) if len(out.shape) == 4 else (1, 2)
        stride = whole_stride(image["input_size"], (out.dim(a), out.dim(b)))
        if stride:
            fields["output_stride"] = stride  # logits at 1/4 of the input (SegFormer): 4
    return fields


def _onnx_file(path: Path) -> bool:
    return path.suffix.lower() in ONNX_SUFFIXES and path.is_file()


def _output_layout(out: TensorMeta, classes: Sequence[str] | None, kind: OutputKind | None,
                   image: dict[str, Any]) -> Layout:
    """The layout whose reading of a float output fits the input and the channels the classes or kind allow."""
    channels: tuple[int, ...] | None = None
    if kind in (OutputKind.BINARY_PROBABILITY, OutputKind.BINARY_LOGIT):
        channels = (1,)
    elif classes is not None:
        n = len(classes)
        channels = (n, 1) if n == 2 and kind is None else (n,)
    return infer_output_layout(out, input_layout=Layout(image["input_layout"]), input_hw=image["input_size"],
                               fixed_input=not image["dynamic_size"], channels=channels)


def _score_kind(channels: int | None, activation: str | None) -> OutputKind:
    """One channel: a binary probability after a Sigmoid, else a binary logit; several: probabilities after a
    Softmax, else logits."""
    if channels == 1:
        return OutputKind.BINARY_PROBABILITY if activation == "Sigmoid" else OutputKind.BINARY_LOGIT
    return OutputKind.PROBABILITIES if activation == "Softmax" else OutputKind.LOGITS


def _score_classes(out: TensorMeta, layout: Layout, kind: OutputKind, classes: Sequence[str] | None, source: str,
                   assumed: list[str]) -> Sequence[str]:
    """Class names for a float output: a binary kind has background and one foreground class; otherwise one name
    per channel (`_logits_classes`)."""
    if kind in (OutputKind.BINARY_PROBABILITY, OutputKind.BINARY_LOGIT):
        if classes is None:
            assumed.append("classes background, foreground (pass classes=background,NAME)")
            return ["background", "foreground"]
        if len(classes) != 2:
            raise ModelFormatError(f"{source}: a one-channel {kind.value} output has 2 classes (background and the "
                                   f"foreground), got {len(classes)} names; pass classes=background,NAME")
        return classes
    return _logits_classes(out, channel_axis(layout), classes, source, assumed)


def _logits_classes(out: TensorMeta, axis: int, classes: Sequence[str] | None, source: str,
                    assumed: list[str]) -> Sequence[str]:
    """The class names for scores with C channels on `axis`: those given (which must number C), else
    class0..class{C-1}."""
    n = out.dim(axis)
    if classes is not None:
        return classes  # a count that does not match is refused by check_output, which says what would fit
    if n is None:
        raise ModelFormatError(f"{source}: the class dimension of {out.describe()} is dynamic; "
                               "pass classes=[...names...]")
    if n < 2:
        raise ModelFormatError(f"{source}: expected scores with at least 2 classes in dim {axis}, "
                               f"found {out.describe()}")
    assumed.append(f"{n} classes named class0..class{n - 1} (pass classes=[...])")
    return [f"class{i}" for i in range(n)]


def _generated_output_fields(out: TensorMeta, output_range: tuple[float, float], source: str,
                             assumed: list[str]) -> dict[str, Any]:
    """A generated image (N, 3, H, W), or (N, H, W, 3) as TFLite models have it: uint8 (0..255), else float in
    `output_range` ([-1, 1] unless overridden)."""
    if len(out.shape) != 4 or (out.dim(1) not in (3, None) and out.dim(3) != 3):
        raise ModelFormatError(f"{source}: expected a generated image (N, 3, H, W) or (N, H, W, 3), found "
                               f"{out.describe()}")
    if out.dtype == np.uint8:
        return dict(output_kind=OutputKind.IMAGE_UINT8, output_range=(0.0, 255.0))
    assumed.append(f"output range {list(output_range)} (pass output_range=)")
    return dict(output_kind=OutputKind.IMAGE, output_range=output_range)
