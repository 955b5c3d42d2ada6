"""One graph edit the runtime makes without the `onnx` package: end a segmentation graph in ArgMax + Cast(uint8).

A model exported with logits hands the runtime (N, C, H, W) floats: at 512x512 with 6 classes that is a 6 MB
output per frame, copied out of ONNX Runtime and then reduced by an argmax on the CPU. Appending
`ArgMax(axis=1, keepdims=0, select_last_index=0) -> Cast(to=uint8)` to the graph lets ONNX Runtime do the
reduction inside the session, with its threads, and return a 0.25 MB class map; ties go to the lowest index, as
in numpy and PyTorch. The result is the graph `edgepix export --argmax` writes, made at load time from the
plain export.

The edit works on the serialized ModelProto (field numbers from onnx/onnx.proto): the graph's fields are copied
as they are, the logits output is replaced by the class-map output, and two nodes are appended (a repeated field
may be continued anywhere in a message, and appended nodes stay in topological order). Nothing is decoded that
the edit does not touch, so the weights are copied as bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from ..core.errors import ModelFormatError
from .onnxproto import _fields, _fields_with_spans, _ParseError, _text, _value_info

CLASS_MAP_SUFFIX = ".class_map"
_UINT8 = 2  # TensorProto.UINT8
_INT = 2  # AttributeProto.INT


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


def append_argmax(model: bytes, logits_output: str) -> tuple[bytes, str]:
    """Return (model bytes whose output `logits_output` (N, C, H, W) is replaced by its uint8 class map (N, H, W),
    the class map's output name). Raises ModelFormatError if the output is missing or not rank 4."""
    buf = memoryview(model)
    class_map = logits_output + CLASS_MAP_SUFFIX
    parts: list[bytes | memoryview] = []  # joined once at the end: the weights are copied a single time
    found = seen_graph = False
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
                        found = True
                        dims = (info.shape[0], info.shape[2], info.shape[3])
                        continue  # replaced below
                graph.append(g_raw)
            if not found:
                raise ModelFormatError(f"the graph has no output {logits_output!r} to fuse an argmax into")
            argmax_out = logits_output + ".argmax"
            graph.append(_field_bytes(1, _node("ArgMax", [logits_output], [argmax_out], "edgepix_argmax",
                                               [_int_attribute("axis", 1), _int_attribute("keepdims", 0)])))
            graph.append(_field_bytes(1, _node("Cast", [argmax_out], [class_map], "edgepix_argmax_cast",
                                               [_int_attribute("to", _UINT8)])))
            graph.append(_field_bytes(12, _tensor_value_info(class_map, _UINT8, dims)))
            length = sum(len(g) for g in graph)
            parts.append(_enc_varint((7 << 3) | 2) + _enc_varint(length))
            parts.extend(graph)
    except _ParseError as e:
        raise ModelFormatError(f"not an ONNX model (protobuf parse failed: {e})") from None
    if not seen_graph:
        raise ModelFormatError("not an ONNX model (no graph)")
    return b"".join(parts), class_map


def append_argmax_file(path: str | os.PathLike, logits_output: str) -> tuple[bytes, str]:
    """`append_argmax` on a file, read through a memory map so that the only full copy made is the result."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    error = None
    try:
        return append_argmax(memoryview(mapped), logits_output)  # type: ignore[arg-type]
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
    atomic_write_bytes(dst, set_metadata(data, entries))


def output_names(model: bytes) -> list[str]:
    """The graph's output names (for checks)."""
    names = []
    for number, wire, value in _fields(memoryview(model)):
        if number == 7 and wire == 2:
            for g_number, g_wire, g_value in _fields(value):
                if g_number == 12 and g_wire == 2:
                    names.append(_text(next(v for n, w, v in _fields(g_value) if n == 1)))
    return names
