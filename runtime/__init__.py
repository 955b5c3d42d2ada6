"""edgepix.runtime: what ships to a device. numpy, OpenCV and ONNX Runtime (or TensorRT); never torch.

The public API is re-exported lazily (PEP 562), so `import edgepix.runtime` costs almost nothing and importing a
name loads only the modules behind it:

    from edgepix.runtime import Segmenter, NoiseGenerator, ImageGenerator, tile_grid, load_backend
    from edgepix.runtime import Pipeline, PipelineOptions, StreamJob, run_stream
    from edgepix.runtime import open_source, open_sources, SourceOptions, Frame, make_sink, Sink

The modules are grouped by the data's way through the runtime, each group a package whose docstring says what it
holds and what it may import: core -> description -> data -> backends -> tasks -> streams -> batch -> cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Segmenter": "tasks.segmenter",
    "SegmentationResult": "tasks.segmenter",
    "StageTimes": "tasks.segmenter",
    "NoiseGenerator": "tasks.generator",
    "ImageGenerator": "tasks.generator",
    "tile_grid": "tasks.generator",
    "FrameProcessor": "tasks.processor",
    "SegmentThenGenerate": "tasks.processor",
    "Pipeline": "streams.pipeline",
    "PipelineOptions": "streams.pipeline",
    "StreamJob": "streams.jobs",
    "Frame": "streams.sources",
    "SourceOptions": "streams.sources",
    "open_source": "streams.sources",
    "open_sources": "streams.sources",
    "Sink": "streams.sinks",
    "make_sink": "streams.sinks",
    "run_stream": "streams.jobs",
    "RenderOptions": "tasks.render",
    "RenderMode": "tasks.render",
    "Renderer": "tasks.render",
    "Backend": "backends",
    "load_backend": "backends",
    "available_backends": "backends",
    "backend_names": "backends",
    "ModelSpec": "description.spec",
    "EdgepixError": "core.errors",
    "ForeignModelWarning": "description.foreign",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    # the names __getattr__ below exports lazily
    from .backends import Backend, available_backends, backend_names, load_backend
    from .core.errors import EdgepixError
    from .description.foreign import ForeignModelWarning
    from .description.spec import ModelSpec
    from .streams.jobs import StreamJob, run_stream
    from .streams.pipeline import Pipeline, PipelineOptions
    from .streams.sinks import Sink, make_sink
    from .streams.sources import Frame, SourceOptions, open_source, open_sources
    from .tasks.generator import ImageGenerator, NoiseGenerator, tile_grid
    from .tasks.processor import FrameProcessor, SegmentThenGenerate
    from .tasks.render import Renderer, RenderMode, RenderOptions
    from .tasks.segmenter import SegmentationResult, Segmenter, StageTimes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgepix.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
