"""Read an ONNX file's header (inputs, outputs, metadata, opsets) with nothing but the Python standard library.

The runtime ships without the `onnx` package, and a device that runs models through OpenCV alone has no ONNX
Runtime either, yet every backend needs the input names and shapes and the edgepix spec stored in the metadata.
ONNX files are Protocol Buffers; this module walks the few messages it needs (ModelProto, GraphProto,
ValueInfoProto, TypeProto, TensorShapeProto, StringStringEntryProto, OperatorSetIdProto) and skips everything
else by its length prefix, so the weights are never decoded: a 50 MB model is read in milliseconds.

Field numbers are those of onnx/onnx.proto (IR version 3 and later).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelFormatError

# ONNX TensorProto.DataType -> numpy dtype name.
ONNX_ELEM_TYPES: dict[int, str] = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "str", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


@dataclass(frozen=True)
class ValueInfo:
    name: str
    dtype: str | None  # numpy dtype name, None for non-tensor values
    shape: tuple[int | str | None, ...]  # ints for fixed dims, dim_param names or None for dynamic ones


@dataclass(frozen=True)
class OnnxHeader:
    path: Path
    ir_version: int
    opsets: dict[str, int]  # domain ('' is the default ONNX domain) -> version
    producer: str
    graph_name: str
    inputs: tuple[ValueInfo, ...]  # graph inputs that are not initializers
    outputs: tuple[ValueInfo, ...]
    metadata: dict[str, str]


class _ParseError(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _ParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _ParseError("varint longer than 10 bytes")


def _fields_with_spans(buf: memoryview):
    """Yield (field number, wire type, value, start, end): value is an int (varint/fixed) or a memoryview
    (length-delimited), and buf[start:end] is the field's complete encoding (tag included)."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _ParseError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise _ParseError("truncated fixed64")
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _ParseError(f"field {number} runs past the end of its message")
            value = buf[pos:pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise _ParseError("truncated fixed32")
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise _ParseError(f"unsupported wire type {wire}")
        yield number, wire, value, start, pos


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) for each field of a message."""
    for number, wire, value, _, _ in _fields_with_spans(buf):
        yield number, wire, value


def _text(value, what: str = "a string field") -> str:
    if not isinstance(value, memoryview):
        raise _ParseError(f"expected {what} as a string field")
    try:
        # Strict: protobuf strings are UTF-8, so anything else is damage, and replacing it would only move the
        # failure to ONNX Runtime, which raises UnicodeDecodeError when it hands the same name to Python.
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _ParseError(f"{what} is not valid UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start})") from None


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _value_info(buf: memoryview) -> ValueInfo:
    name, dtype, shape = "", None, ()
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            name = _text(value, "a tensor name")
        elif number == 2 and wire == 2:  # TypeProto
            for t_number, t_wire, t_value in _fields(value):
                if t_number == 1 and t_wire == 2:  # TypeProto.Tensor
                    dtype, shape = _tensor_type(t_value)
    return ValueInfo(name, dtype, shape)


def _tensor_type(buf: memoryview) -> tuple[str | None, tuple[int | str | None, ...]]:
    dtype, dims = None, []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = ONNX_ELEM_TYPES.get(value, f"onnx-type-{value}")
        elif number == 2 and wire == 2:  # TensorShapeProto
            for d_number, d_wire, d_value in _fields(value):
                if d_number == 1 and d_wire == 2:  # Dimension
                    dim: int | str | None = None
                    for x_number, x_wire, x_value in _fields(d_value):
                        if x_number == 1 and x_wire == 0:
                            dim = _signed64(x_value)
                        elif x_number == 2 and x_wire == 2:
                            dim = _text(x_value, "a dimension name") or None
                    dims.append(dim)
    return dtype, tuple(dims)


def _initializer_name(buf: memoryview) -> str:
    for number, wire, value in _fields(buf):
        if number == 8 and wire == 2:  # TensorProto.name
            return _text(value, "an initializer name")
    return ""


def parse_onnx_header(data: bytes | memoryview, *, path: Path = Path("<bytes>")) -> OnnxHeader:
    buf = memoryview(data)
    ir_version, producer, graph_name = 0, "", ""
    opsets: dict[str, int] = {}
    metadata: dict[str, str] = {}
    inputs: list[ValueInfo] = []
    outputs: list[ValueInfo] = []
    initializers: set[str] = set()
    seen_graph = False
    try:
        for number, wire, value in _fields(buf):
            if number == 1 and wire == 0:
                ir_version = value
            elif number == 2 and wire == 2:
                producer = _text(value, "the producer name")
            elif number == 7 and wire == 2:
                seen_graph = True
                for g_number, g_wire, g_value in _fields(value):
                    if g_wire != 2:
                        continue
                    if g_number == 2:
                        graph_name = _text(g_value, "the graph name")
                    elif g_number == 5:
                        initializers.add(_initializer_name(g_value))
                    elif g_number == 11:
                        inputs.append(_value_info(g_value))
                    elif g_number == 12:
                        outputs.append(_value_info(g_value))
            elif number == 8 and wire == 2:
                domain, version = "", 0
                for o_number, o_wire, o_value in _fields(value):
                    if o_number == 1 and o_wire == 2:
                        domain = _text(o_value, "an opset domain")
                    elif o_number == 2 and o_wire == 0:
                        version = o_value
                opsets[domain] = version
            elif number == 14 and wire == 2:
                key = val = ""
                for m_number, m_wire, m_value in _fields(value):
                    if m_number == 1 and m_wire == 2:
                        key = _text(m_value, "a metadata key")
                    elif m_number == 2 and m_wire == 2:
                        val = _text(m_value, f"the value of metadata key {key[:40]!r}")
                metadata[key] = val
    except _ParseError as e:
        raise ModelFormatError(f"{path} is not an ONNX model (protobuf parse failed: {e}); if it should be one, the "
                               "file is damaged: copy or export it again") from None
    if not seen_graph or ir_version <= 0 or not outputs:
        found = "no graph" if not seen_graph else ("no IR version" if ir_version <= 0 else "a graph without outputs")
        raise ModelFormatError(f"{path} is not an ONNX model (expected a ModelProto with a graph, found {found})")
    return OnnxHeader(
        path=path,
        ir_version=ir_version,
        opsets=opsets,
        producer=producer,
        graph_name=graph_name,
        inputs=tuple(v for v in inputs if v.name not in initializers),
        outputs=tuple(outputs),
        metadata=metadata,
    )


def check_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFormatError(f"expected a model file, got a folder: {path}")
    return path


def read_onnx_header(path: str | os.PathLike) -> OnnxHeader:
    """Inputs, outputs, opsets and metadata of an ONNX file, without onnx or onnxruntime. ModelFormatError if
    the file is missing or is not an ONNX model."""
    path = check_model_path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ModelFormatError(f"{path} is not an ONNX model (the file is empty)")
            # Mapped, not read: only the pages holding the fields parsed here are touched, the weights are not.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFormatError(f"cannot read model file {path}: {e.strerror or e}") from e
    error = None
    try:
        return parse_onnx_header(memoryview(mapped), path=path)
    except ModelFormatError as e:
        error = str(e)  # the traceback holds views into the mapping: keep the message, let the views go
    finally:
        with contextlib.suppress(BufferError):  # a view still alive: the mapping closes when it is freed
            mapped.close()
    raise ModelFormatError(error)


# Ops that move, reshape or resize values without changing what they mean: the activation before them is the
# output's (a sigmoid then a transpose to NHWC still outputs probabilities; bilinear resizing keeps them in 0..1).
_PASS_THROUGH_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Resize",
                               "Upsample"})


def output_activation(path: str | os.PathLike, output: str) -> str | None:
    """The op that last changed the values of the graph output `output`, looking back through ops that only move
    them (Transpose, Reshape, Resize, ...): e.g. 'Sigmoid', 'Softmax', 'Conv'; None when no node produces it.
    Reads the graph's nodes only (the weights are skipped by their length prefix, as in `read_onnx_header`)."""
    path = check_model_path(path)
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read model file {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        producers = _producers(memoryview(mapped), path)
    finally:
        with contextlib.suppress(BufferError):
            mapped.close()
    name, seen = output, set()
    while name in producers and name not in seen:
        seen.add(name)
        op_type, first_input = producers[name]
        if op_type not in _PASS_THROUGH_OPS or not first_input:
            return op_type
        name = first_input
    return None


def _producers(buf: memoryview, path: Path) -> dict[str, tuple[str, str]]:
    """{a node's output name: (its op type, its first input)} for the main graph's nodes."""
    producers: dict[str, tuple[str, str]] = {}
    try:
        for number, wire, value in _fields(buf):
            if number != 7 or wire != 2:
                continue
            for g_number, g_wire, g_value in _fields(value):
                if g_number != 1 or g_wire != 2:  # GraphProto.node
                    continue
                inputs, outputs, op_type = [], [], ""
                for n_number, n_wire, n_value in _fields(g_value):  # NodeProto: input 1, output 2, op_type 4
                    if n_wire != 2:
                        continue
                    if n_number == 1:
                        inputs.append(_text(n_value, "a node input"))
                    elif n_number == 2:
                        outputs.append(_text(n_value, "a node output"))
                    elif n_number == 4:
                        op_type = _text(n_value, "an op type")
                for out in outputs:
                    producers[out] = (op_type, inputs[0] if inputs else "")
    except _ParseError as e:
        raise ModelFormatError(f"{path} is not an ONNX model (protobuf parse failed: {e}); copy or export it "
                               "again") from None
    return producers
