"""Give any ONNX file an edgepix spec: show the one it carries (or what the runtime would assume for a model
exported elsewhere), change fields, and write a copy with the validated spec in its metadata.

    edgepix spec model.onnx                                   # the embedded spec, or the assumed one
    edgepix spec model.onnx --from-hf segformer-folder/ --set classes=road,car --out described.onnx

Only metadata changes: the graph and the weights are copied byte for byte (description.onnxedit), so nothing that was
verified about the graph can change. Fields that only the graph can say (input and output names, the input's
layout, dynamic axes, precision) come from it and cannot be set. The output's layout and kind are read from the
graph where it can tell (description.foreign) and can be set where it cannot (`output_layout=NHWC`,
`output_kind=binary_logit`); every value set is checked like any spec field and then against the graph
(description.outputs.check_output: the classes against the output's channels, the layout against its shape, a fixed
input size against the input's shape), so a spec that cannot be right for the graph is refused in one line.
Needs neither torch nor the `onnx` package.

A .tflite keeps its spec beside it instead, in NAME.spec.json (the ModelSpec's JSON):

    edgepix spec model.tflite --set classes=background,person --out model.spec.json

Without one, its TFLite metadata (class names, normalisation; description.tflite) and its tensors' shapes give the
spec the runtime would assume, as for an ONNX file without a spec.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SpecError
from ..core.formats import ONNX_SUFFIXES, TFLITE_SUFFIXES
from .foreign import ForeignModelWarning, infer_spec
from .spec import ONNX_METADATA_KEY, ModelSpec, Task
from .tensors import TensorMeta

log = logging.getLogger(__name__)

# Fields `--set` may change, with the spec field each one sets (`classes` is the spec's `class_names`).
SETTABLE = {"classes": "class_names", "model_name": "model_name", "ignore_index": "ignore_index", "scale": "scale",
            "mean": "mean", "std": "std", "channel_order": "channel_order", "resize": "resize",
            "pad_value": "pad_value", "input_size": "input_size", "size_divisor": "size_divisor",
            "output_stride": "output_stride", "output_range": "output_range", "output_layout": "output_layout",
            "output_kind": "output_kind", "threshold": "threshold", "upsample": "upsample"}
_LISTS = {"class_names", "mean", "std", "input_size", "output_range"}
_NUMBERS = {"ignore_index", "scale", "pad_value", "size_divisor", "output_stride", "threshold"}


@dataclass(frozen=True)
class SpecReading:
    spec: ModelSpec
    embedded: bool  # False: inferred from the graph's shapes (a model exported elsewhere)


def read_spec(path: str | os.PathLike, *, task: Task | str = Task.SEGMENTATION,
              given: dict[str, Any] | None = None, preferred_size: tuple[int, int] | None = None) -> SpecReading:
    """The spec a model carries, or the one inferred from its graph for `task`, with `given` fields applied and
    checked against the graph. `preferred_size` (an image processor's size) stands in for a dynamic input size
    that `given` does not fix; a fixed-size graph keeps its own."""
    from .outputs import check_output
    from .spec import apply_overrides

    path = Path(path)
    embedded, inputs, outputs, stated = _stored(path, Task(task))
    given = dict(given or {})
    if embedded is None:
        given = {**stated, **given}  # what the model's own metadata says, under what the caller gives
        classes = given.pop("class_names", None)
        with warnings.catch_warnings():  # this command reports what it assumed itself
            warnings.simplefilter("ignore", ForeignModelWarning)
            size = given.pop("input_size", None)
            if size is None and preferred_size is not None and _dynamic_size(inputs):
                size = preferred_size
            spec = infer_spec(path, inputs, outputs, task=task, classes=classes, input_size=size, **given)
        if spec.task is Task.SEGMENTATION and spec.dynamic_size and "output_stride" not in given and \
                path.suffix.lower() in ONNX_SUFFIXES:
            spec = spec.replace(output_stride=_measured_stride(path, spec))
        return SpecReading(spec, embedded=False)
    overrides = {("classes" if k == "class_names" else k): v for k, v in given.items()}
    spec = apply_overrides(embedded, {k: v for k, v in overrides.items() if k in ("classes", "input_size")})
    rest = {k: v for k, v in given.items() if k not in ("class_names", "input_size")}
    spec = spec.replace(**rest) if rest else spec
    out = next((t for t in outputs if t.name == spec.output_name), None)
    if out is not None:
        check_output(spec, out, source=path.name)
    return SpecReading(spec, embedded=True)


def _stored(path: Path, task: Task) -> tuple[ModelSpec | None, list[TensorMeta], list[TensorMeta], dict[str, Any]]:
    """(the spec the model carries or None, its inputs, its outputs, spec fields its own metadata states). An ONNX
    file carries its spec in its metadata; a .tflite in NAME.spec.json beside it or embedded in it, and its TFLite
    metadata may state class names and normalisation (description.tflite)."""
    if path.suffix.lower() in TFLITE_SUFFIXES:
        from .tflite import read_tflite, spec_defaults, stored_spec

        model = read_tflite(path)
        return (stored_spec(path, model), [t.meta for t in model.inputs], [t.meta for t in model.outputs],
                spec_defaults(model, task))
    from .onnxproto import read_onnx_header
    from .tensors import tensor_meta

    header = read_onnx_header(path)
    return (ModelSpec.from_onnx_metadata(header.metadata, source=str(path)),
            [tensor_meta(v, path) for v in header.inputs], [tensor_meta(v, path) for v in header.outputs], {})


def _measured_stride(path: Path, spec: ModelSpec) -> int:
    """A dynamic-size graph's output stride, from one run on zeros at the spec's size (1 without ONNX Runtime)."""
    import numpy as np

    try:
        import onnxruntime  # noqa: F401  (optional for this command)
    except ImportError:
        return spec.output_stride
    from .onnxinfo import open_session
    from .outputs import spatial_axes

    h, w = spec.input_size
    shape = (1, 3, h, w) if spec.input_layout.value == "NCHW" else (1, h, w, 3)
    out = open_session(path).run([spec.output_name], {spec.input_name: np.zeros(shape, np.float32)})[0]
    width_axis = -1 if out.ndim == 3 else spatial_axes(spec.output_layout)[1]
    return max(1, round(w / out.shape[width_axis]))


def _dynamic_size(inputs) -> bool:
    return len(inputs) == 1 and len(inputs[0].shape) == 4 and any(inputs[0].dim(i) is None for i in (1, 2, 3))


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> spec fields. Lists are comma-separated (`mean=0.5,0.5,0.5`, `classes=road,car`) or
    JSON (`classes=["a, b", "c"]`); `none` clears `ignore_index`."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set: expected KEY=VALUE, got {pair!r}")
        if key not in SETTABLE:
            raise SpecError(f"--set {key}: not a field that can be set (settable: {', '.join(SETTABLE)}; the "
                            "others describe the graph and come from it)")
        field = SETTABLE[key]
        fields[field] = _value(field, text.strip(), key)
    return fields


def _value(field: str, text: str, key: str) -> Any:
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"--set {key}: not a valid JSON list ({e.msg})") from None
    if field in _LISTS:
        items = [t.strip() for t in text.split(",")]
        if field == "class_names":
            return items
        return [_number(t, key) for t in items]
    if field in _NUMBERS:
        if field == "ignore_index" and text.lower() in ("none", "null"):
            return None
        return _number(text, key)
    return text


def _number(text: str, key: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"--set {key}: expected a number, got {text!r}") from None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def palette_from_file(path: str | os.PathLike) -> dict[str, Any]:
    """Spec fields from a palette file: a JSON list of [r, g, b], or an object with "palette" (and optionally
    "names", as in a dataset's classes.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SpecError(f"--palette {path}: not a readable JSON file ({str(e).splitlines()[0][:120]})") from e
    if isinstance(data, list):
        return {"palette": data}
    if isinstance(data, dict) and "palette" in data:
        fields = {"palette": data["palette"]}
        if "names" in data:
            fields["class_names"] = data["names"]
        return fields
    raise SpecError(f'--palette {path}: expected [[r, g, b], ...] or {{"palette": [...], "names": [...]}}')


def write_spec(src: str | os.PathLike, dst: str | os.PathLike, spec: ModelSpec) -> ModelSpec:
    """Copy `src` to `dst` with `spec` embedded, then read it back from `dst` to check what landed. For a .tflite,
    `dst` is the spec's JSON file (NAME.spec.json beside NAME.tflite is where the runtime looks)."""
    from .onnxedit import write_with_metadata

    if Path(src).suffix.lower() in TFLITE_SUFFIXES:
        return _write_sidecar(Path(src), Path(dst), spec)
    write_with_metadata(src, dst, {ONNX_METADATA_KEY: spec.to_json()})
    written = read_spec(dst).spec
    if written != spec:
        raise SpecError(f"{dst}: the spec read back differs from the one written")
    return written


def _write_sidecar(model: Path, dst: Path, spec: ModelSpec) -> ModelSpec:
    from .tflite import SIDECAR_SUFFIX, sidecar_path

    if not dst.name.endswith(".json"):
        raise SpecError(f"--out {dst}: the spec of a .tflite model is a JSON file beside it; give --out "
                        f"{sidecar_path(model)}")
    spec.save_json(dst)
    written = ModelSpec.load_json(dst)
    if written != spec:
        raise SpecError(f"{dst}: the spec read back differs from the one written")
    if dst.resolve() != sidecar_path(model).resolve():
        log.warning("%s is not where the runtime looks for the spec of %s (%s beside it, NAME%s)", dst, model.name,
                    sidecar_path(model).name, SIDECAR_SUFFIX)
    return written
