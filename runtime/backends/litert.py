"""The `litert` backend: .tflite models on Google's LiteRT interpreter (`ai-edge-litert`, formerly TensorFlow Lite),
as TF Hub, MediaPipe, Coral and the LiteRT model zoos ship them.

XNNPACK, LiteRT's CPU delegate, is on (the interpreter's default op resolver applies it); `xnnpack=False` runs the
builtin kernels alone, which lack some ops XNNPACK provides (MediaPipe's custom Convolution2DTransposeBias).
`threads` is the interpreter's `num_threads` (None: LiteRT's own default). A dynamic batch (a -1 in the input's
shape signature) is served by resizing the input and re-allocating the interpreter's tensors when the batch
changes. Quantized inputs and outputs (uint8/int8 with a scale) are seen as float32: `infer` quantizes real values
with the tensor's scale and zero point (round, clip to the integer range) and dequantizes the outputs, so the
Segmenter and the parity gate feed and read a quantized model as they do a float one.

Threads: one interpreter must not be called from two threads at once (LiteRT documents it: the interpreter holds
the tensors `set_tensor` fills and `invoke` computes), so `thread_safe` is False and the stream pipeline gives each
worker an instance of its own.

The spec comes from `NAME.spec.json` beside the model, else the one embedded in it (description.tflite); `import
ai_edge_litert` happens when a backend is created, never when edgepix.runtime is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..core.errors import BackendError, ModelFormatError
from ..description.spec import ModelSpec
from ..description.tflite import TfliteTensor, check_tflite_file, import_litert, stored_spec, tflite_tensor
from .base import Backend


@dataclass(frozen=True, kw_only=True)
class LiteRTOptions:
    threads: int | None = None  # the interpreter's num_threads; None: LiteRT's default
    xnnpack: bool = True  # XNNPACK delegate (LiteRT's default); False: the builtin kernels only

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise BackendError(f"threads: expected a positive integer or None, got {self.threads!r}")
        if not isinstance(self.xnnpack, bool):
            raise BackendError(f"xnnpack: expected true or false, got {self.xnnpack!r}")


class LiteRTBackend(Backend):
    """One LiteRT interpreter for one .tflite model."""

    name = "litert"
    options_type = LiteRTOptions
    thread_safe = False  # the interpreter's tensors are one state: set_tensor + invoke + get_tensor

    def __init__(self, path: str | os.PathLike, *, options: LiteRTOptions | None = None) -> None:
        super().__init__(path)
        self.options = options if options is not None else LiteRTOptions()
        check_tflite_file(self.path)  # ModelFormatError for a missing or non-TFLite file, before LiteRT reads it
        module = import_litert("ai_edge_litert.interpreter")
        self.version = getattr(import_litert(), "__version__", "?")
        resolver = (module.OpResolverType.AUTO if self.options.xnnpack
                    else module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        try:
            self.interpreter = module.Interpreter(model_path=str(self.path), num_threads=self.options.threads,
                                                  experimental_op_resolver_type=resolver)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:  # LiteRT's own words: unresolved ops, bad shapes, bad files
            raise ModelFormatError(f"{self.path}: LiteRT cannot load this model: {_first_line(e)}"
                                   + ("; it may need XNNPACK (xnnpack=True)" if "custom op" in str(e)
                                      and not self.options.xnnpack else "")) from e
        source = self.path.name
        self._inputs = tuple(_tensor(d, source) for d in self.interpreter.get_input_details())
        self._outputs = tuple(_tensor(d, source) for d in self.interpreter.get_output_details())
        self.inputs = tuple(t.meta for t in self._inputs)
        self.outputs = tuple(t.meta for t in self._outputs)
        self._shapes = {t.index: tuple(d["shape"]) for t, d in zip(self._inputs,
                                                                    self.interpreter.get_input_details())}

    @property
    def spec(self) -> ModelSpec | None:
        """The spec in NAME.spec.json beside the model, else the one embedded in it, or None (the metadata and
        shapes then give one: runtime.tasks.model)."""
        return stored_spec(self.path)

    @property
    def description(self) -> str:
        threads = self.options.threads or "default"
        return (f"litert (LiteRT {self.version}, XNNPACK {'on' if self.options.xnnpack else 'off'}, "
                f"{threads} threads)")

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interpreter
        resized = False
        for t in self._inputs:
            shape = tuple(feed[t.name].shape)
            if shape != self._shapes[t.index]:  # a new batch (or size) of a dynamic input
                it.resize_tensor_input(t.index, list(shape))
                self._shapes[t.index] = shape
                resized = True
        try:
            if resized:
                it.allocate_tensors()
            for t in self._inputs:
                it.set_tensor(t.index, _to_stored(feed[t.name], t))
            it.invoke()
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"litert: inference on {self.path.name} failed: {_first_line(e)}") from e
        return {t.name: _to_real(it.get_tensor(t.index), t) for t in self._outputs}

    def close_impl(self) -> None:
        self.interpreter = None


def _tensor(details: dict, source: str) -> TfliteTensor:
    q = details.get("quantization_parameters") or {}
    return tflite_tensor(details["name"], int(details["index"]), details["dtype"], details["shape"],
                         details.get("shape_signature"), q.get("scales"), q.get("zero_points"), source=source)


def _to_stored(x: np.ndarray, t: TfliteTensor) -> np.ndarray:
    """Real values -> the integers a quantized input holds (q = round(x / scale) + zero point, clipped)."""
    if not t.quantized:
        return np.ascontiguousarray(x)
    info = np.iinfo(t.dtype)
    q = np.round(x.astype(np.float32) / np.float32(t.scale)) + t.zero_point
    return np.clip(q, info.min, info.max).astype(t.dtype)


def _to_real(y: np.ndarray, t: TfliteTensor) -> np.ndarray:
    """A quantized output's integers -> real values ((q - zero point) x scale); others as they are."""
    if not t.quantized:
        return y
    return ((y.astype(np.float32) - np.float32(t.zero_point)) * np.float32(t.scale)).astype(np.float32)


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
