"""Reduced-precision ONNX graphs: FP16 (float32 at the edges) and INT8 (QDQ, static, calibrated).

INT8 integer types follow the target. TensorRT's explicit quantization needs symmetric signed activations (S8S8,
zero points 0). ONNX Runtime on x86 CPUs with VNNI runs unsigned activations with signed weights (U8S8) fastest;
benchmarks/int8_matrix.py measures the choices on the current machine.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepix.runtime.core.errors import ExportError, require
from edgepix.runtime.description.spec import ModelSpec, Precision

from .to_onnx import save_onnx, set_spec_metadata
from .workspace import workspace

log = logging.getLogger(__name__)

# ArgMax, the uint8 cast and pure shape plumbing carry no arithmetic worth quantizing.
_NEVER_QUANTIZE = {"ArgMax", "Cast", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape"}


class Int8Target(str, enum.Enum):
    CPU = "cpu"  # ONNX Runtime on CPUs: U8S8 (uint8 activations, int8 weights)
    TENSORRT = "tensorrt"  # TensorRT explicit quantization: S8S8, symmetric


class CalibrationMethod(str, enum.Enum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class QuantFormat(str, enum.Enum):
    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear pairs around float ops: what TensorRT and ORT EPs consume
    QOPERATOR = "qoperator"  # QLinearConv & co.: ONNX Runtime CPU only


@dataclass(frozen=True)
class Int8Options:
    target: Int8Target = Int8Target.CPU
    method: CalibrationMethod = CalibrationMethod.MINMAX
    quant_format: QuantFormat = QuantFormat.QDQ
    activation_signed: bool | None = None  # None: the target's choice (U8 for cpu, S8 for tensorrt)
    per_channel: bool = True
    keep_float: tuple[str, ...] = ()  # node names, or "first"/"last" for the first/last Conv
    # 7-bit weights: on x86 CPUs without VNNI, U8S8 products are summed in saturating 16-bit pairs (vpmaddubsw),
    # which can overflow with full 8-bit weights; reduce_range avoids that at a small accuracy cost.
    reduce_range: bool = False

    def activation_is_signed(self) -> bool:
        if self.activation_signed is not None:
            return self.activation_signed
        return self.target is Int8Target.TENSORRT

    def describe(self, n_calib: int) -> str:
        kinds = ("S8S8" if self.activation_is_signed() else "U8S8")
        parts = [self.quant_format.value.upper(), kinds, "per-channel" if self.per_channel else "per-tensor",
                 self.method.value, f"{n_calib} calibration images", f"target {self.target.value}"]
        if self.keep_float:
            parts.append("float: " + ",".join(self.keep_float))
        if self.reduce_range:
            parts.append("reduce_range")
        return " ".join(parts[:4]) + ", " + ", ".join(parts[4:])


def convert_fp16(fp32_path: str | os.PathLike, out: str | os.PathLike, spec: ModelSpec) -> ModelSpec:
    """FP16 weights and activations with float32 inputs and outputs (for GPUs and TensorRT)."""
    onnx = require("onnx", extra="train", purpose="FP16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    # Keep ArgMax and the uint8 cast in float32: ONNX Runtime's CPU ArgMax has no float16 kernel.
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=["ArgMax"])
    _sort_topologically(fp16.graph)
    out_spec = spec.replace(precision=Precision.FP16, quantization=None)
    set_spec_metadata(fp16, out_spec)
    onnx.checker.check_model(fp16, full_check=True)
    save_onnx(fp16, out)
    return out_spec


def _sort_topologically(graph) -> None:
    """Reorder nodes so each comes after its producers (the converter appends its input casts at the end)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("FP16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            available.update(n.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


class _Reader:
    """Feeds calibration batches (one image a call) to ONNX Runtime's calibrator."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self._iter: Iterator[np.ndarray] = iter(batches)
        self.input_name = input_name

    def get_next(self):
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:  # ORT's reader interface; calibration reads the data once
        pass


def _conv_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]


class _DropQuantizerChatter(logging.Filter):
    """ONNX Runtime's quantizer logs a line per bias it copies and per 1-D weight it quantizes per tensor instead
    of per channel (LayerNorm weights in a transformer: hundreds of lines); only its errors reach the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_quantizer():
    handlers = logging.getLogger().handlers
    chatter = _DropQuantizerChatter()
    for h in handlers:
        h.addFilter(chatter)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(chatter)


def quantize_int8(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    spec: ModelSpec,
    calibration: list[np.ndarray],
    options: Int8Options = Int8Options(),
) -> ModelSpec:
    """Static INT8 quantization of an FP32 ONNX file, calibrated on preprocessed NCHW float32 batches."""
    onnx = require("onnx", extra="train", purpose="INT8 quantization")
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ExportError("INT8 calibration needs at least one image; got none")
    if options.target is Int8Target.CPU:
        from edgepix.runtime.core.cpuinfo import warn_if_int8_is_slow_here

        warn_if_int8_is_slow_here()  # one log line per process where this CPU has no VNNI/AMX/dot-product
    model = onnx.load(str(fp32_path))
    convs = _conv_nodes(model)
    exclude = [n.name for n in model.graph.node if n.op_type in _NEVER_QUANTIZE]
    if options.target is Int8Target.CPU:
        # ONNX Runtime's CPU provider has no integer ConvTranspose: a quantized one runs as dequantize -> float
        # ConvTranspose -> quantize, which only adds work. Keep transposed convolutions float for the CPU target.
        exclude += [n.name for n in model.graph.node if n.op_type == "ConvTranspose"]
    for name in options.keep_float:
        if name == "first" and convs:
            exclude.append(convs[0])
        elif name == "last" and convs:
            exclude.append(convs[-1])
        elif name not in {n.name for n in model.graph.node}:
            raise ExportError(f"--keep-float {name!r} is not a node of the graph; e.g. {', '.join(convs[:5])}")
        else:
            exclude.append(name)
    signed = options.activation_is_signed()
    extra: dict = {}
    if signed:
        # TensorRT's explicit INT8 requires zero points of 0.
        extra.update({"ActivationSymmetric": True, "WeightSymmetric": True})
    method = {
        CalibrationMethod.MINMAX: q.CalibrationMethod.MinMax,
        CalibrationMethod.ENTROPY: q.CalibrationMethod.Entropy,
        CalibrationMethod.PERCENTILE: q.CalibrationMethod.Percentile,
    }[options.method]
    with workspace() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quantized = Path(tmp) / "int8.onnx"
        # The documented pre-processing step: symbolic shape inference and graph optimisation before calibration.
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=False)
        try:
            with _quiet_quantizer():
                q.quantize_static(
                    str(prepped),
                    str(quantized),
                    _Reader(spec.input_name, calibration),
                    quant_format=q.QuantFormat.QDQ if options.quant_format is QuantFormat.QDQ
                    else q.QuantFormat.QOperator,
                    per_channel=options.per_channel,
                    reduce_range=options.reduce_range,
                    activation_type=q.QuantType.QInt8 if signed else q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    nodes_to_exclude=exclude,
                    calibrate_method=method,
                    extra_options=extra,
                )
        except Exception as e:  # ORT's quantizer raises plain exceptions of many kinds
            raise ExportError(f"INT8 quantization failed: {str(e).strip().splitlines()[0]}") from e
        result = onnx.load(str(quantized))
    out_spec = spec.replace(precision=Precision.INT8, quantization=options.describe(len(calibration)))
    set_spec_metadata(result, out_spec)
    save_onnx(result, out)
    return out_spec
