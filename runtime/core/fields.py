"""A config dataclass field's command-line flag, declared where the field is (see runtime/cli/flags.py for the
parser side). Plain data: library configs declare their flags without importing argparse.

    lr: float = field(default=4e-3, metadata=flag("peak learning rate"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

FLAG_KEY = "edgepix.flag"  # the key of a field's metadata that holds its Flag


@dataclasses.dataclass(frozen=True)
class Flag:
    help: str = ""
    name: str | None = None  # the flag's spelling; default "--" + the field's name with "-" for "_"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None  # a str field's valid values
    type: Callable[[str], Any] | None = None  # the value's parser, where the annotation's type is not it
    default: str | None = None  # the help's account of the default, where the field's value cannot give it


def flag(help: str = "", **options: Any) -> dict[str, Flag]:
    """A field's `metadata=`: the field is a command-line flag with this help (`options`: Flag's other fields)."""
    return {FLAG_KEY: Flag(help, **options)}
