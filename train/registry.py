"""One model registry for every architecture edgepix trains (segmentation and generation alike).

Modelled on timm's `_registry.py`/`_factory.py`: `@register_model` on a constructor function, `create_model(name,
**kwargs)`, `list_models(pattern)`. Unknown names raise with the valid list and close matches; default keyword
arguments are copied before use so that one caller cannot change them for the next.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from edgepix.runtime.errors import EdgepixError, unknown_name


@dataclass(frozen=True)
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    task: str  # "segmentation", "generation-noise", "generation-image" or "discriminator"
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str, description: str = "", **defaults: Any):
    """Decorator: register `fn(**kwargs) -> nn.Module` under `name` with default keyword arguments."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, task, dict(defaults), description or (fn.__doc__ or "").strip())
        return fn

    return decorate


def _ensure_builtin_models() -> None:
    # Importing the model modules runs their @register_model decorators.
    from . import models  # noqa: F401


def get_entry(name: str) -> ModelEntry:
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise EdgepixError(unknown_name("model", name, _REGISTRY))
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    entry = get_entry(name)
    arguments = copy.deepcopy(entry.defaults)
    arguments.update(kwargs)
    return entry.constructor(**arguments)


def list_models(pattern: str = "*", *, task: str | None = None) -> list[str]:
    _ensure_builtin_models()
    return sorted(n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (task is None or e.task == task))
