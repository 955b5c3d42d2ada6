"""edgepix.runtime: what ships to a device. numpy, OpenCV and ONNX Runtime (or TensorRT); never torch.

The public API is re-exported lazily (PEP 562), so `import edgepix.runtime` costs almost nothing and importing a
name loads only the modules behind it:

    from edgepix.runtime import Segmenter, NoiseGenerator, ImageGenerator, tile_grid, load_backend
    from edgepix.runtime import Pipeline, PipelineOptions, StreamJob, run_stream
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Segmenter": "segmenter",
    "SegmentationResult": "segmenter",
    "StageTimes": "segmenter",
    "NoiseGenerator": "generator",
    "ImageGenerator": "generator",
    "tile_grid": "generator",
    "FrameProcessor": "processor",
    "SegmentThenGenerate": "processor",
    "Pipeline": "pipeline",
    "PipelineOptions": "pipeline",
    "StreamJob": "jobs",
    "run_stream": "jobs",
    "RenderOptions": "render",
    "RenderMode": "render",
    "Renderer": "render",
    "Backend": "backends",
    "load_backend": "backends",
    "available_backends": "backends",
    "backend_names": "backends",
    "ModelSpec": "spec",
    "EdgepixError": "errors",
    "ForeignModelWarning": "foreign",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    # the names __getattr__ below exports lazily
    from .backends import Backend, available_backends, backend_names, load_backend
    from .errors import EdgepixError
    from .foreign import ForeignModelWarning
    from .generator import ImageGenerator, NoiseGenerator, tile_grid
    from .jobs import StreamJob, run_stream
    from .pipeline import Pipeline, PipelineOptions
    from .processor import FrameProcessor, SegmentThenGenerate
    from .render import Renderer, RenderMode, RenderOptions
    from .segmenter import SegmentationResult, Segmenter, StageTimes
    from .spec import ModelSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgepix.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
