"""FLOPs of an ONNX or a TFLite (LiteRT) graph, counted from its operators and their tensors' shapes (multiply-add
= 2 FLOPs). `count_flops`, `flops_per_image` and `model_flops` take either file; the suffix decides.

Convolutions, transposed convolutions and matrix products carry nearly all the arithmetic of the CNNs edgepix
deploys; element-wise and pooling ops are not counted. Quantized graphs count the same arithmetic as their float
originals (QDQ graphs keep Conv nodes; QOperator graphs use QLinearConv / QLinearMatMul; an int8 .tflite keeps
CONV_2D and the rest, on int8 tensors).

ONNX: the graph's input is set to the shape asked for and the other shapes are inferred. TFLite: the shapes are the
ones stored in the flatbuffer (every tensor has one), read through the schema inside ai-edge-litert as
runtime.description.tflite reads models; only the main subgraph is counted (ops that call other subgraphs, such
as WHILE and IF, are not followed), and a graph whose image dimensions are dynamic (-1 in the input's shape
signature) cannot be counted from its stored shapes (FlopsUnavailable). A .tflite's ops are filed under the ONNX
names (CONV_2D, DEPTHWISE_CONV_2D and CONV_3D under Conv; TRANSPOSE_CONV, CONV_3D_TRANSPOSE and MediaPipe's
Convolution2DTransposeBias under ConvTranspose; FULLY_CONNECTED and BATCH_MATMUL under MatMul), so the two
exports of one network give the same `by_op`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from edgepix.runtime.core.errors import EdgepixError, ModelFormatError
from edgepix.runtime.core.formats import TFLITE_SUFFIXES
from edgepix.runtime.description.spec import Layout, ModelSpec, Task
from edgepix.runtime.description.tflite import _DAMAGE, damaged, import_litert, read_model_bytes


class FlopsUnavailable(EdgepixError):
    """The graph's FLOPs cannot be counted at the shape asked for (a .tflite whose shapes are fixed otherwise, or
    dynamic)."""


@dataclass(frozen=True)
class GraphFlops:
    total: int  # FLOPs for one inference at the given input shape
    by_op: dict[str, int]


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def count_flops(path: str | os.PathLike, input_shape: tuple[int, ...]) -> GraphFlops:
    """FLOPs of one inference of the model at `path` (.onnx or .tflite) with its (first) input of `input_shape`."""
    if Path(path).suffix.lower() in TFLITE_SUFFIXES:
        return count_tflite_flops(path, input_shape)
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    graph_input = next(i for i in graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    for d, size in zip(dims, input_shape):
        d.Clear()
        d.dim_value = int(size)
    try:
        # ONNX Runtime's symbolic inference follows Shape -> Resize chains that plain ONNX inference leaves
        # unknown in dynamic-size and dynamic-batch graphs; without it those convolutions would go uncounted.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except ImportError:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - its asserts fail on graphs it cannot follow; ONNX's own inference still may
        model = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    # DequantizeLinear passes a weight's shape through: QDQ graphs feed Conv from a DQ node.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])

    by_op: dict[str, int] = {}

    def add(op: str, flops: float) -> None:
        by_op[op] = by_op.get(op, 0) + int(flops)

    for node in model.graph.node:
        op = node.op_type
        if op in ("Conv", "QLinearConv", "ConvInteger"):
            w_index = 3 if op == "QLinearConv" else 1
            y = shapes.get(node.output[0])
            w = shapes.get(node.input[w_index])
            if not y or not w or min(y) < 0:
                continue
            # y: (N, Cout, *spatial); w: (Cout, Cin/groups, *kernel)
            add("Conv", 2 * math.prod(y) * math.prod(w[1:]))
        elif op == "ConvTranspose":
            x = shapes.get(node.input[0])
            w = shapes.get(node.input[1])
            if not x or not w or min(x) < 0:
                continue
            # Each input element scatters into Cout/groups x kernel outputs; w: (Cin, Cout/groups, *kernel)
            add("ConvTranspose", 2 * math.prod(x) * math.prod(w[1:]))
        elif op in ("MatMul", "Gemm", "QLinearMatMul", "MatMulInteger"):
            y = shapes.get(node.output[0])
            a = shapes.get(node.input[3 if op == "QLinearMatMul" else 0])
            if not y or not a or min(y) < 0 or min(a) < 0:
                continue
            k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
            add("MatMul", 2 * math.prod(y) * k)
    return GraphFlops(sum(by_op.values()), by_op)


# ---- TFLite ----------------------------------------------------------------------------------------------

# Builtin operators counted, by their schema names (looked up in BuiltinOperator), and the ONNX name each is filed
# under; MediaPipe's transposed convolution is a custom op.
_TFLITE_OPS = {"CONV_2D": "Conv", "DEPTHWISE_CONV_2D": "Conv", "CONV_3D": "Conv", "TRANSPOSE_CONV": "ConvTranspose",
               "CONV_3D_TRANSPOSE": "ConvTranspose", "FULLY_CONNECTED": "MatMul", "BATCH_MATMUL": "MatMul"}
_TFLITE_CUSTOM_OPS = {"Convolution2DTransposeBias": "ConvTranspose"}


def _main_subgraph(model, path):
    if model.SubgraphsLength() < 1:
        raise ModelFormatError(f"{path}: the model has no subgraph; convert it again")
    graph = model.Subgraphs(0)
    if graph.InputsLength() < 1:
        raise ModelFormatError(f"{path}: the model's main subgraph has no input")
    return graph


def _stored_input_shape(graph) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """The first input's shape as stored (a dynamic dimension holds a placeholder there, usually 1), and the same
    with None where the shape signature says -1 (dynamic)."""
    t = graph.Tensors(graph.Inputs(0))
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    signature = [int(d) for d in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else shape
    return shape, tuple(d if s >= 0 else None for d, s in zip(shape, signature))


def count_tflite_flops(path: str | os.PathLike, input_shape: tuple[int, ...] | None = None) -> GraphFlops:
    """FLOPs of one inference of a .tflite, from the shapes stored in its main subgraph. `input_shape` (batch
    first) must agree with the stored input shape past the batch (FlopsUnavailable otherwise: the stored shapes
    are the only ones known); its batch scales the count from the stored batch. None: the stored shapes as they
    are. A damaged flatbuffer is a ModelFormatError in one line, as when the model is read to run."""
    data = read_model_bytes(path)
    fb = import_litert("ai_edge_litert.schema_py_generated")
    try:
        model = fb.Model.GetRootAs(data, 0)
        graph = _main_subgraph(model, path)
        shape, stored = _stored_input_shape(graph)
        name = Path(path).name
        if any(d is None for d in stored[1:]):
            raise FlopsUnavailable(f"{name}: its input's size is dynamic ({_dims(stored)}); the FLOPs of a .tflite "
                                   "are counted from the shapes stored in it")
        # the count is at the stored batch (a dynamic batch's placeholder, usually 1); the batch asked for scales it
        stored_batch = asked_batch = shape[0] if shape and shape[0] > 0 else 1
        if input_shape is not None:
            if tuple(input_shape[1:]) != tuple(stored[1:]):
                raise FlopsUnavailable(f"{name}: its input is fixed at {_dims(stored)}, not {_dims(input_shape)}; "
                                       "the FLOPs of a .tflite are counted at the shapes stored in it")
            asked_batch = input_shape[0] if input_shape else stored_batch
        by_op = _tflite_ops(fb, model, graph)
    except _DAMAGE as e:
        raise damaged(path, e) from None
    by_op = {op: n * asked_batch // stored_batch for op, n in by_op.items()}
    return GraphFlops(sum(by_op.values()), by_op)


def _dims(shape) -> str:
    return "x".join("?" if d is None or d < 0 else str(d) for d in shape)


def _tflite_ops(fb, model, graph) -> dict[str, int]:
    """{ONNX op name: FLOPs} over the main subgraph's operators."""
    codes = {getattr(fb.BuiltinOperator, name): name for name in _TFLITE_OPS}
    custom = fb.BuiltinOperator.CUSTOM
    n_tensors = graph.TensorsLength()

    def shape(op, i: int) -> tuple[int, ...] | None:
        """The stored shape of the op's i-th input (i >= 0) or first output (i = -1); None where unknown."""
        if (i >= op.InputsLength()) if i >= 0 else op.OutputsLength() < 1:
            return None
        index = op.Inputs(i) if i >= 0 else op.Outputs(0)
        if not 0 <= index < n_tensors:
            return None
        t = graph.Tensors(index)
        dims = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return dims if dims and min(dims) > 0 else None

    by_op: dict[str, int] = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # the schema's rule: the larger is the op
        if builtin == custom:
            name = (code.CustomCode() or b"").decode("utf-8", "replace")
            kind = _TFLITE_CUSTOM_OPS.get(name)
        else:
            name = codes.get(builtin)
            kind = _TFLITE_OPS.get(name) if name else None
        if kind is None:
            continue
        flops = _tflite_op_flops(fb, op, name, shape)
        if flops:
            by_op[kind] = by_op.get(kind, 0) + flops
    return by_op


def _tflite_op_flops(fb, op, name: str, shape) -> int:
    """FLOPs of one counted operator (`shape(op, i)`: its i-th input's stored shape, -1 its output's); 0 where a
    shape is unknown."""
    out = shape(op, -1)
    if name == "CONV_2D":  # (input, filter [Cout, KH, KW, Cin/groups], bias)
        w = shape(op, 1)
        return 2 * math.prod(out) * math.prod(w[1:]) if out and w and len(w) == 4 else 0
    if name == "DEPTHWISE_CONV_2D":  # filter [1, KH, KW, Cout]: one KH x KW window per output element
        w = shape(op, 1)
        return 2 * math.prod(out) * w[1] * w[2] if out and w and len(w) == 4 else 0
    if name == "CONV_3D":  # filter [KD, KH, KW, Cin, Cout]
        w = shape(op, 1)
        return 2 * math.prod(out) * math.prod(w[:4]) if out and w and len(w) == 5 else 0
    if name in ("TRANSPOSE_CONV", "CONV_3D_TRANSPOSE"):  # (output_shape, filter [Cout, KH, KW, Cin], input, bias)
        w, x = shape(op, 1), shape(op, 2)
        # each input element scatters into Cout x kernel outputs; CONV_3D_TRANSPOSE's filter: [KD, KH, KW, Cout, Cin]
        return 2 * math.prod(x) * math.prod(w[:-1]) if x and w and len(w) >= 4 else 0
    if name == "Convolution2DTransposeBias":  # MediaPipe's: (input, filter [Cout, KH, KW, Cin], bias)
        w, x = shape(op, 1), shape(op, 0)
        return 2 * math.prod(x) * math.prod(w[:-1]) if x and w and len(w) == 4 else 0
    if name == "FULLY_CONNECTED":  # (input, weights [Cout, Cin], bias): Cin multiply-adds per output element
        w = shape(op, 1)
        return 2 * math.prod(out) * w[-1] if out and w and len(w) == 2 else 0
    if name == "BATCH_MATMUL":  # (x [..., M, K], y [..., K, N]); adj_x: x is [..., K, M]
        x = shape(op, 0)
        if not out or not x or len(x) < 2:
            return 0
        adj_x = False
        if op.BuiltinOptionsType() == fb.BuiltinOptions.BatchMatMulOptions:
            options, table = fb.BatchMatMulOptions(), op.BuiltinOptions()
            options.Init(table.Bytes, table.Pos)
            adj_x = bool(options.AdjX())
        return 2 * math.prod(out) * (x[-2] if adj_x else x[-1])
    return 0


# ---- per image -----------------------------------------------------------------------------------------------


def flops_per_image(path: str | os.PathLike, image_shape: tuple[int, ...]) -> int:
    """FLOPs for one image of shape `image_shape` (without the batch dimension); counted at batch 1, since a
    static-batch graph cannot be re-shaped to another batch."""
    return count_flops(path, (1, *image_shape)).total


def input_sample_shape(spec: ModelSpec) -> tuple[int, ...]:
    """One input sample's shape as the model takes it, without the batch: (3, H, W) for an NCHW image input,
    (H, W, 3) for NHWC, (L,) for a noise generator's latent. The counter sets the graph's input to exactly this,
    so an NHWC model counted as NCHW would be counted on a 3-pixel-wide image."""
    if spec.task is Task.GENERATION_NOISE:
        return (spec.latent_size,)  # type: ignore[return-value]
    h, w = spec.input_size
    return (3, h, w) if spec.input_layout is Layout.NCHW else (h, w, 3)


def model_flops(path: str | os.PathLike, spec: ModelSpec) -> int:
    """FLOPs for one input sample at the spec's input size, in the spec's input layout."""
    return flops_per_image(path, input_sample_shape(spec))
