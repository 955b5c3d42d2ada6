"""Command-line flags declared on the fields of config dataclasses, so an option's default and help live in one place.

    @dataclass
    class TrainConfig:
        lr: float = field(default=4e-3, metadata=flag("peak learning rate"))

    add_config_flags(parser, TrainConfig)                   # --lr LR    peak learning rate (default: 0.004)
    config = TrainConfig(**config_values(parser.parse_args(), TrainConfig))

The annotation gives the flag's type: int, float, str; a bool is `--x/--no-x`; an Enum takes one of its values; a
union is its first member other than None. Flags default to None, so `config_values` returns only what the user gave
(a resumed run names the settings it ignores) and the help ends with the dataclass's default, which cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.fields import FLAG_KEY, Flag


def _flag_fields(config: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config) if FLAG_KEY in f.metadata}


def _value_type(annotation: Any) -> Any:
    """The annotation's type; a union's first member other than None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _default_text(value: Any) -> str | None:
    if value is None or value is dataclasses.MISSING:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config: type,
                     names: Iterable[str] | None = None, *, defaults: Mapping[str, Any] | None = None) -> None:
    """Add the flags that `config`'s fields declare (only `names`, in that order, when given). `defaults` replaces
    the dataclass's defaults in the help, for a verb that starts from other values (`GanTrainConfig.for_kind`)."""
    fields, hints = _flag_fields(config), typing.get_type_hints(config)
    for name in fields if names is None else names:
        spec: Flag = fields[name].metadata[FLAG_KEY]
        kind = _value_type(hints[name])
        default = (defaults or {}).get(name, fields[name].default)
        shown = spec.default or _default_text(default)
        help_text = spec.help
        if shown:
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        # argparse %-formats help texts; a literal % in one must reach it doubled
        options: dict[str, Any] = dict(dest=name, default=None, help=help_text.replace("%", "%%"))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif _is_enum(kind):
            options["choices"] = [member.value for member in kind]
        else:
            options.update(type=spec.type or kind, metavar=spec.metavar, choices=spec.choices)
        parser.add_argument(spec.name or "--" + name.replace("_", "-"), **options)


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """{field: value} for the flags of `config` that the user gave (enum values as members)."""
    hints = typing.get_type_hints(config)
    given = {name: getattr(args, name, None) for name in _flag_fields(config)}  # None: not given, or not added
    kinds = {name: _value_type(hints[name]) for name in given}
    return {name: kinds[name](value) if _is_enum(kinds[name]) else value
            for name, value in given.items() if value is not None}
