"""ModelSpec: everything the runtime needs to feed a model and read its output, carried with the model.

A spec travels inside checkpoints (`ckpt["spec"]`), inside ONNX files (`metadata_props["edgepix.spec"]`) and in a
JSON manifest beside a TensorRT engine, so the runtime never needs a config file next to a model.
The JSON form is strict: unknown keys, missing keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import boundedjson
from ..core.errors import ModelFormatError, SinkError, SpecError
from ..core.fileio import atomic_write_text

SPEC_FORMAT_VERSION = 2
ONNX_METADATA_KEY = "edgepix.spec"
# Version 1 specs (in ONNX files, engine manifests and sidecars written before version 2) still load: the keys they
# may lack get these values, which are what the runtime did with every version 1 spec (NCHW logits, the class
# decided at the model's size and resized nearest). `output_stride` was added while version 1 was current.
VERSION_1_DEFAULTS: dict[str, Any] = {"output_stride": 1, "output_layout": "NCHW", "threshold": 0.5,
                                      "upsample": "classes"}
READABLE_VERSIONS = (1, SPEC_FORMAT_VERSION)


class Task(str, enum.Enum):
    SEGMENTATION = "segmentation"
    GENERATION_NOISE = "generation-noise"
    GENERATION_IMAGE = "generation-image"


class Layout(str, enum.Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class ChannelOrder(str, enum.Enum):
    RGB = "RGB"
    BGR = "BGR"


class ResizeMode(str, enum.Enum):
    STRETCH = "stretch"
    LETTERBOX = "letterbox"


class OutputKind(str, enum.Enum):
    LOGITS = "logits"  # float scores, C channels (N, C, H, W) or (N, H, W, C); the runtime takes the argmax
    PROBABILITIES = "probabilities"  # per-class probabilities (softmax applied), C channels; argmax
    BINARY_PROBABILITY = "binary_probability"  # one channel, sigmoid applied: the foreground class's probability
    BINARY_LOGIT = "binary_logit"  # one channel, no sigmoid: the foreground class's logit
    CLASS_MAP = "class_map"  # the graph ends in ArgMax (+ Cast): integers (N, H, W), (N, 1, H, W) or (N, H, W, 1)
    IMAGE = "image"  # float image (N, 3, H, W) in output_range
    IMAGE_UINT8 = "image_uint8"  # the graph ends in scale + Cast: uint8 (N, 3, H, W)


#: what a segmentation model may output; the binary kinds have one channel and two classes (background implied as 0)
SEGMENTATION_KINDS = (OutputKind.LOGITS, OutputKind.PROBABILITIES, OutputKind.BINARY_PROBABILITY,
                      OutputKind.BINARY_LOGIT, OutputKind.CLASS_MAP)
BINARY_KINDS = (OutputKind.BINARY_PROBABILITY, OutputKind.BINARY_LOGIT)
#: kinds whose output holds scores per class (or the foreground's), which the runtime can resize before deciding
SCORE_KINDS = (OutputKind.LOGITS, OutputKind.PROBABILITIES, OutputKind.BINARY_PROBABILITY, OutputKind.BINARY_LOGIT)


class Upsample(str, enum.Enum):
    """How a segmentation output at the model's size becomes a class map at the frame's size."""

    SCORES = "scores"  # resize the scores (probabilities, logits) bilinearly to the frame, then decide
    CLASSES = "classes"  # decide at the model's size, resize the class map nearest


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map (RGB): distinct, stable colours for any number of classes."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


@dataclass(frozen=True)
class ModelSpec:
    """How to feed a model and how to read its output. Immutable; build variants with `replace()`."""

    task: Task
    model_name: str
    input_size: tuple[int, int]  # (H, W) the model was exported or trained at
    input_name: str = "images"
    output_name: str = "output"
    input_layout: Layout = Layout.NCHW
    dynamic_batch: bool = False
    dynamic_size: bool = False
    size_divisor: int = 32  # with dynamic_size, H and W must be multiples of this
    output_stride: int = 1  # input pixels per output pixel (SegFormer's logits come out at 1/4: 4)
    channel_order: ChannelOrder = ChannelOrder.RGB
    scale: float = 1.0 / 255.0  # applied to uint8 pixels before mean/std
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: ResizeMode = ResizeMode.STRETCH
    pad_value: int = 114  # letterbox border, in uint8 pixel units
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()  # RGB, one per class
    ignore_index: int | None = 255
    latent_size: int | None = None
    output_range: tuple[float, float] | None = None
    output_kind: OutputKind = OutputKind.LOGITS
    output_layout: Layout = Layout.NCHW  # where a segmentation output's channels are: (N, C, H, W) or (N, H, W, C)
    threshold: float = 0.5  # binary kinds: foreground where its probability > threshold (a logit > log(t / (1 - t)))
    upsample: Upsample = Upsample.SCORES  # how the output reaches the frame's size (docs/runtime.md measures both)
    precision: Precision = Precision.FP32
    quantization: str | None = None  # how an INT8 graph was made, e.g. "QDQ U8S8 per-channel minmax"
    format_version: int = SPEC_FORMAT_VERSION

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        self._validate()

    # ---- validation --------------------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.format_version != SPEC_FORMAT_VERSION:  # version 1 JSON is upgraded by from_dict
            raise SpecError(
                f"format_version: this edgepix reads spec versions {', '.join(map(str, READABLE_VERSIONS))}, "
                f"got {self.format_version!r}; upgrade edgepix or re-export the model"
            )
        if not self.model_name:
            raise SpecError("model_name: must be a non-empty string, got ''")
        h, w = self.input_size
        if h <= 0 or w <= 0:
            raise SpecError(f"input_size: both sides must be positive, got {self.input_size!r}")
        self._validate_numbers()
        for i, colour in enumerate(self.palette):
            if any(not 0 <= c <= 255 for c in colour):
                raise SpecError(f"palette[{i}]: colour values must be in 0..255, got {colour!r}")
        if self.task is Task.SEGMENTATION:
            if len(self.class_names) < 2:
                raise SpecError(f"class_names: a segmentation model needs at least 2 classes, got {self.class_names!r}")
            if len(set(self.class_names)) != len(self.class_names):
                raise SpecError(f"class_names: names must be unique, got {self.class_names!r}")
            if self.palette and len(self.palette) != len(self.class_names):
                raise SpecError(
                    f"palette: needs one colour per class ({len(self.class_names)}), got {len(self.palette)}"
                )
            self._validate_segmentation_output()
        else:
            if self.output_kind not in (OutputKind.IMAGE, OutputKind.IMAGE_UINT8):
                raise SpecError(f"output_kind: a generator outputs image or image_uint8, got "
                                f"{self.output_kind.value!r}")
            if self.output_range is None:
                raise SpecError("output_range: a generator must state its output range, e.g. [-1, 1], got None")
            lo, hi = self.output_range
            if not hi - lo >= MIN_OUTPUT_SPAN:
                raise SpecError(f"output_range: expected low < high, at least {MIN_OUTPUT_SPAN:g} apart, got "
                                f"{list(self.output_range)!r}")
        if self.task is Task.GENERATION_NOISE and self.latent_size is None:
            raise SpecError(f"latent_size: a noise generator needs a latent size in 1..{MAX_LATENT}, got None")

    def _validate_segmentation_output(self) -> None:
        """What a segmentation spec says about its output, checked without the graph (description.outputs checks
        the spec against a graph's output)."""
        if self.output_kind not in SEGMENTATION_KINDS:
            raise SpecError(f"output_kind: a segmentation model outputs one of "
                            f"{', '.join(k.value for k in SEGMENTATION_KINDS)}, got {self.output_kind.value!r}")
        if self.output_kind in BINARY_KINDS and len(self.class_names) != 2:
            raise SpecError(f"class_names: a {self.output_kind.value} output (one channel) has exactly 2 classes, "
                            f"background and the foreground, got {len(self.class_names)} "
                            f"{_show(list(self.class_names))}; set classes=background,NAME")
        if not 0.0 < self.threshold < 1.0:
            raise SpecError(f"threshold: expected a probability strictly between 0 and 1, got {_show(self.threshold)}")
        if self.ignore_index is not None and 0 <= self.ignore_index < len(self.class_names):
            raise SpecError(
                f"ignore_index: must not be a class index (0..{len(self.class_names) - 1}), got "
                f"{self.ignore_index!r}"
            )
        if self.ignore_index is not None and self.ignore_index < 0:
            # Label masks hold 0, 1, 2, ...: a negative index ignores nothing, and a 256-class model's uint8 class
            # map with "ignore -1" is one whose every value is a class (the NHWC output read as NCHW case).
            raise SpecError(f"ignore_index: label masks never hold negative values, got {self.ignore_index!r}; "
                            f"set ignore_index=none, or a label value >= {len(self.class_names)}")

    def _validate_numbers(self) -> None:
        """Every number the runtime computes with lies in a range no real model leaves (the ranges and why are at
        their constants below): a mistyped or crafted value (2**63, 1e-320, 1e308) is refused here, on every path
        a spec arrives by (--set, ONNX metadata, a sidecar, an engine manifest, a checkpoint), instead of turning
        every pixel into one class."""
        _within("size_divisor", self.size_divisor, 1, MAX_SIDE)
        _within("output_stride", self.output_stride, 1, MAX_SIDE)
        _within("scale", self.scale, *SCALE_RANGE)
        span = 255.0 * self.scale  # the scaled pixel range is [0, span]
        why = f" for scale {self.scale:g}, whose pixels span 0..{span:g}"
        for i, m in enumerate(self.mean):
            _within(f"mean[{i}]", m, MEAN_SPANS[0] * span, MEAN_SPANS[1] * span, why)
        for i, s in enumerate(self.std):
            _within(f"std[{i}]", s, STD_SPANS[0] * span, STD_SPANS[1] * span, why)
        _within("pad_value", self.pad_value, 0, 255)
        if self.output_range is not None:
            for i, v in enumerate(self.output_range):
                _within(f"output_range[{i}]", v, -FLOAT16_MAX, FLOAT16_MAX)
        if self.latent_size is not None:
            _within("latent_size", self.latent_size, 1, MAX_LATENT)

    # ---- convenience -----------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def colours(self) -> tuple[tuple[int, int, int], ...]:
        """The palette, or the default palette when the spec has none."""
        return self.palette or default_palette(max(self.num_classes, 1))

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    # ---- JSON ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a JSON object, got {type(data).__name__}")
        # A dict from a checkpoint may have keys of any type (sorting them would raise TypeError).
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise SpecError(f"spec: keys must be strings, found the key {_show(odd[0])}; re-export the model")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            key = unknown[0] if len(unknown[0]) <= 60 and unknown[0].isprintable() else _show(unknown[0])
            raise SpecError(f"{key}: unknown key in spec (valid keys: {', '.join(names)})")
        if data.get("format_version") == 1:  # an older file: what it lacks is what version 1 meant
            data = {**VERSION_1_DEFAULTS, **data, "format_version": SPEC_FORMAT_VERSION}
        missing = [n for n in names if n not in data]
        if missing:
            raise SpecError(f"{missing[0]}: missing from spec (every key is required in the JSON form)")
        try:
            return cls(**data)
        except TypeError as e:  # the constructor's own complaint, e.g. wrong arguments
            raise SpecError(f"spec: {e}") from e

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        # Bounded: the text may come from a corrupted or crafted model file (see runtime.core.boundedjson).
        return cls.from_dict(boundedjson.loads(text, what="spec", error=SpecError, hint=_DAMAGED_HINT))

    # ---- files -----------------------------------------------------------------------------------------

    def save_json(self, path: str | os.PathLike) -> None:
        try:
            atomic_write_text(path, self.to_json(indent=2) + "\n")  # on failure nothing is left at path
        except OSError as e:  # a full disk, a read-only folder, a folder at that path
            raise SinkError(f"cannot write spec file {path}: {e.strerror or e}") from None

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> ModelSpec:
        path = Path(path)
        try:
            text = path.read_bytes()  # decoded by _json_object: a file that is not UTF-8 is a SpecError
        except OSError as e:
            raise ModelFormatError(f"cannot read spec file {path}: {e.strerror or e}") from e
        data = _json_object(text, path)
        # A TensorRT manifest wraps the spec with build facts; a plain sidecar is the spec itself.
        return cls.from_dict(data["spec"] if "spec" in data and isinstance(data["spec"], dict) else data)

    @classmethod
    def from_onnx_metadata(cls, metadata: dict[str, str], *, source: str = "model") -> ModelSpec | None:
        """The spec stored in an ONNX model's custom metadata, or None if the model has none."""
        text = metadata.get(ONNX_METADATA_KEY)
        if text is None:
            return None
        try:
            return cls.from_json(text)
        except SpecError as e:
            raise SpecError(f"{source}: embedded spec is invalid: {e}") from e

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> ModelSpec | None:
        """Read the spec from an ONNX file's metadata with the header reader (no `onnx`, no session)."""
        from .onnxproto import read_onnx_header

        return cls.from_onnx_metadata(read_onnx_header(path).metadata, source=str(path))


_DAMAGED_HINT = "re-export the model, or copy it again if the copy was damaged"


def _json_object(text: str | bytes, path: Path) -> dict[str, Any]:
    data = boundedjson.loads(text, what=str(path), error=SpecError, hint=_DAMAGED_HINT)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- field coercion ----------------------------------------------------------------------------------
# JSON gives lists and strings; Python callers may give tuples and enums. Both become the declared types, and
# anything else is rejected with the field's name.

_ENUMS = {
    "task": Task,
    "input_layout": Layout,
    "channel_order": ChannelOrder,
    "resize": ResizeMode,
    "output_kind": OutputKind,
    "output_layout": Layout,
    "upsample": Upsample,
    "precision": Precision,
}
_INTS = {"size_divisor", "output_stride", "pad_value", "format_version"}
_OPTIONAL_INTS = {"ignore_index", "latent_size"}
_BOOLS = {"dynamic_batch", "dynamic_size"}
_STRS = {"model_name", "input_name", "output_name"}
# Bounds on what a spec may hold: far above any real model, low enough that a crafted spec stays small.
MAX_TEXT_CHARS = 1024  # a name, a class name, the quantization note
MAX_CLASSES = 10_000
MAX_SIDE = 1 << 16  # input_size sides, size_divisor, output_stride (TensorRT's largest dimension is about this too)
# Pixels are uint8 (0..255) times the scale. Real models use 1/255, 2/255, 1/127.5 or 1; six orders of magnitude
# either way is no normalisation any network was trained with (at 1e-6 the whole pixel range shrinks to 2.6e-4).
SCALE_RANGE = (1e-6, 1e6)
# mean and std are in scaled-pixel units, so their ranges are multiples of the scaled pixel span (255 x scale).
# A mean is an average of scaled pixels and lies within [0, span]; one span of margin on each side.
MEAN_SPANS = (-1.0, 2.0)
# A std of scaled pixels is at most span / 2; real ones are 0.2..1 span (ImageNet's 0.229 at scale 1/255, 0.5 for
# inputs in [-1, 1], 1 for "no std"). At 1e-4 span one pixel step becomes 39 normalised units (every activation
# saturates); at 1e4 span the whole pixel range becomes 1e-4 wide (a constant input).
STD_SPANS = (1e-4, 1e4)
# A generator's output range: an FP16 export cannot output beyond float16's largest finite value, and a range
# narrower than float16's step near 1 (2^-10 ~ 1e-3) cannot hold two distinct output levels.
FLOAT16_MAX = 65504.0
MIN_OUTPUT_SPAN = 1e-3
MAX_LATENT = 1 << 16  # DCGAN's latent is 100 floats, StyleGAN's 512: 65536 is beyond any generator


def _coerce(name: str, value: Any) -> Any:
    if name in _ENUMS:
        enum_type = _ENUMS[name]
        try:
            if not isinstance(value, str):  # only names: Enum's lookup would hash and repr anything
                raise ValueError(value)
            return enum_type(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in enum_type)
            raise SpecError(f"{name}: expected one of {valid}, got {_show(value)}") from None
    if name in _BOOLS:
        if not isinstance(value, bool):
            raise SpecError(f"{name}: expected true or false, got {_show(value)}")
        return value
    if name in _INTS or (name in _OPTIONAL_INTS and value is not None):
        return _int(name, value)
    if name in _OPTIONAL_INTS:
        return None
    if name in _STRS:
        return _text(name, value)
    if name == "quantization":
        return None if value is None else _text(name, value)
    if name in ("scale", "threshold"):
        return _float(name, value)
    if name == "input_size":
        return tuple(_int(f"{name}[{i}]", v, high=MAX_SIDE) for i, v in enumerate(_sequence(name, value, 2)))
    if name in ("mean", "std"):
        return tuple(_float(f"{name}[{i}]", v) for i, v in enumerate(_sequence(name, value, 3)))
    if name == "output_range":
        if value is None:
            return None
        return tuple(_float(f"{name}[{i}]", v) for i, v in enumerate(_sequence(name, value, 2)))
    if name == "class_names":
        items = _sequence(name, value, None, max_length=MAX_CLASSES)
        for i, v in enumerate(items):
            if not isinstance(v, str) or not v:
                raise SpecError(f"{name}[{i}]: expected a non-empty string, got {_show(v)}")
            _text(f"{name}[{i}]", v)
        return tuple(items)
    if name == "palette":
        return tuple(
            tuple(_int(f"{name}[{i}][{j}]", c) for j, c in enumerate(_sequence(f"{name}[{i}]", colour, 3)))
            for i, colour in enumerate(_sequence(name, value, None, max_length=MAX_CLASSES))
        )
    raise AssertionError(f"ModelSpec field {name!r} has no coercion rule")


def coerce_field(name: str, value: Any) -> Any:
    """`value` as the spec's field `name` holds it (an enum from its name, a tuple from a list, ...); SpecError
    naming the field when it cannot be one."""
    return _coerce(name, value)


def _sequence(name: str, value: Any, length: int | None, *, max_length: int | None = None) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{name}: expected a list, got {_show(value)}")
    if length is not None and len(value) != length:
        raise SpecError(f"{name}: expected {length} values, got {len(value)} ({_show(list(value))})")
    if max_length is not None and len(value) > max_length:
        raise SpecError(f"{name}: expected at most {max_length} values, got {len(value)}")
    return list(value)


def _int(name: str, value: Any, *, low: int = -(2**31), high: int = 2**31 - 1) -> int:
    # bool is an int subclass in Python; a spec that says `true` for a size is wrong, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise SpecError(f"{name}: expected an integer, got {_show(value)}")
        value = int(value)
    # Bounded so that a crafted value cannot reach sizes, allocations or error messages as a huge integer.
    if not low <= value <= high:
        raise SpecError(f"{name}: expected an integer in {low}..{high}, got {_show(value)}")
    return value


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{name}: expected a number, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range
        raise SpecError(f"{name}: expected a finite number, got {_show(value)}") from None
    if not math.isfinite(value):
        raise SpecError(f"{name}: expected a finite number, got {value!r}")
    return value


def _within(name: str, value: float, low: float, high: float, why: str = "") -> None:
    if not low <= value <= high:
        kind = "an integer" if isinstance(value, int) else "a number"
        shown = f"{low}..{high}" if isinstance(value, int) else f"[{low:g}, {high:g}]"
        raise SpecError(f"{name}: expected {kind} in {shown}{why}, got {_show(value)}")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{name}: expected a string, got {_show(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise SpecError(f"{name}: expected at most {MAX_TEXT_CHARS} characters, got {len(value)}")
    try:
        value.encode("utf-8")  # an unpaired surrogate (possible in a checkpoint's str) cannot be printed or saved
    except UnicodeEncodeError:
        raise SpecError(f"{name}: expected valid Unicode text, got {_show(value)}") from None
    return value


class _ShortRepr(reprlib.Repr):
    """reprlib's abbreviations, except for huge integers, whose repr() itself raises ValueError (> 4300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) >= 10**self.maxlong:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = 60


def _show(value: Any) -> str:
    """A value for an error message: one short line whatever a crafted spec holds (huge numbers, strings or
    nesting)."""
    return _SHORT.repr(value)


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
