"""One model registry for every architecture edgepix trains (segmentation and generation alike): the factory.

Modelled on timm's `_registry.py`/`_factory.py`: `@register_model` on a constructor function, `create_model(name,
**kwargs)`, `list_models(pattern)`. Unknown names raise with the valid list and close matches; default keyword
arguments are copied before use so that one caller cannot change them for the next. The table and the decorator
live in `models/catalog.py`, which the model modules import; this module imports the models to fill it.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from torch import nn

from edgepix.runtime.core.errors import EdgepixError, unknown_name

from .models.catalog import _PREFIXES, _REGISTRY, ModelEntry


def _ensure_builtin_models() -> None:
    # Importing the model modules runs their @register_model decorators.
    from . import models  # noqa: F401


def get_entry(name: str) -> ModelEntry:
    _ensure_builtin_models()
    for prefix, resolve in _PREFIXES.items():
        if name.startswith(prefix):
            return resolve(name)
    if name not in _REGISTRY:
        listed = [n for n, e in _REGISTRY.items() if e.listed]
        raise EdgepixError(unknown_name("model", name, [*listed, *(f"{p}PATH" for p in _PREFIXES)]))
    return _REGISTRY[name]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    entry = get_entry(name)
    arguments = copy.deepcopy(entry.defaults)
    arguments.update(kwargs)
    return entry.constructor(**arguments)


def checkpoint_arch(model: nn.Module, name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The (arch, arch_kwargs) a checkpoint records to rebuild `model`: the model's own recipe when it has one (a
    pretrained model records its config, not the folder it came from), else the name and arguments it was made
    with."""
    recipe = getattr(model, "checkpoint_arch", None)
    return recipe() if callable(recipe) else (name, dict(kwargs))


def list_models(pattern: str = "*", *, task: str | None = None) -> list[str]:
    _ensure_builtin_models()
    return sorted(n for n, e in _REGISTRY.items()
                  if e.listed and fnmatch.fnmatch(n, pattern) and (task is None or e.task == task))
