"""What an ONNX file holds (inputs, outputs, custom metadata, the edgepix spec), read through ONNX Runtime.

The runtime ships without the `onnx` package, so ONNX Runtime's model metadata is the way to reach the spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelFormatError, require
from .onnxproto import check_model_path, read_onnx_header
from .spec import ModelSpec


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]  # ints for fixed dims, names or None for dynamic ones
    dtype: str  # ONNX Runtime's type string, e.g. "tensor(float)"

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    producer: str
    graph_name: str
    spec: ModelSpec | None


def open_session(path: str | os.PathLike, *, providers: list | None = None, options=None):
    """Create an ONNX Runtime session, turning ONNX Runtime's failures into one-line ModelFormatErrors."""
    path = check_model_path(path)
    ort = require("onnxruntime", extra="cpu", purpose="Reading ONNX models")
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own pybind exception types; keep the first line of its reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{path} is not an ONNX model ONNX Runtime can load: {reason}") from e


def read_onnx_info(path: str | os.PathLike) -> OnnxInfo:
    # The strict header reader first: a damaged file (a name or metadata that is not UTF-8, a truncated or
    # corrupted message) fails here with one line, before ONNX Runtime parses it.
    read_onnx_header(path)
    session = open_session(path)

    def tensors(items) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(t.name, tuple(t.shape), t.type) for t in items)

    try:
        meta = session.get_modelmeta()
        metadata = dict(meta.custom_metadata_map)
        inputs, outputs = tensors(session.get_inputs()), tensors(session.get_outputs())
        producer, graph_name = meta.producer_name, meta.graph_name
    except UnicodeDecodeError as e:  # ONNX Runtime hands strings to Python as UTF-8
        raise ModelFormatError(f"{path} is damaged: a name or metadata string is not valid UTF-8 ({e.reason} at "
                               f"offset {e.start}); copy or export it again") from None
    return OnnxInfo(
        path=Path(path),
        inputs=inputs,
        outputs=outputs,
        metadata=metadata,
        producer=producer,
        graph_name=graph_name,
        spec=ModelSpec.from_onnx_metadata(metadata, source=str(path)),
    )
