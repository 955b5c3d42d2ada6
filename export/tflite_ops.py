"""Rewrite a .tflite's custom ops into builtin ones that converters know: tflite -> tflite.

MediaPipe's models (selfie segmentation, hair segmentation, ...) upsample with the custom op
`Convolution2DTransposeBias`, which LiteRT runs through XNNPACK but tf2onnx leaves unconverted (ONNX Runtime then
refuses the file). Its semantics, from MediaPipe's kernel (mediapipe/util/tflite/operations/
transpose_conv_bias.cc) and checked numerically against LiteRT: inputs (input NHWC, weights [O, kH, kW, I], bias
[O]); options are 12 raw bytes, int32 padding (1 SAME, 2 VALID), stride_w, stride_h; the output side is
s * (n - 1) + k - p with p = max(0, k - (n - 1) % s - 1) for SAME and 0 for VALID. That is the builtin
TRANSPOSE_CONV (version 3, which takes a bias) with the same padding and strides, the weights unchanged, the bias as
its fourth input and the output shape as a constant first input: this pass makes that replacement.

The schema is the one inside ai-edge-litert; the model's weights are copied as they are.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.description.tflite import TFLITE_IDENTIFIER, import_litert, read_model_bytes

TRANSPOSE_CONV_BIAS = "Convolution2DTransposeBias"
TRANSPOSE_CONV_WITH_BIAS_VERSION = 3  # the first TRANSPOSE_CONV version with the optional bias input
_PADDING = {1: "SAME", 2: "VALID"}  # TfLitePadding


def transposed_size(n: int, kernel: int, stride: int, *, same: bool) -> int:
    """One output side of Convolution2DTransposeBias for an input side n."""
    cut = max(0, kernel - (n - 1) % stride - 1) if same else 0
    return stride * (n - 1) + kernel - cut


def rewrite_custom_ops(src: str | Path, dst: str | Path) -> int:
    """Write `src` to `dst` with every Convolution2DTransposeBias replaced by the builtin TRANSPOSE_CONV; returns
    how many were replaced (0: `dst` is not written, `src` needs no rewrite). Packed files appended to the model
    (labels) are not copied: the result is for converters, not for distribution."""
    import flatbuffers

    fb = import_litert("ai_edge_litert.schema_py_generated")
    data = read_model_bytes(src)
    try:
        model = fb.ModelT.InitFromPackedBuf(data, 0)
    except (IndexError, struct.error, ValueError, TypeError) as e:
        raise ExportError(f"{src}: the TFLite flatbuffer is damaged ({type(e).__name__}); copy or convert it "
                          "again") from None
    replaced = 0
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            if _builtin(code) == fb.BuiltinOperator.CUSTOM and _text(code.customCode) == TRANSPOSE_CONV_BIAS:
                _to_transpose_conv(fb, model, graph, op, Path(src).name)
                replaced += 1
    if not replaced:
        return 0
    _drop_unused_opcodes(model)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    Path(dst).write_bytes(bytes(builder.Output()))  # a temporary file of the conversion, never the artifact
    return replaced


def _builtin(code) -> int:
    # Builtin codes above 127 live in builtinCode only; older files have them in deprecatedBuiltinCode only.
    return max(code.builtinCode or 0, code.deprecatedBuiltinCode or 0)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def _to_transpose_conv(fb, model, graph, op, source: str) -> None:
    where = f"{source}: {TRANSPOSE_CONV_BIAS}"
    if len(op.inputs) != 3 or len(op.outputs) != 1:
        raise ExportError(f"{where} has {len(op.inputs)} inputs and {len(op.outputs)} outputs; expected (input, "
                          "weights, bias) and one output")
    raw = bytes(bytearray(op.customOptions if op.customOptions is not None else []))
    if len(raw) < 12:
        raise ExportError(f"{where} options are {len(raw)} bytes; expected 12 (padding, stride_w, stride_h)")
    padding, stride_w, stride_h = struct.unpack_from("<iii", raw)
    if padding not in _PADDING or stride_w < 1 or stride_h < 1:
        raise ExportError(f"{where} options: padding {padding}, strides {stride_w}x{stride_h}; expected padding "
                          "1 (SAME) or 2 (VALID) and positive strides")
    x, weights, bias = (graph.tensors[i] for i in op.inputs)
    out = graph.tensors[op.outputs[0]]
    if len(x.shape) != 4 or len(weights.shape) != 4 or len(out.shape) != 4:
        raise ExportError(f"{where}: expected rank-4 input, weights and output, got {list(x.shape)}, "
                          f"{list(weights.shape)}, {list(out.shape)}")
    same = _PADDING[padding] == "SAME"
    _, kh, kw, _ = (int(d) for d in weights.shape)
    size = [int(out.shape[0]), transposed_size(int(x.shape[1]), kh, stride_h, same=same),
            transposed_size(int(x.shape[2]), kw, stride_w, same=same), int(weights.shape[0])]
    if [int(d) for d in out.shape] != size:
        raise ExportError(f"{where}: its output tensor is {list(out.shape)}, the op computes {size} from input "
                          f"{list(x.shape)}; the model is inconsistent")
    options = fb.TransposeConvOptionsT()
    options.padding = fb.Padding.SAME if same else fb.Padding.VALID
    options.strideW, options.strideH = stride_w, stride_h
    op.inputs = [_constant_shape(fb, model, graph, size, _text(out.name)), op.inputs[1], op.inputs[0], op.inputs[2]]
    op.opcodeIndex = _opcode(fb, model, fb.BuiltinOperator.TRANSPOSE_CONV, TRANSPOSE_CONV_WITH_BIAS_VERSION)
    op.builtinOptionsType, op.builtinOptions = fb.BuiltinOptions.TransposeConvOptions, options
    op.customOptions = None


def _constant_shape(fb, model, graph, shape: list[int], name: str) -> int:
    buffer = fb.BufferT()
    buffer.data = np.frombuffer(np.array(shape, np.int32).tobytes(), np.uint8)
    model.buffers.append(buffer)
    t = fb.TensorT()
    t.name, t.shape, t.type, t.buffer = f"{name}/output_shape", [4], fb.TensorType.INT32, len(model.buffers) - 1
    graph.tensors.append(t)
    return len(graph.tensors) - 1


def _opcode(fb, model, builtin: int, version: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if _builtin(code) == builtin:
            code.version = max(code.version, version)
            return i
    code = fb.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _drop_unused_opcodes(model) -> None:
    """Remove operator codes no operator uses (the replaced custom op's), renumbering the operators' indices."""
    used = sorted({op.opcodeIndex for g in model.subgraphs or [] for op in g.operators or []})
    renumber = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for g in model.subgraphs or []:
        for op in g.operators or []:
            op.opcodeIndex = renumber[op.opcodeIndex]
