"""FLOPs of an ONNX graph, counted from its nodes and inferred shapes (multiply-add = 2 FLOPs).

Convolutions, transposed convolutions and matrix products carry nearly all the arithmetic of the CNNs edgepix
deploys; element-wise and pooling ops are not counted. Quantized graphs count the same arithmetic as their float
originals (QDQ graphs keep Conv nodes; QOperator graphs use QLinearConv / QLinearMatMul).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from edgepix.runtime.description.spec import Layout, ModelSpec, Task


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
    """FLOPs of one inference of the model at `path` with its (first) input of `input_shape`."""
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
