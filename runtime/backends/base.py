"""The backend interface: load a model, run validated inference, release resources.

Modelled on Polygraphy's `BaseRunner`: the public `infer()` checks what enters (names, dtypes, shapes) and times the
call; subclasses implement only `infer_impl()`. A backend owns its session (ONNX Runtime session, OpenCV net,
TensorRT context): `close()` or leaving a `with` block frees it, and using a closed backend is an error rather
than a crash. Instances are not thread-safe (ONNX Runtime sessions are, OpenCV nets and IOBindings are not): give
each thread its own backend or serialise calls.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import BackendError, InputError, ModelFormatError, unknown_name
from ..spec import ModelSpec

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


class BackendOptionError(BackendError):
    """An option given to a backend is unknown or has a bad value."""


def options_from_kwargs(options_type: type, backend: str, kwargs: Mapping[str, Any]):
    """Build a typed options dataclass from keyword arguments; an unknown keyword names the valid ones."""
    names = [f.name for f in dataclasses.fields(options_type)]
    for key in kwargs:
        if key not in names:
            raise BackendOptionError(unknown_name(f"option for backend {backend!r}:", key, names))
    try:
        return options_type(**kwargs)
    except BackendError as e:
        raise BackendOptionError(f"backend {backend!r}: {e}") from e


class Backend(abc.ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs."""

    #: registry name, e.g. "ort-cpu"
    name: ClassVar[str] = ""
    #: the options dataclass `load(**options)` builds
    options_type: ClassVar[type | None] = None
    #: whether `load(fuse_argmax=...)` can end the graph in ArgMax + Cast(uint8) (see runtime.onnxedit)
    supports_fused_argmax: ClassVar[bool] = False

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.inputs: tuple[TensorMeta, ...] = ()
        self.outputs: tuple[TensorMeta, ...] = ()
        self.metadata: dict[str, str] = {}  # the ONNX file's custom metadata (or an engine manifest's)
        self.last_infer_ms: float = 0.0
        # The name of the uint8 class-map output that replaced a logits output, when the argmax was fused.
        self.fused_argmax: str | None = None
        self._closed = False

    # ---- construction --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, fuse_argmax: str | None = None, **options: Any) -> Backend:
        """Load `path` with keyword options that become this backend's typed options dataclass.

        `fuse_argmax`: the name of a logits output (N, C, H, W) to replace by its uint8 class map (N, H, W)
        inside the backend's graph, where the backend supports it (`supports_fused_argmax`); others ignore it.
        Check `fused_argmax` on the result: the name of the class-map output, or None if nothing was fused.
        """
        kwargs: dict[str, Any] = {}
        if fuse_argmax is not None and cls.supports_fused_argmax:
            kwargs["fuse_argmax"] = fuse_argmax
        if cls.options_type is None:
            if options:
                raise BackendOptionError(f"backend {cls.name!r} takes no options, got {', '.join(sorted(options))}")
            return cls(path, **kwargs)  # type: ignore[call-arg]
        return cls(path, options=options_from_kwargs(cls.options_type, cls.name, options), **kwargs)  # type: ignore[call-arg]

    # ---- description -----------------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec | None:
        """The edgepix spec carried by the model, or None for a foreign model."""
        return ModelSpec.from_onnx_metadata(self.metadata, source=str(self.path))

    @property
    def description(self) -> str:
        """What actually runs, e.g. 'ort-cpu (CPUExecutionProvider, 2 threads)'. Subclasses add details."""
        return self.name

    def input(self, name: str | None = None) -> TensorMeta:
        if name is None:
            if len(self.inputs) != 1:
                raise InputError(
                    f"the model has {len(self.inputs)} inputs ({', '.join(t.name for t in self.inputs)}); "
                    "pass a dict name -> array")
            return self.inputs[0]
        for t in self.inputs:
            if t.name == name:
                return t
        raise InputError(unknown_name("input", name, [t.name for t in self.inputs]))

    def output(self, name: str) -> TensorMeta:
        for t in self.outputs:
            if t.name == name:
                return t
        raise BackendError(unknown_name("output", name, [t.name for t in self.outputs]))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.description} {self.path.name} {state}>"

    # ---- inference ---------------------------------------------------------------------------------------

    def infer(self, feed: Mapping[str, np.ndarray] | np.ndarray, *, check: bool = True) -> dict[str, np.ndarray]:
        """Run the model. `feed` is a dict input name -> array, or one array for a single-input model.

        With `check=True` (the default) names, dtypes and shapes are validated first and a mismatch raises
        InputError saying what was expected and what was found; pass `check=False` in a hot loop whose inputs
        were validated once. Returns a dict output name -> array (owned by the caller).
        """
        if self._closed:
            raise BackendError(f"backend {self.name!r} for {self.path.name} is closed; load the model again")
        if isinstance(feed, np.ndarray):
            feed = {self.input().name: feed}
        if check:
            self.check_feed(feed)
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.last_infer_ms = (time.perf_counter() - start) * 1e3
        return out

    @abc.abstractmethod
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on an already-validated feed."""

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        expected = [t.name for t in self.inputs]
        missing = [n for n in expected if n not in feed]
        extra = [n for n in feed if n not in expected]
        if missing or extra:
            raise InputError(
                f"inputs: expected {expected}, got {list(feed)}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
        for meta in self.inputs:
            array = feed[meta.name]
            if not isinstance(array, np.ndarray):
                raise InputError(f"input {meta.name!r}: expected a numpy array, got {type(array).__name__}")
            if array.dtype != meta.dtype:
                raise InputError(
                    f"input {meta.name!r}: expected dtype {meta.dtype.name}, got {array.dtype.name}; "
                    f"convert with .astype(np.{meta.dtype.name})")
            if array.ndim != len(meta.shape) or any(
                    isinstance(d, int) and d >= 0 and d != s for d, s in zip(meta.shape, array.shape)):
                raise InputError(f"input {meta.name!r}: expected shape {_shape(meta.shape)}, got {tuple(array.shape)}")
            if array.size == 0:
                raise InputError(f"input {meta.name!r}: expected a non-empty array, got shape {tuple(array.shape)}")

    # ---- resources -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the session and any device memory. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.close_impl()

    def close_impl(self) -> None:  # noqa: B027  (an optional hook: a backend that holds nothing keeps the no-op)
        """Subclasses drop their sessions here."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else (d or "?") for d in shape) + ")"
