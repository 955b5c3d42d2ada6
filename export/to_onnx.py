"""PyTorch -> ONNX with the ModelSpec embedded, checked, shape-inferred and simplified.

Input and output names come from the spec (one place), so the runtime, the parity gate and TensorRT profiles agree
on them. Optional heads end the graph in ArgMax + Cast(uint8) for segmentation (the runtime then receives a class
map) or in scale + Round + Cast(uint8) for generators.
"""

from __future__ import annotations

import enum
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgepix.runtime.core.errors import ExportError
from edgepix.runtime.core.fileio import atomic_output
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, OutputKind, Precision, Task

from .audit import Severity, audit_model
from .generators import TransposedConvForm, transposed_conv_graph
from .workspace import workspace

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # TensorRT 8.5+ (JetPack 5 and later) and every recent ONNX Runtime read it


class Exporter(str, enum.Enum):
    TORCHSCRIPT = "torchscript"  # torch.onnx.export(dynamo=False): fast, mature for CNNs, supports training mode
    DYNAMO = "dynamo"  # torch.onnx.export(dynamo=True): the torch.export-based exporter


OPSET_RANGE = {Exporter.TORCHSCRIPT: (11, 20), Exporter.DYNAMO: (18, 23)}


@dataclass(frozen=True)
class OnnxExportOptions:
    imgsz: tuple[int, int] | None = None  # (H, W); None keeps the spec's input size
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    dynamic_size: bool = False
    argmax: bool = False  # segmentation: end the graph with ArgMax + Cast(uint8)
    uint8_output: bool = False  # generators: end the graph with a uint8 image
    train_mode: bool = False  # generators: normalise with each image's own statistics, as in training (pix2pix)
    dropout: bool = False  # with train_mode: keep dropout active (random masks on every run); see generators.py
    deconv: TransposedConvForm = TransposedConvForm.CONVTRANSPOSE  # how transposed convolutions are computed
    simplify: bool = True
    exporter: Exporter = Exporter.TORCHSCRIPT


class ArgmaxHead(nn.Module):
    """logits (N, C, H, W) -> uint8 class map (N, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(dim=1).to(torch.uint8)


class Uint8ImageHead(nn.Module):
    """image in [low, high] -> uint8 image in [0, 255], rounded and clipped."""

    def __init__(self, model: nn.Module, output_range: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.low, self.high = output_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.model(x) - self.low) * (255.0 / (self.high - self.low))
        return torch.round(y).clamp(0, 255).to(torch.uint8)


def example_input(spec: ModelSpec, *, batch: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A random input of the shape the model takes (noise vector for noise generators, image otherwise)."""
    generator = torch.Generator().manual_seed(0)
    if spec.task is Task.GENERATION_NOISE:
        return torch.randn(batch, spec.latent_size, generator=generator)
    h, w = size or spec.input_size
    return torch.randn(batch, 3, h, w, generator=generator)


def exported_spec(spec: ModelSpec, options: OnnxExportOptions) -> ModelSpec:
    """The spec that describes the exported graph (size, dynamic axes, output kind)."""
    if options.argmax and spec.task is not Task.SEGMENTATION:
        raise ExportError(f"--argmax applies to segmentation models; this model's task is {spec.task.value}")
    if options.uint8_output and spec.task is Task.SEGMENTATION:
        raise ExportError("--uint8-output applies to generators; for segmentation use --argmax")
    if options.argmax and spec.num_classes > 256:
        raise ExportError(f"--argmax writes a uint8 class map, which holds 256 classes; the model has "
                          f"{spec.num_classes}")
    output_kind = spec.output_kind
    if options.argmax:
        output_kind = OutputKind.CLASS_MAP
    elif options.uint8_output:
        output_kind = OutputKind.IMAGE_UINT8
    size = tuple(options.imgsz) if options.imgsz else spec.input_size
    off_grid = size[0] % spec.size_divisor or size[1] % spec.size_divisor
    if spec.task is not Task.GENERATION_NOISE and options.imgsz and off_grid:
        raise ExportError(
            f"--imgsz must be a multiple of {spec.size_divisor} for this model, got {size[0]}x{size[1]}; "
            # at least one multiple: a size below the divisor (64 for a 128-divisible U-Net) would round to 0
            f"try {max(1, round(size[0] / spec.size_divisor)) * spec.size_divisor}x"
            f"{max(1, round(size[1] / spec.size_divisor)) * spec.size_divisor}"
        )
    if spec.task is Task.GENERATION_NOISE and options.dynamic_size:
        raise ExportError("--dynamic-size does not apply to noise generators: their output size is fixed by the model")
    return spec.replace(
        input_size=size,
        dynamic_batch=options.dynamic_batch,
        dynamic_size=options.dynamic_size,
        output_kind=output_kind,
        precision=Precision.FP32,
        quantization=None,
    )


def export_onnx(model: nn.Module, spec: ModelSpec, out: str | os.PathLike, options: OnnxExportOptions) -> ModelSpec:
    """Export `model` to `out` (atomically) and return the spec embedded in the file."""
    onnx = require_onnx()
    low, high = OPSET_RANGE[options.exporter]
    if not low <= options.opset <= high:
        raise ExportError(
            f"--opset {options.opset} is not supported by the {options.exporter.value} exporter; use {low}..{high} "
            f"(default {DEFAULT_OPSET})"
        )
    out_spec = exported_spec(spec, options)
    model = model.cpu().float()
    if options.dropout and not options.train_mode:
        raise ExportError("--dropout applies to --train-mode exports; add --train-mode")
    if options.train_mode:  # an eval-mode copy that computes the train-mode forward image by image
        from .generators import train_mode_graph

        model = train_mode_graph(model, dropout=options.dropout)
    model.eval()
    x = example_input(out_spec)
    if options.deconv is not TransposedConvForm.CONVTRANSPOSE:  # a copy that computes the same function
        model = transposed_conv_graph(model, options.deconv, x, opset=options.opset,
                                      dynamic_size=options.dynamic_size)

    findings = audit_model(model, x, dynamic_size=options.dynamic_size, exporter=options.exporter.value)
    for f in findings:
        if f.severity is Severity.WARNING:
            log.warning("export audit: %s", f)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        raise ExportError("the model holds constructs that do not export correctly: " + "; ".join(map(str, errors)))

    wrapped: nn.Module = model
    if options.argmax:
        wrapped = ArgmaxHead(model)
    elif options.uint8_output:
        wrapped = Uint8ImageHead(model, out_spec.output_range)
    wrapped.eval()

    names_in, names_out = [out_spec.input_name], [out_spec.output_name]
    dynamic_axes: dict[str, dict[int, str]] = {}
    if options.dynamic_batch or options.dynamic_size:
        in_axes: dict[int, str] = {0: "batch"} if options.dynamic_batch else {}
        out_axes: dict[int, str] = dict(in_axes)
        if options.dynamic_size:
            in_axes.update({2: "height", 3: "width"})
            # A class map is (N, H, W); logits and images are (N, C, H, W).
            out_axes.update({1: "height", 2: "width"} if options.argmax else {2: "height", 3: "width"})
        dynamic_axes = {names_in[0]: in_axes, names_out[0]: out_axes}

    with workspace() as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(wrapped, x, raw, names_in, names_out, dynamic_axes, options)
        proto = onnx.load(str(raw), load_external_data=True)
    proto = finish_onnx(proto, out_spec, simplify=options.simplify)
    save_onnx(proto, out)
    return out_spec


def _torch_export(model, x, path, names_in, names_out, dynamic_axes, options: OnnxExportOptions) -> None:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call; the choice is deliberate here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            # Per-image normalisation (train-mode exports) is instance_norm with input statistics, on purpose.
            warnings.filterwarnings("ignore", message=r".*'instance_norm' is set to train=True.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
            # F.pad (sub-pixel transposed convolutions) exports its pads through a reversing Slice that the constant
            # folder skips; the simplifier folds them into the Conv that follows.
            warnings.filterwarnings("ignore", message=r".*Only steps=1 can be constant folded.*")
            # transformers' attention checks shapes in Python (is_causal); the parity gate, which also runs a
            # dynamic-size graph at an untraced size, is what shows whether a trace generalises.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"transformers\.")
            if options.exporter is Exporter.DYNAMO:
                dynamic_shapes = None
                if dynamic_axes:
                    dims = {i: torch.export.Dim.AUTO for i in dynamic_axes[names_in[0]]}
                    dynamic_shapes = ({**dims},)
                torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=options.opset,
                                  input_names=names_in, output_names=names_out, dynamic_shapes=dynamic_shapes,
                                  external_data=False)
            else:
                # Train-mode exports arrive as eval-mode graphs (generators.train_mode_graph), so one mode serves.
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=options.opset,
                                  input_names=names_in, output_names=names_out, dynamic_axes=dynamic_axes or None,
                                  do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types; keep the reason on one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export ({options.exporter.value}) failed: {reason}") from e


def finish_onnx(proto, spec: ModelSpec, *, simplify: bool = True):
    """Check, infer shapes, simplify and embed the spec. Returns the final ModelProto."""
    onnx = require_onnx()
    try:
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph is not valid ONNX: {str(e).strip().splitlines()[0]}") from e
    if simplify:
        proto = simplify_onnx(proto)
    keep_final_resize_planar(proto)
    set_spec_metadata(proto, spec)
    proto.producer_name = "edgepix"
    from edgepix import __version__

    proto.producer_version = __version__
    onnx.checker.check_model(proto, full_check=True)
    return proto


def keep_final_resize_planar(proto) -> list[str]:
    """Write the last bilinear upsampling of the graph (logits to input size) as `pytorch_half_pixel`.

    ONNX Runtime's CPU layout optimizer runs convolutions in channel blocks of 16 (NCHWc on AVX-512) and carries
    the layout into a following `half_pixel` Resize. For the final upsampling of a segmentation head that means
    interpolating 16 padded channels for 6 classes at full resolution, then reordering that full-resolution block
    tensor back to NCHW: about a fifth of Fast-SCNN's latency at 512x512. It does not carry the layout into a
    `pytorch_half_pixel` Resize, so the reorder happens at 1/8 resolution and the interpolation on the real channels.
    The two modes are the same function whenever the output length is larger than 1, which holds for these
    upsamplings (an output size of 1 keeps `half_pixel`). Returns the names of the Resize nodes changed."""
    from onnx import helper

    graph = proto.graph
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    shapes = {v.name: v.type.tensor_type.shape for v in list(graph.value_info) + list(graph.output)}

    def ends_the_graph(name: str) -> bool:
        if name in outputs:
            return True
        users = consumers.get(name, [])
        return bool(users) and all(u.op_type in ("ArgMax", "Softmax", "Cast") and ends_the_graph(u.output[0])
                                   for u in users)

    changed = []
    for node in graph.node:
        if node.op_type != "Resize" or not ends_the_graph(node.output[0]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("mode", b"nearest") != b"linear" or attrs.get("coordinate_transformation_mode") != b"half_pixel":
            continue
        shape = shapes.get(node.output[0])
        if shape is None or any(d.HasField("dim_value") and d.dim_value <= 1 for d in list(shape.dim)[2:]):
            continue  # unknown or length-1 outputs, where the two modes differ
        for a in node.attribute:
            if a.name == "coordinate_transformation_mode":
                a.s = b"pytorch_half_pixel"
        changed.append(node.name)
    return changed


def simplify_onnx(proto):
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim is not installed: the graph is exported without simplification (pip install onnxslim)")
        return proto
    metadata = [(p.key, p.value) for p in proto.metadata_props]
    slim = onnxslim.slim(proto)
    if slim is None:
        raise ExportError("onnxslim returned no model; export again with --no-simplify")
    del slim.metadata_props[:]
    for key, value in metadata:
        entry = slim.metadata_props.add()
        entry.key, entry.value = key, value
    return slim


def set_spec_metadata(proto, spec: ModelSpec) -> None:
    for i, prop in enumerate(list(proto.metadata_props)):
        if prop.key == ONNX_METADATA_KEY:
            del proto.metadata_props[i]
            break
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, spec.to_json()


def save_onnx(proto, out: str | os.PathLike) -> None:
    onnx = require_onnx()
    out = Path(out)
    try:
        with atomic_output(out) as tmp:
            onnx.save(proto, str(tmp))
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from e


def require_onnx():
    from edgepix.runtime.core.errors import require

    return require("onnx", extra="train", purpose="Exporting to ONNX")
