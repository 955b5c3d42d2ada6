"""The backend interface: load a model, run validated inference, release resources.

Modelled on Polygraphy's `BaseRunner`: the public `infer()` checks what enters (names, dtypes, shapes) and times the
call; subclasses implement only `infer_impl()`. A backend owns its session (ONNX Runtime session, OpenCV net,
TensorRT context): `close()` or leaving a `with` block frees it, and using a closed backend is an error rather
than a crash.

Threads: each backend says whether one instance may be called from two threads at once (`thread_safe`, from what
its library documents: ONNX Runtime's `InferenceSession.run` is thread-safe, an IOBinding is not; OpenCV dnn nets,
OpenVINO infer requests and TensorRT execution contexts are not). Where it is not, give each thread its own
instance (the stream pipeline does: runtime.streams.pipeline) or serialise the calls. A thread that calls a backend
calls `bind_thread()` once first: the CUDA runtime's current device is per thread (device 0 in a new one).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import os
import time
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..core.errors import BackendError, InputError, unknown_name
from ..description.onnxedit import ClassMapFusion, as_fusion
from ..description.spec import ModelSpec
from ..description.tensors import Dim, TensorMeta


class BackendOptionError(BackendError, InputError):
    """An option given to a backend is unknown or has a bad value (or type): a caller's mistake, so an InputError
    too."""


def options_from_kwargs(options_type: type, backend: str, kwargs: Mapping[str, Any]):
    """Build a typed options dataclass from keyword arguments; an unknown keyword names the valid ones, and a value
    of the wrong type (a string for a thread count, a number for a switch) is refused in one line before the
    dataclass sees it."""
    names = [f.name for f in dataclasses.fields(options_type)]
    for key in kwargs:
        if key not in names:
            raise BackendOptionError(unknown_name(f"option for backend {backend!r}:", key, names))
    hints = typing.get_type_hints(options_type)
    for key, value in kwargs.items():
        expected = _accepted_types(hints[key])
        if expected and not any(_is_a(value, t) for t in expected):
            raise BackendOptionError(f"backend {backend!r}: option {key}: expected "
                                     f"{' or '.join(_type_name(t) for t in expected)}, got {value!r:.80} "
                                     f"({type(value).__name__})")
    try:
        return options_type(**kwargs)
    except BackendError as e:
        raise BackendOptionError(f"backend {backend!r}: {e}") from e


def _accepted_types(annotation: Any) -> tuple[Any, ...]:
    """The types an option's annotation accepts (`int | None` -> (int, NoneType)); () when it cannot say."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
    else:
        members = (annotation,)
    known = (bool, int, float, str, Path, type(None))
    if all(t in known or (isinstance(t, type) and issubclass(t, enum.Enum)) for t in members):
        return members
    return ()


def _is_a(value: Any, t: Any) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is Path:
        return isinstance(value, (str, os.PathLike))
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return isinstance(value, (str, t))  # the options' own __post_init__ checks the name
    return isinstance(value, t)


def _type_name(t: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
             type(None): "None"}
    return names.get(t) or f"one of {', '.join(repr(m.value) for m in t)}"


class Backend(abc.ABC):
    """A loaded model that maps named numpy inputs to named numpy outputs."""

    #: registry name, e.g. "ort-cpu"
    name: ClassVar[str] = ""
    #: the options dataclass `load(**options)` builds
    options_type: ClassVar[type | None] = None
    #: whether `load(fuse_argmax=...)` can end the graph in ArgMax + Cast(uint8) (see runtime.description.onnxedit)
    supports_fused_argmax: ClassVar[bool] = False
    #: whether one instance may be called from two threads at once. A class attribute; a backend whose answer
    #: depends on its options (ONNX Runtime with or without IOBinding) makes it a property. False unless the
    #: library documents concurrent calls as safe.
    thread_safe: bool = False

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
    def load(cls, path: str | os.PathLike, *, fuse_argmax: str | ClassMapFusion | None = None,
             **options: Any) -> Backend:
        """Load `path` with keyword options that become this backend's typed options dataclass.

        `fuse_argmax`: what to replace by its uint8 class map inside the backend's graph, where the backend
        supports it (`supports_fused_argmax`; others ignore it): a ClassMapFusion (description.onnxedit: ArgMax over
        the class axis, or a threshold for a binary output), or the name of logits (N, C, H, W). Check
        `fused_argmax` on the result: the name of the class-map output, or None if nothing was fused.
        """
        fuse_argmax = as_fusion(fuse_argmax)  # InputError for anything else (a bool, a number)
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

    def bind_thread(self) -> None:  # noqa: B027  (an optional hook: most backends need nothing per thread)
        """Make the calling thread ready to call `infer`; called once by each thread that will call it, before its
        first call. The native TensorRT backend makes the device it was created on current: CUDA's current device
        is per thread, and a new thread starts on device 0 (ONNX Runtime's CUDA provider sets its device itself)."""

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
