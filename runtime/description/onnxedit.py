"""One graph edit the runtime makes without the `onnx` package: end a segmentation graph in its uint8 class map.

A model exported with logits hands the runtime (N, C, H, W) floats: at 512x512 with 6 classes that is a 6 MB
output per frame, copied out of ONNX Runtime and then reduced by an argmax on the CPU. Appending
`ArgMax(axis=1, keepdims=0, select_last_index=0) -> Cast(to=uint8)` to the graph lets ONNX Runtime do the
reduction inside the session, with its threads, and return a 0.25 MB class map; ties go to the lowest index, as
in numpy and PyTorch. The result is the graph `edgepix export --argmax` writes, made at load time from the
plain export.

The class axis is where the output's layout puts it (`ArgMax(axis=3)` for NHWC scores), and a one-channel binary
output (a probability or a logit) ends in `Greater(output, threshold) -> Cast(uint8)` instead, the threshold a
Constant of the output's own type: `ClassMapFusion` says which (`fusion_for(spec)` reads it from a spec).

The edit works on the serialized ModelProto (field numbers from onnx/onnx.proto): the graph's fields are copied
as they are, the logits output is replaced by the class-map output, and two nodes are appended (a repeated field
may be continued anywhere in a message, and appended nodes stay in topological order). Nothing is decoded that
the edit does not touch, so the weights are copied as bytes.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..core.errors import InputError, ModelFormatError, SinkError
from .onnxproto import _fields, _fields_with_spans, _ParseError, _text, _value_info
from .outputs import decision_threshold
from .spec import BINARY_KINDS, SCORE_KINDS, Layout, ModelSpec

CLASS_MAP_SUFFIX = ".class_map"
_UINT8 = 2  # TensorProto.UINT8
_INT = 2  # AttributeProto.INT
_TENSOR = 4  # AttributeProto.TENSOR
# The float element types a threshold constant can take (TensorProto.DataType, struct format).
_FLOAT_TYPES = {"float32": (1, "<f"), "float16": (10, "<e"), "float64": (11, "<d")}


@dataclass(frozen=True)
class ClassMapFusion:
    """What `append_argmax` appends to the graph output `output`: ArgMax over `axis` (the class axis of the scores),
    or, with `threshold`, Greater(output, threshold) for a one-channel binary output (class 1 where the output is
    above the threshold, on the output's own scale: a probability or a logit); then Cast(uint8)."""

    output: str
    axis: int = 1
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output:
            raise InputError(f"ClassMapFusion.output: expected an output name, got {self.output!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or not 1 <= self.axis <= 3:
            raise InputError(f"ClassMapFusion.axis: expected the class axis 1..3 of a rank-4 output, got {self.axis!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise InputError(f"ClassMapFusion.threshold: expected a finite number or None, got {t!r}")

    def class_map_shape(self, shape: tuple) -> tuple:
        """The class map's shape for an output of `shape`: the class axis dropped by ArgMax, kept by a threshold."""
        if self.threshold is not None:
            return tuple(shape)
        return tuple(d for i, d in enumerate(shape) if i != self.axis)


def as_fusion(value: Any) -> ClassMapFusion | None:
    """`load_backend(fuse_argmax=...)`'s value as a ClassMapFusion: None, a logits output's name (ArgMax over axis 1,
    as before layouts were described) or a ClassMapFusion; InputError in one line for anything else."""
    if value is None or isinstance(value, ClassMapFusion):
        return value
    if isinstance(value, str) and value:
        return ClassMapFusion(value)
    raise InputError(f"fuse_argmax: expected None, an output name or a ClassMapFusion, got {value!r} "
                     f"({type(value).__name__}); Segmenter.load(fuse_argmax=False) is the on/off switch, "
                     "load_backend takes what to fuse")


def _required(value: Any) -> ClassMapFusion:
    fusion = as_fusion(value)
    if fusion is None:
        raise InputError("fuse_argmax: expected an output name or a ClassMapFusion to append, got None")
    return fusion


def fusion_for(spec: ModelSpec) -> ClassMapFusion | None:
    """The class-map ending that computes what the Segmenter computes at the model's size for this spec, or None
    when its output holds no scores to decide on."""
    if spec.output_kind not in SCORE_KINDS:
        return None
    if spec.output_kind in BINARY_KINDS:
        return ClassMapFusion(spec.output_name, axis=1, threshold=decision_threshold(spec))
    return ClassMapFusion(spec.output_name, axis=1 if spec.output_layout is Layout.NCHW else 3)


# ---- protobuf encoding ------------------------------------------------------------------------------------


def _enc_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _enc_varint(number << 3) + _enc_varint(value)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _enc_varint((number << 3) | 2) + _enc_varint(len(payload)) + payload


def _field_str(number: int, text: str) -> bytes:
    return _field_bytes(number, text.encode("utf-8"))


def _int_attribute(name: str, value: int) -> bytes:
    # AttributeProto: name = 1, i = 3, type = 20
    return _field_str(1, name) + _field_varint(3, value) + _field_varint(20, _INT)


def _node(op_type: str, inputs: list[str], outputs: list[str], name: str, attributes: list[bytes]) -> bytes:
    # NodeProto: input = 1, output = 2, name = 3, op_type = 4, attribute = 5
    body = b"".join(_field_str(1, i) for i in inputs) + b"".join(_field_str(2, o) for o in outputs)
    body += _field_str(3, name) + _field_str(4, op_type)
    body += b"".join(_field_bytes(5, a) for a in attributes)
    return body


def _tensor_value_info(name: str, elem_type: int, dims: tuple[int | str | None, ...]) -> bytes:
    # ValueInfoProto: name = 1, type = 2; TypeProto: tensor_type = 1; Tensor: elem_type = 1, shape = 2;
    # TensorShapeProto: dim = 1; Dimension: dim_value = 1, dim_param = 2
    shape = b""
    for d in dims:
        if isinstance(d, int) and d >= 0:
            dim = _field_varint(1, d)
        elif isinstance(d, str) and d:
            dim = _field_str(2, d)
        else:
            dim = b""
        shape += _field_bytes(1, dim)
    tensor = _field_varint(1, elem_type) + _field_bytes(2, shape)
    return _field_str(1, name) + _field_bytes(2, _field_bytes(1, tensor))


def _raw_fields(buf: memoryview):
    """Yield (field number, wire type, value, the field's complete encoded bytes)."""
    for number, wire, value, start, end in _fields_with_spans(buf):
        yield number, wire, value, buf[start:end]


# ---- the edit ---------------------------------------------------------------------------------------------


def append_argmax(model: bytes, fusion: str | ClassMapFusion) -> tuple[bytes, str]:
    """Return (model bytes whose scores output is replaced by its uint8 class map, the class map's output name).
    `fusion`: a ClassMapFusion, or the name of logits (N, C, H, W) to reduce over axis 1. The class map is
    (N, H, W) after an ArgMax, the output's own shape after a threshold. Raises ModelFormatError if the output is
    missing or not rank 4."""
    fusion = _required(fusion)
    logits_output = fusion.output
    buf = memoryview(model)
    class_map = logits_output + CLASS_MAP_SUFFIX
    parts: list[bytes | memoryview] = []  # joined once at the end: the weights are copied a single time
    found, seen_graph = None, False
    try:
        for number, wire, value, raw in _raw_fields(buf):
            if number != 7 or wire != 2:
                parts.append(raw)
                continue
            seen_graph = True
            graph: list[bytes | memoryview] = []
            for g_number, g_wire, g_value, g_raw in _raw_fields(value):
                if g_number == 12 and g_wire == 2:
                    info = _value_info(g_value)
                    if info.name == logits_output:
                        if len(info.shape) != 4:
                            raise ModelFormatError(f"output {logits_output!r} has shape {info.shape}; fusing the "
                                                   "argmax needs logits (N, C, H, W)")
                        found = info
                        continue  # replaced below
                graph.append(g_raw)
            if not found:
                raise ModelFormatError(f"the graph has no output {logits_output!r} to fuse an argmax into")
            graph.extend(_class_map_nodes(fusion, found, class_map))
            length = sum(len(g) for g in graph)
            parts.append(_enc_varint((7 << 3) | 2) + _enc_varint(length))
            parts.extend(graph)
    except _ParseError as e:
        raise ModelFormatError(f"not an ONNX model (protobuf parse failed: {e})") from None
    if not seen_graph:
        raise ModelFormatError("not an ONNX model (no graph)")
    return b"".join(parts), class_map


def _class_map_nodes(fusion: ClassMapFusion, info, class_map: str) -> list[bytes]:
    """The graph fields (nodes, the new output) that turn the output described by `info` into `class_map`."""
    scores = fusion.output
    if fusion.threshold is None:
        decided, dims = scores + ".argmax", fusion.class_map_shape(info.shape)
        nodes = [_node("ArgMax", [scores], [decided], "edgepix_argmax",
                       [_int_attribute("axis", fusion.axis), _int_attribute("keepdims", 0)])]
    else:
        if info.dtype not in _FLOAT_TYPES:
            raise ModelFormatError(f"output {scores!r} is {info.dtype}; a threshold needs a float output")
        elem_type, fmt = _FLOAT_TYPES[info.dtype]
        # TensorProto: data_type = 2, raw_data = 9 (a scalar: no dims); AttributeProto: name 1, t 5, type 20
        tensor = _field_varint(2, elem_type) + _field_bytes(9, struct.pack(fmt, fusion.threshold))
        value = _field_str(1, "value") + _field_bytes(5, tensor) + _field_varint(20, _TENSOR)
        threshold, decided, dims = scores + ".threshold", scores + ".above", info.shape
        nodes = [_node("Constant", [], [threshold], "edgepix_threshold", [value]),
                 _node("Greater", [scores, threshold], [decided], "edgepix_greater", [])]
    nodes.append(_node("Cast", [decided], [class_map], "edgepix_argmax_cast", [_int_attribute("to", _UINT8)]))
    return [_field_bytes(1, n) for n in nodes] + [_field_bytes(12, _tensor_value_info(class_map, _UINT8, dims))]


def append_argmax_file(path: str | os.PathLike, fusion: str | ClassMapFusion) -> tuple[bytes, str]:
    """`append_argmax` on a file, read through a memory map so that the only full copy made is the result."""
    fusion = _required(fusion)  # a bad value fails here, before the file is mapped
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    error = None
    try:
        return append_argmax(memoryview(mapped), fusion)  # type: ignore[arg-type]
    except ModelFormatError as e:
        error = str(e)  # the traceback holds views into the mapping: keep the message, let the views go
    finally:
        with contextlib.suppress(BufferError):
            mapped.close()
    raise ModelFormatError(f"{path}: {error}")


def set_metadata(model: bytes | memoryview, entries: dict[str, str]) -> bytes:
    """Model bytes whose metadata_props hold `entries` (replacing entries with those keys); the graph, the weights
    and every other field are copied byte for byte."""
    buf = memoryview(model)
    parts: list[bytes | memoryview] = []
    try:
        for number, wire, value, raw in _raw_fields(buf):
            if number == 14 and wire == 2:  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}
                key = next((_text(v, "a metadata key") for n, w, v in _fields(value) if n == 1 and w == 2), "")
                if key in entries:
                    continue
            parts.append(raw)
    except _ParseError as e:
        raise ModelFormatError(f"not an ONNX model (protobuf parse failed: {e})") from None
    for key, value in entries.items():
        parts.append(_field_bytes(14, _field_str(1, key) + _field_str(2, value)))
    return b"".join(parts)


def write_with_metadata(src: str | os.PathLike, dst: str | os.PathLike, entries: dict[str, str]) -> None:
    """Copy the ONNX file `src` to `dst` (atomically) with `entries` in its metadata_props."""
    from ..core.fileio import atomic_write_bytes

    with open(src, "rb") as f:
        data = f.read()
    try:
        atomic_write_bytes(dst, set_metadata(data, entries))  # on failure nothing is left at dst or beside it
    except OSError as e:  # a full disk, a folder gone read-only
        raise SinkError(f"cannot write {dst}: {e.strerror or e}") from None


def output_names(model: bytes) -> list[str]:
    """The graph's output names (for checks)."""
    names = []
    for number, wire, value in _fields(memoryview(model)):
        if number == 7 and wire == 2:
            for g_number, g_wire, g_value in _fields(value):
                if g_number == 12 and g_wire == 2:
                    names.append(_text(next(v for n, w, v in _fields(g_value) if n == 1)))
    return names
