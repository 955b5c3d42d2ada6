"""The exceptions edgepix raises on purpose.

Every error a user can cause (a bad file, a bad URI, a bad option) is an `EdgepixError`. The CLI prints
these as one line and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgepixError(Exception):
    """Base class for errors caused by input, files or the environment rather than by a bug."""


class SpecError(EdgepixError, ValueError):
    """A ModelSpec (or its JSON) is invalid; the message names the field and the bad value."""


class ModelFormatError(EdgepixError):
    """A model file is missing, unreadable or not what edgepix expected."""


class DataError(EdgepixError):
    """A dataset folder, image or mask is missing or inconsistent."""


class SourceError(EdgepixError):
    """A frame source (camera, stream, file) cannot be opened or read."""


class SinkError(EdgepixError):
    """A frame sink (file, window, server) cannot be opened or written."""


class BackendError(EdgepixError):
    """An inference backend is unavailable or refused the model or the input."""


class InputError(EdgepixError, ValueError):
    """A frame, image or tensor handed to the runtime has the wrong type, dtype, shape or channel count."""


class ExportError(EdgepixError):
    """Exporting a model failed or produced an artifact that does not match PyTorch."""


class DependencyError(EdgepixError):
    """An optional package needed for this command is not installed."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """Message for an unknown name: lists the valid ones and the close matches first."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}; valid: {', '.join(valid)}.{hint}"


def require(module: str, *, extra: str, purpose: str):
    """Import an optional module or raise DependencyError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(
            f"{purpose} needs the Python package {module!r} ({e}); install it with: pip install 'edgepix[{extra}]'"
        ) from e
