"""A TFLite (LiteRT) model's description, read from its flatbuffer without an interpreter: the input and output
tensors, the TFLite metadata, and the edgepix spec kept beside the model.

- Tensors: name, numpy dtype, shape (a -1 in the shape signature is a dynamic dimension) and quantization. A
  quantized input or output (uint8/int8 with a scale) is described as float32: the `litert` backend converts real
  values to and from the stored integers with the tensor's scale and zero point, so every consumer sees real values.
- Metadata (the TFLite Support format: a flatbuffer in the model's "TFLITE_METADATA" buffer, schema vendored in
  `tflite_metadata_schema`; associated files are a zip archive appended to the model): class names from the output's
  label file, and the input's NormalizationOptions (pixel units, (p - mean) / std) as the spec's scale 1/255, mean
  and std.
- The spec: `NAME.spec.json` beside `NAME.tflite`, the ModelSpec's own JSON (`edgepix spec NAME.tflite --set ...
  --out NAME.spec.json` writes it), else the spec embedded in the model: the model's metadata entry "edgepix.spec"
  (the key ONNX files use), whose buffer holds the same JSON (`edgepix export CKPT --format tflite` writes it with
  `embed_spec`). A model with either is described by it alone, the sidecar first (it is how a user changes the
  spec of a model as it came); without one, the TFLite metadata and the tensors' shapes give the defaults that
  `foreign.infer_spec` completes.

A .tflite file is untrusted input: its identifier is checked before anything reads it, a damaged flatbuffer is a
ModelFormatError in one line, label files are read up to MAX_LABEL_FILE_BYTES (a zip can claim any size), and
metadata that cannot be read is ignored with a warning (the graph itself can still run).

The flatbuffer schema of the model itself is the one that ships inside ai-edge-litert (`ai_edge_litert.
schema_py_generated`), imported when a model is read: without the package, one line says how to install it.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DependencyError, ModelFormatError, SpecError
from .spec import ONNX_METADATA_KEY, ModelSpec, OutputKind, Task
from .tensors import Dim, TensorMeta

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edgepix[litert]'"
TFLITE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer
METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
SPEC_METADATA_NAME = ONNX_METADATA_KEY  # the metadata entry whose buffer holds an embedded spec's JSON
SIDECAR_SUFFIX = ".spec.json"
MAX_LABEL_FILE_BYTES = 1 << 20  # 1 MB: tens of thousands of class names; more is not a label file
PIXEL_SCALE = 1.0 / 255.0  # the spec scale metadata normalisation is expressed at

# TFLite tensor types (schema TensorType names) that numpy holds.
_NUMPY_TYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "FLOAT64": np.float64, "INT8": np.int8,
                "UINT8": np.uint8, "INT16": np.int16, "UINT16": np.uint16, "INT32": np.int32, "UINT32": np.uint32,
                "INT64": np.int64, "UINT64": np.uint64, "BOOL": np.bool_}
# What a damaged flatbuffer makes the generated reader raise: offsets out of range, short reads, bad UTF-8.
_DAMAGE = (IndexError, struct.error, ValueError, TypeError, UnicodeDecodeError, AttributeError, OverflowError)


def import_litert(module: str = "ai_edge_litert"):
    """An ai-edge-litert module, or DependencyError whose one line says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(f"LiteRT models (.tflite) need the Python package 'ai-edge-litert' ({e}); install "
                              f"it with: {INSTALL_HINT}") from e


@dataclass(frozen=True)
class TfliteTensor:
    """An input or output of a TFLite model as stored: the dtype is the stored one (uint8 for a quantized input)."""

    name: str
    index: int  # the tensor's index in the main subgraph, which is the interpreter's tensor index
    dtype: np.dtype
    shape: tuple[Dim, ...]  # None where the shape signature says -1 (dynamic)
    scale: float = 0.0  # quantization; 0: none
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.scale > 0 and self.dtype.kind in "iu"

    @property
    def meta(self) -> TensorMeta:
        """The tensor as the runtime sees it: real values (float32) where it is quantized."""
        return TensorMeta(self.name, np.dtype(np.float32) if self.quantized else self.dtype, self.shape)


def tflite_tensor(name: str, index: int, dtype: Any, shape: Any, signature: Any, scales: Any, zero_points: Any, *,
                  source: str) -> TfliteTensor:
    """A TfliteTensor from the values the flatbuffer (or the interpreter's tensor details) gives."""
    dims = [int(d) for d in (signature if signature is not None and len(signature) else shape)]
    scales = [float(s) for s in (scales if scales is not None else ())]
    zero_points = [int(z) for z in (zero_points if zero_points is not None else ())]
    if len(scales) > 1:
        raise ModelFormatError(f"{source}: input/output tensor {name[:80]!r} is quantized per channel "
                               f"({len(scales)} scales); edgepix converts per-tensor quantized inputs and outputs only")
    scale = scales[0] if scales else 0.0
    if not (np.isfinite(scale) and scale >= 0):
        raise ModelFormatError(f"{source}: tensor {name[:80]!r} has the quantization scale {scale!r}; expected a "
                               "positive number (the file is damaged)")
    return TfliteTensor(name, index, np.dtype(dtype), tuple(d if d >= 0 else None for d in dims), scale,
                        zero_points[0] if zero_points else 0)


@dataclass(frozen=True)
class TfliteMetadata:
    """What a model's TFLite metadata says that a spec can use."""

    name: str | None = None
    class_names: tuple[str, ...] | None = None  # from the output's label file
    mean: tuple[float, ...] | None = None  # the input's NormalizationOptions, pixel units
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TfliteModel:
    path: Path
    inputs: tuple[TfliteTensor, ...]
    outputs: tuple[TfliteTensor, ...]
    metadata: TfliteMetadata
    # per output: the activation that produced it ("sigmoid", "softmax"; None: neither), looking through reshapes
    output_activations: tuple[str | None, ...]
    spec: ModelSpec | None = None  # the spec embedded in the model (metadata entry SPEC_METADATA_NAME)


def check_tflite_file(path: str | os.PathLike) -> Path:
    """`path`, after checking from its first bytes that it is a TFLite flatbuffer (ModelFormatError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"model file not found: {path}" if not path.exists() else
                               f"{path} is not a file; expected a .tflite model")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from e
    if len(head) < 8 or head[4:8] != TFLITE_IDENTIFIER:
        found = head[4:8] if len(head) == 8 else f"{len(head)} bytes"
        raise ModelFormatError(f"{path}: expected a TFLite flatbuffer (identifier {TFLITE_IDENTIFIER.decode()} at "
                               f"byte 4), found {found!r}; is this a .tflite model?")
    return path


def read_model_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, after `check_tflite_file`."""
    path = check_tflite_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from e


def damaged(path: str | os.PathLike, e: Exception) -> ModelFormatError:
    """The one-line error for a flatbuffer whose reading raised `e` (one of _DAMAGE)."""
    return ModelFormatError(f"{path}: the TFLite flatbuffer is damaged ({type(e).__name__}: {str(e)[:120]}); copy "
                            "or convert the model again")


def read_tflite(path: str | os.PathLike) -> TfliteModel:
    """Inputs, outputs and metadata of the model's main subgraph."""
    path = Path(path)
    data = read_model_bytes(path)
    fb = import_litert("ai_edge_litert.schema_py_generated")
    try:
        model = fb.Model.GetRootAs(data, 0)
        if model.SubgraphsLength() < 1:
            raise ModelFormatError(f"{path}: the model has no subgraph; convert it again")
        graph = model.Subgraphs(0)
        inputs = tuple(_tensor(fb, graph, graph.Inputs(i), path) for i in range(graph.InputsLength()))
        outputs = tuple(_tensor(fb, graph, graph.Outputs(i), path) for i in range(graph.OutputsLength()))
        producers = {op.Outputs(j): op for op in (graph.Operators(i) for i in range(graph.OperatorsLength()))
                     for j in range(op.OutputsLength())}
        activations = tuple(_activation(fb, model, producers, t.index) for t in outputs)
        blob = _metadata_blob(model, data, METADATA_NAME)
        spec_blob = _metadata_blob(model, data, SPEC_METADATA_NAME)
    except _DAMAGE as e:
        raise damaged(path, e) from None
    spec = None
    if spec_blob is not None:  # read as strictly as an ONNX file's embedded spec (bounded JSON, every key checked)
        try:
            spec = ModelSpec.from_json(spec_blob)
        except SpecError as e:
            raise SpecError(f"{path}: embedded spec is invalid: {e}") from e
    return TfliteModel(path, inputs, outputs, _metadata(blob, data, path), activations, spec)


def _tensor(fb, graph, index: int, path: Path) -> TfliteTensor:
    if not 0 <= index < graph.TensorsLength():
        raise IndexError(f"tensor index {index} out of range")
    t = graph.Tensors(index)
    name = (t.Name() or b"").decode("utf-8")
    type_name = next((k for k, v in vars(fb.TensorType).items() if v == t.Type()), str(t.Type()))
    if type_name not in _NUMPY_TYPES:
        raise ModelFormatError(f"{path.name}: tensor {name[:80]!r} has type {type_name}; edgepix feeds and reads "
                               f"{', '.join(_NUMPY_TYPES)}")
    q = t.Quantization()
    scales = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
    zero_points = q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else None
    signature = t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else None
    shape = t.ShapeAsNumpy() if t.ShapeLength() else []
    return tflite_tensor(name, index, _NUMPY_TYPES[type_name], shape, signature, scales, zero_points,
                         source=path.name)


def _activation(fb, model, producers: dict, tensor: int) -> str | None:
    """"sigmoid" or "softmax" when the op that produces `tensor` (through reshapes) is LOGISTIC or SOFTMAX;
    `producers` maps a tensor index to the operator that writes it."""
    seen: set[int] = set()
    ops = fb.BuiltinOperator
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        op = producers[tensor]
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == ops.LOGISTIC:
            return "sigmoid"
        if builtin == ops.SOFTMAX:
            return "softmax"
        if builtin not in (ops.RESHAPE, ops.SQUEEZE, ops.EXPAND_DIMS) or op.InputsLength() < 1:
            return None
        tensor = op.Inputs(0)
    return None


def _metadata_blob(model, data: bytes, name: str) -> bytes | None:
    """The buffer of the model's metadata entry `name`, or None."""
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != name.encode():
            continue
        buffer = model.Buffers(entry.Buffer())
        if buffer.DataLength():
            return buffer.DataAsNumpy().tobytes()
        offset, size = buffer.Offset(), buffer.Size()  # models over 2 GB keep buffers after the flatbuffer
        if offset > 1 and offset + size <= len(data):
            return data[offset:offset + size]
    return None


def _metadata(blob: bytes | None, data: bytes, path: Path) -> TfliteMetadata:
    """The usable part of the TFLite metadata; a damaged or unexpected one is ignored with a warning."""
    if blob is None:
        return TfliteMetadata()
    from . import tflite_metadata_schema as md

    if len(blob) < 8 or blob[4:8] != METADATA_IDENTIFIER:
        log.warning("%s: the %s buffer is not TFLite metadata (identifier %r); ignoring it", path.name,
                    METADATA_NAME, blob[4:8])
        return TfliteMetadata()
    try:
        root = md.ModelMetadata.GetRootAs(blob, 0)
        name = root.Name().decode("utf-8") if root.Name() else None
        if not root.SubgraphMetadataLength():
            return TfliteMetadata(name)
        graph = root.SubgraphMetadata(0)
        mean, std = _normalization(md, graph.InputTensorMetadata(0)) if graph.InputTensorMetadataLength() else \
            (None, None)
        label_file = _label_file(md, graph.OutputTensorMetadata(0)) if graph.OutputTensorMetadataLength() else None
    except _DAMAGE as e:
        log.warning("%s: the TFLite metadata is damaged (%s); ignoring it", path.name, type(e).__name__)
        return TfliteMetadata()
    labels = _packed_labels(data, label_file, path) if label_file else None
    return TfliteMetadata(name, labels, mean, std)


def _normalization(md, tensor) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    for i in range(tensor.ProcessUnitsLength()):
        unit = tensor.ProcessUnits(i)
        if unit.OptionsType() != md.ProcessUnitOptions.NormalizationOptions:
            continue
        options = md.NormalizationOptions()
        table = unit.Options()
        options.Init(table.Bytes, table.Pos)
        mean = tuple(float(v) for v in options.MeanAsNumpy()) if options.MeanLength() else None
        std = tuple(float(v) for v in options.StdAsNumpy()) if options.StdLength() else None
        return mean, std
    return None, None


def _label_file(md, tensor) -> str | None:
    kinds = (md.AssociatedFileType.TENSOR_AXIS_LABELS, md.AssociatedFileType.TENSOR_VALUE_LABELS)
    for i in range(tensor.AssociatedFilesLength()):
        f = tensor.AssociatedFiles(i)
        if f.Type() in kinds and f.Name():
            return f.Name().decode("utf-8")
    return None


def _packed_labels(data: bytes, name: str, path: Path) -> tuple[str, ...] | None:
    """One class name per line of the packed label file (blank lines skipped); None with a warning when the file
    is missing, too large or not text."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = z.getinfo(name)
            if info.file_size > MAX_LABEL_FILE_BYTES:
                raise ValueError(f"{info.file_size} bytes, more than {MAX_LABEL_FILE_BYTES}")
            with z.open(info) as f:
                raw = f.read(MAX_LABEL_FILE_BYTES + 1)  # the size in the header may lie
            if len(raw) > MAX_LABEL_FILE_BYTES:
                raise ValueError(f"more than {MAX_LABEL_FILE_BYTES} bytes")
        text = raw.decode("utf-8")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: an encrypted member
        log.warning("%s: the metadata names the label file %r, which cannot be read from the model (%s); the "
                    "class names are not taken from it", path.name, name, str(e)[:120] or type(e).__name__)
        return None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


# ---- spec --------------------------------------------------------------------------------------------------


def sidecar_path(model: str | os.PathLike) -> Path:
    """Where the spec of `model` is kept: NAME.spec.json beside NAME.tflite."""
    model = Path(model)
    return model.with_name(model.stem + SIDECAR_SUFFIX)


def read_sidecar(model: str | os.PathLike) -> ModelSpec | None:
    """The spec in the sidecar beside `model`, or None when there is none (a bad one is a SpecError)."""
    sidecar = sidecar_path(model)
    return ModelSpec.load_json(sidecar) if sidecar.is_file() else None


def stored_spec(path: str | os.PathLike, model: TfliteModel | None = None) -> ModelSpec | None:
    """The spec a .tflite carries: its sidecar's, else the one embedded in it, else None. `model` is the model
    already read from `path` (read here when not given)."""
    sidecar = read_sidecar(path)
    if sidecar is not None:
        return sidecar
    return (model if model is not None else read_tflite(path)).spec


def embed_spec(data: bytes, spec: ModelSpec, *, source: str = "model") -> bytes:
    """The .tflite model `data` with `spec` embedded: its JSON in a buffer of its own, named by the metadata entry
    SPEC_METADATA_NAME (an entry of that name already there is replaced). The graph, the weights and the other
    metadata entries are copied as they are (the flatbuffers object API of the schema inside ai-edge-litert); files
    packed after the flatbuffer (TFLite metadata's label files) are not, so this is for models edgepix made (`edgepix
    export --format tflite`). Models whose weights lie after the flatbuffer (over 2 GB) are refused: repacking would
    move what their offsets point at."""
    import flatbuffers

    fb = import_litert("ai_edge_litert.schema_py_generated")
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ModelFormatError(f"{source}: expected a TFLite flatbuffer (identifier {TFLITE_IDENTIFIER.decode()})")
    try:
        model = fb.ModelT.InitFromPackedBuf(data, 0)
    except _DAMAGE as e:
        raise ModelFormatError(f"{source}: the TFLite flatbuffer is damaged ({type(e).__name__})") from None
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        raise ModelFormatError(f"{source}: its weights are stored after the flatbuffer (a model over 2 GB); "
                               "edgepix embeds specs in models that hold their weights inside")
    buffer = fb.BufferT()
    buffer.data = np.frombuffer(spec.to_json().encode("utf-8"), np.uint8)
    model.buffers = [*(model.buffers or []), buffer]
    entry = fb.MetadataT()
    entry.name, entry.buffer = SPEC_METADATA_NAME, len(model.buffers) - 1
    for old in model.metadata or []:
        if _text(old.name) == SPEC_METADATA_NAME:
            model.buffers[old.buffer].data = None  # the replaced spec's buffer stays (indices hold), emptied
    model.metadata = [*(m for m in model.metadata or [] if _text(m.name) != SPEC_METADATA_NAME), entry]
    builder = flatbuffers.Builder(len(data) + len(buffer.data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def spec_defaults(model: TfliteModel, task: Task) -> dict[str, Any]:
    """Spec fields the model's metadata and graph state, for a model without a sidecar: class names from the label
    file; the normalisation from the metadata, or, for a quantized uint8 image input, from its quantization (so
    that the integers the model receives are the pixels themselves, which is what such models are fed); for a
    segmenter, probabilities where the graph ends in a sigmoid (one channel) or a softmax."""
    fields: dict[str, Any] = {}
    meta = model.metadata
    if task is Task.SEGMENTATION and model.outputs:
        out, activation = model.outputs[0].meta, model.output_activations[0]
        one_channel = len(out.shape) == 4 and 1 in (out.dim(1), out.dim(3))
        if activation == "sigmoid" and one_channel:
            fields["output_kind"] = OutputKind.BINARY_PROBABILITY
        elif activation == "softmax":
            fields["output_kind"] = OutputKind.PROBABILITIES
    if meta.class_names:
        fields["class_names"] = meta.class_names
    image = model.inputs[0] if len(model.inputs) == 1 else None
    if image is not None and image.quantized and image.dtype == np.uint8:
        # real = (q - zero_point) * scale with q the pixel p: (p - zero_point) / (1 / scale)
        fields.update(scale=PIXEL_SCALE, mean=(image.zero_point * PIXEL_SCALE,) * 3,
                      std=((1.0 / image.scale) * PIXEL_SCALE,) * 3)
    elif meta.mean is not None and meta.std is not None:
        mean, std = _three(meta.mean), _three(meta.std)
        if mean is None or std is None:
            log.warning("%s: the metadata's normalisation has %d mean and %d std values, expected 1 or 3; "
                        "ignoring it", model.path.name, len(meta.mean), len(meta.std))
        else:
            fields.update(scale=PIXEL_SCALE, mean=tuple(m * PIXEL_SCALE for m in mean),
                          std=tuple(s * PIXEL_SCALE for s in std))
    return fields


def _three(values: tuple[float, ...]) -> tuple[float, float, float] | None:
    if len(values) == 1:
        return (values[0],) * 3
    return tuple(values) if len(values) == 3 else None  # type: ignore[return-value]
