"""Inference backends behind one interface (see `base.Backend`) and a registry of names (see `registry`).

    from edgepix.runtime.backends import load_backend
    with load_backend("model.onnx", "auto", threads=2) as backend:
        outputs = backend.infer({"images": batch})

The implementations (ONNX Runtime, OpenCV, OpenVINO, Triton, TensorRT in its own subpackage) are imported only when
a backend is loaded; profile holds the per-machine measurements `edgepix tune` records and `auto` follows.

May import: core, description.
"""

from ..description.tensors import TensorMeta
from .base import Backend, BackendOptionError
from .registry import (
    AUTO_ORDER_ONNX,
    available_backends,
    backend_class,
    backend_names,
    backend_status,
    load_backend,
    register_backend,
)

__all__ = [
    "AUTO_ORDER_ONNX", "Backend", "BackendOptionError", "TensorMeta", "available_backends", "backend_class",
    "backend_names", "backend_status", "load_backend", "register_backend",
]
