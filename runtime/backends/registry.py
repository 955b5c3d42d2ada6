"""The backend registry: names -> backend classes, what is available on this machine, and `auto`.

| name       | runs                                              | loads          |
|------------|---------------------------------------------------|----------------|
| `ort-trt`  | ONNX Runtime, TensorRT execution provider         | .onnx          |
| `ort-cuda` | ONNX Runtime, CUDA execution provider + IOBinding | .onnx          |
| `ort-cpu`  | ONNX Runtime, CPU execution provider              | .onnx          |
| `opencv`   | OpenCV dnn (CUDA target when OpenCV has CUDA)     | .onnx          |
| `openvino` | OpenVINO runtime, CPU device (GPU/NPU unverified) | .onnx          |
| `tensorrt` | native TensorRT (runtime/backends/tensorrt/backend.py)    | .engine / .plan|
| `triton`   | a Triton (KServe v2) server, over HTTP or gRPC    | a model name   |
| `litert`   | LiteRT (ai-edge-litert) interpreter, XNNPACK      | .tflite        |

Backend modules are imported only when a backend is loaded, so `import edgepix.runtime` stays light.
`auto` picks, for an ONNX file, the first available of ort-trt > ort-cuda > ort-cpu > opencv (by what
`onnxruntime.get_available_providers()` offers) and logs what it chose; for an engine file, `tensorrt`; for a
.tflite file, `litert` (the only backend that runs one; it never runs ONNX files).
`openvino` is never picked by `auto`: it is there to be asked for (and measured with `edgepix bench --peers`).
A backend that is registered but cannot run here raises BackendError with the reason and the available names.

The `tensorrt` backend (`TensorRTBackend`) loads a serialized engine and its `<engine>.json` manifest; it needs the
`tensorrt` and cuda-python packages, and says which one is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import BackendError, InputError, ModelFormatError, unknown_name
from ..core.formats import ENGINE_SUFFIXES, ONNX_SUFFIXES, TFLITE_SUFFIXES
from ..description.onnxedit import ClassMapFusion, as_fusion
from .base import Backend, BackendOptionError

log = logging.getLogger("edgepix.runtime.backends")



@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str  # absolute module path of the implementation
    class_name: str
    summary: str
    suffixes: tuple[str, ...]  # the model files it loads
    unavailable: Callable[[], str | None]  # None when it can run here, else why not


def _ort_providers() -> list[str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _ort_provider_check(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        providers = _ort_providers()
        if providers is None:
            return "onnxruntime is not installed (pip install 'edgepix[cpu]', or 'edgepix[gpu]' on NVIDIA)"
        if provider not in providers:
            return (f"this onnxruntime has no {provider} (it offers {', '.join(providers)}); "
                    + ("install onnxruntime-gpu: pip install 'edgepix[gpu]'" if provider != "CPUExecutionProvider"
                       else "reinstall onnxruntime"))
        return None

    return check


def _opencv_check() -> str | None:
    if importlib.util.find_spec("cv2") is None:
        return "OpenCV is not installed (pip install opencv-python)"
    import cv2

    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromONNX"):
        return f"this OpenCV {cv2.__version__} was built without the dnn module"
    return None


def _openvino_check() -> str | None:
    if not _module_exists("openvino"):
        return "the Python package 'openvino' is not installed (pip install 'edgepix[openvino]')"
    return None


TENSORRT_MODULE = "edgepix.runtime.backends.tensorrt.backend"


def _tensorrt_check() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the Python package 'tensorrt' is not installed (pip install 'edgepix[gpu]'; JetPack ships it)"
    if not any(_module_exists(m) for m in ("cuda.bindings.runtime", "cuda.cudart")):
        return ("the Python package 'cuda-python' is not installed (pip install 'edgepix[gpu]'); the tensorrt "
                "backend's device buffers and streams use it")
    return None


def _triton_check() -> str | None:
    if not any(_module_exists(m) for m in ("tritonclient.http", "tritonclient.grpc")):
        return "the Python package 'tritonclient' is not installed (pip install 'edgepix[triton]')"
    return None


def _litert_check() -> str | None:
    if not _module_exists("ai_edge_litert.interpreter"):
        return "the Python package 'ai-edge-litert' is not installed (pip install 'edgepix[litert]')"
    return None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a missing parent package
        return False


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> None:
    if entry.name in _REGISTRY or entry.name == "auto":
        raise ValueError(f"backend {entry.name!r} is registered twice (or reserved)")
    _REGISTRY[entry.name] = entry


for _entry in (
    BackendEntry("ort-trt", "edgepix.runtime.backends.ort", "OrtTensorrtBackend",
                 "ONNX Runtime, TensorRT execution provider (engine cache, FP16 switch)", ONNX_SUFFIXES,
                 _ort_provider_check("TensorrtExecutionProvider")),
    BackendEntry("ort-cuda", "edgepix.runtime.backends.ort", "OrtCudaBackend",
                 "ONNX Runtime, CUDA execution provider with IOBinding", ONNX_SUFFIXES,
                 _ort_provider_check("CUDAExecutionProvider")),
    BackendEntry("ort-cpu", "edgepix.runtime.backends.ort", "OrtCpuBackend",
                 "ONNX Runtime, CPU execution provider", ONNX_SUFFIXES, _ort_provider_check("CPUExecutionProvider")),
    BackendEntry("opencv", "edgepix.runtime.backends.opencv", "OpenCVBackend",
                 "OpenCV dnn (CUDA target when OpenCV has CUDA)", ONNX_SUFFIXES, _opencv_check),
    BackendEntry("openvino", "edgepix.runtime.backends.openvino", "OpenVINOBackend",
                 "OpenVINO runtime, CPU device (GPU and NPU devices by option, not verified)", ONNX_SUFFIXES,
                 _openvino_check),
    BackendEntry("tensorrt", TENSORRT_MODULE, "TensorRTBackend",
                 "native TensorRT engine (serialized .engine with its manifest)", ENGINE_SUFFIXES, _tensorrt_check),
    # Loads a model by its name on the server: no file suffix to check.
    BackendEntry("triton", "edgepix.runtime.backends.triton", "TritonBackend",
                 "a Triton Inference Server model (HTTP or gRPC, url=HOST:PORT)", (), _triton_check),
    BackendEntry("litert", "edgepix.runtime.backends.litert", "LiteRTBackend",
                 "LiteRT interpreter (ai-edge-litert), XNNPACK delegate", TFLITE_SUFFIXES, _litert_check),
):
    register_backend(_entry)

#: the order `auto` tries for ONNX files: fastest first
AUTO_ORDER_ONNX = ("ort-trt", "ort-cuda", "ort-cpu", "opencv")


def backend_names() -> list[str]:
    """Every registered name (available here or not), plus 'auto'."""
    return ["auto", *_REGISTRY]


def backend_status() -> dict[str, str | None]:
    """name -> None when it can run here, else the reason it cannot."""
    return {name: entry.unavailable() for name, entry in _REGISTRY.items()}


def available_backends() -> list[str]:
    return [name for name, reason in backend_status().items() if reason is None]


def get_entry(name: str) -> BackendEntry:
    if name not in _REGISTRY:
        raise BackendError(unknown_name("backend", name, backend_names()))
    return _REGISTRY[name]


def backend_class(name: str) -> type[Backend]:
    """The class behind `name`; BackendError if it is unknown or cannot run on this machine."""
    entry = get_entry(name)
    reason = entry.unavailable()
    if reason is not None:
        available = available_backends()
        raise BackendError(f"backend {name!r} is not available here: {reason}. "
                           f"Available: {', '.join(available) or 'none'} (see `edgepix doctor`)")
    module = importlib.import_module(entry.module)
    return getattr(module, entry.class_name)


def candidates(name: str, path: str | os.PathLike, *, threads: int | None = None) -> list[str]:
    """The backend names to try for `name` ('auto' or a registered name) and the model at `path`; `threads`: the
    intra-op threads the model will run with (None: the backend's default), which a tune measurement must match."""
    suffix = Path(path).suffix.lower()
    if name != "auto":
        entry = get_entry(name)
        if entry.suffixes and suffix and suffix not in entry.suffixes:
            raise BackendError(f"backend {name!r} loads {'/'.join(entry.suffixes)} files, got {Path(path).name}; "
                               + ("use backend 'tensorrt' for engines" if suffix in ENGINE_SUFFIXES else
                                  "use backend 'litert' for .tflite files" if suffix in TFLITE_SUFFIXES else
                                  "use an ort-*, opencv or openvino backend for .onnx files"))
        return [name]
    if suffix in ENGINE_SUFFIXES:
        return ["tensorrt"]
    if suffix in TFLITE_SUFFIXES:  # nothing else runs TFLite; its own check says what to install
        return ["litert"]
    if suffix not in ONNX_SUFFIXES:
        suffixes = ", ".join(ONNX_SUFFIXES + ENGINE_SUFFIXES + TFLITE_SUFFIXES)
        raise ModelFormatError(f"{Path(path).name}: expected a model file ({suffixes})"
                               f", got '{suffix or 'no suffix'}'")
    status = backend_status()
    chosen = [n for n in AUTO_ORDER_ONNX if status[n] is None]
    if not chosen:
        raise BackendError("no backend can run ONNX models here: " + "; ".join(
            f"{n}: {status[n]}" for n in AUTO_ORDER_ONNX) + " (install onnxruntime or OpenCV)")
    # A measured choice for this file on this machine as it is now (edgepix tune) goes first; the fixed order follows.
    from .profile import preferred_backend

    measured = preferred_backend(path, threads=threads)
    if measured is not None and measured in status and status[measured] is None:
        log.info("backend auto: %s measured fastest for %s on this machine (edgepix tune)", measured, Path(path).name)
        return [measured] + [n for n in chosen if n != measured]
    return chosen


def load_backend(path: str | os.PathLike, backend: str = "auto", *, fuse_argmax: str | ClassMapFusion | None = None,
                 **options: Any) -> Backend:
    """Load `path` with the named backend (or `auto`), passing `options` to its options dataclass.

    `fuse_argmax` says which output to turn into a uint8 class map inside the graph where the backend can, and how
    (a ClassMapFusion, or a logits output's name; see `Backend.load`). Arguments of the wrong type (a bool for
    `fuse_argmax`, a number for `backend` or `path`, a string for `threads`) raise InputError in one line.

    With `auto`, a GPU backend whose execution provider is listed but fails to start (missing CUDA or TensorRT
    libraries) is skipped with a warning and the next one is tried; the choice is logged at INFO level.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path: expected a model file's path (str or os.PathLike), got {path!r:.80} "
                         f"({type(path).__name__})")
    if not isinstance(backend, str):
        raise InputError(f"backend: expected a backend name (a string: {', '.join(backend_names())}), got "
                         f"{backend!r:.80} ({type(backend).__name__})")
    fuse_argmax = as_fusion(fuse_argmax)
    names = candidates(backend, path, threads=options.get("threads"))
    errors: list[str] = []
    for i, name in enumerate(names):
        cls = backend_class(name)
        try:
            loaded = cls.load(path, fuse_argmax=fuse_argmax, **options)
        except BackendError as e:
            if backend != "auto" or i == len(names) - 1 or isinstance(e, BackendOptionError):
                raise
            log.warning("backend auto: %s could not start (%s); trying %s", name, e, names[i + 1])
            errors.append(f"{name}: {e}")
            continue
        if backend == "auto":
            skipped = f" after {'; '.join(errors)}" if errors else ""
            log.info("backend auto: chose %s for %s (available: %s)%s", loaded.description, Path(path).name,
                     ", ".join(names), skipped)
        return loaded
    raise AssertionError("unreachable")
