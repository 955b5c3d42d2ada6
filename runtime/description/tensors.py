"""A model's tensors as the runtime sees them: name, numpy dtype and shape, from ONNX Runtime's, ONNX's or
TensorRT's own words. Part of the description: reading a model's header gives them without loading a backend."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import BackendError, ModelFormatError
from .onnxproto import ValueInfo

Dim = int | str | None


@dataclass(frozen=True)
class TensorMeta:
    """One model input or output: name, numpy dtype, shape (ints for fixed dims, a name or None for dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) and d >= 0 for d in self.shape)

    def dim(self, i: int) -> int | None:
        """The size of dimension `i` if it is fixed, else None."""
        d = self.shape[i]
        return d if isinstance(d, int) and d >= 0 else None

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) and d >= 0 else (d or "?") for d in self.shape)
        return f"{self.name}: {self.dtype.name} [{dims}]"


# ONNX Runtime's type strings ("tensor(float)") -> numpy dtypes.
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16,
    "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def dtype_from_ort(type_string: str) -> np.dtype:
    try:
        return np.dtype(_ORT_TYPES[type_string])
    except KeyError:
        raise BackendError(f"unsupported tensor type {type_string!r}; edgepix handles "
                           f"{', '.join(_ORT_TYPES)}") from None


# ONNX element types (runtime.onnxproto's numpy names) that edgepix can feed or read as numpy arrays.
_ONNX_NUMPY_TYPES = ("float32", "float16", "float64", "uint8", "int8", "uint16", "int16", "int32", "int64", "uint32",
                     "uint64", "bool")


def dtype_from_onnx(type_name: str | None, *, tensor: str, path: str | os.PathLike) -> np.dtype:
    """The numpy dtype of a tensor read by runtime.onnxproto (None, a non-tensor value: float32 is assumed).
    ModelFormatError for an element type numpy cannot hold (bfloat16, float8, int4, strings) or that ONNX does not
    define (a damaged file), instead of numpy's TypeError."""
    if type_name is None:
        return np.dtype(np.float32)
    if type_name not in _ONNX_NUMPY_TYPES:
        raise ModelFormatError(f"{Path(path).name}: tensor {tensor[:80]!r} has element type {type_name}; edgepix "
                               f"handles {', '.join(_ONNX_NUMPY_TYPES)}: re-export the model with one of them")
    return np.dtype(type_name)


def normalise_dim(d: Any) -> Dim:
    """ONNX Runtime reports dynamic dims as names or None, TensorRT as -1; keep ints >= 0, else a name or None."""
    if isinstance(d, int) and not isinstance(d, bool):
        return d if d >= 0 else None
    return d if isinstance(d, str) and d else None


def tensor_meta(v: ValueInfo, path: Path) -> TensorMeta:
    """The TensorMeta of a tensor read from an ONNX file's header."""
    return TensorMeta(v.name, dtype_from_onnx(v.dtype, tensor=v.name, path=path),
                      tuple(normalise_dim(d) for d in v.shape))
