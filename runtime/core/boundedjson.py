"""Parse JSON that may come from a corrupted or hostile file, accepting only what a spec or manifest can hold.

A spec travels inside ONNX metadata and beside engines, so it can arrive damaged by a flaky copy or crafted on
purpose. Python's `json` module alone lets several such inputs escape as errors that are not edgepix's own:
nesting 100 000 levels deep recurses until RecursionError, an integer literal of 5000 digits exceeds Python's
int-to-string limit (ValueError as soon as anything prints it), `1e999` becomes inf, `NaN` is accepted, lone UTF-16
surrogates become strings that cannot be printed, and bytes that are not UTF-8 raise UnicodeDecodeError.
`loads()` bounds all of these and turns every failure into the caller's EdgepixError subclass with one line.
Real specs and manifests are a few kilobytes and nest 5 levels, so the bounds never touch them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import EdgepixError

MAX_BYTES = 1 << 20  # a spec with 10 000 class names and colours is ~0.4 MB
MAX_DEPTH = 32  # a manifest nests 5 levels (object > profiles > profile > entry > dims)
MAX_NUMBER_CHARS = 40  # an int64 has 19 digits, a float's repr at most 24 characters
MAX_STRING_CHARS = 1 << 16

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_SURROGATES = re.compile("[\ud800-\udfff]")


class _Rejected(Exception):
    """Raised inside the json hooks; `loads` reports it with the caller's error class."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_CHARS:
        raise _Rejected(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_NUMBER_CHARS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Rejected(f"a number written with {len(text)} characters (at most {MAX_NUMBER_CHARS} are accepted)")
    value = float(text)
    if not math.isfinite(value):
        raise _Rejected(f"the number {text} (too large for a 64-bit float)")
    return value


def _parse_constant(text: str) -> Any:
    raise _Rejected(f"{text} (not a JSON number)")


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects, counted without recursion (brackets inside strings ignored)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRINGS.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH:  # stop early: the rest cannot make it acceptable
                break
    return deepest


def _check_strings(value: Any) -> None:
    """Every key and string value: bounded length and valid Unicode. Iterative; the depth is already bounded."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if len(item) > MAX_STRING_CHARS:
                raise _Rejected(f"a string of {len(item)} characters (at most {MAX_STRING_CHARS} are accepted)")
            if _SURROGATES.search(item):
                raise _Rejected("a string with an unpaired UTF-16 surrogate escape (not valid Unicode)")


def loads(text: str | bytes | bytearray, *, what: str, error: type[EdgepixError], hint: str = "") -> Any:
    """Parse `text` as JSON within the bounds above. Any failure raises `error` with one line:
    "<what>: <what was wrong>[; <hint>]"."""
    suffix = f"; {hint}" if hint else ""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_BYTES:
            raise error(f"{what}: {len(text)} bytes of JSON, more than the {MAX_BYTES} accepted{suffix}")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{what}: not valid UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start}){suffix}") from None
    if len(text) > MAX_BYTES:
        raise error(f"{what}: {len(text)} characters of JSON, more than the {MAX_BYTES} accepted{suffix}")
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{what}: JSON nested more than {MAX_DEPTH} levels deep (at most {MAX_DEPTH} are "
                    f"accepted){suffix}")
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
        _check_strings(data)
    except _Rejected as e:
        raise error(f"{what}: the JSON holds {e}{suffix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{what}: not valid JSON ({e}){suffix}") from None
    except RecursionError:  # the depth check above should make this unreachable; keep the promise of one line
        raise error(f"{what}: JSON nested too deeply to read{suffix}") from None
    return data
