"""Temporary folders for export work (the raw ONNX before simplification, the artifact before the parity gate, INT8
calibration files, a DeepStream graph before its configs), in the system's temporary folder, each named after the
process that made it: `edgepix-export-<pid>-XXXXXXXX`.

A `with workspace() as tmp:` block removes its folder on every exit that runs Python: errors, Ctrl-C, and SIGTERM,
which `edgepix export` turns into KeyboardInterrupt (edgepix.cli's sigterm_interrupts). A process killed outright
(SIGKILL, the OOM killer, a power cut) cannot clean up, so each new workspace first removes the folders of export
processes that no longer exist (this user's only; a folder whose process is alive is in use and stays).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "edgepix-export-"
_NAME = re.compile(rf"{re.escape(PREFIX)}(\d{{1,10}})-[a-z0-9_]+")  # tempfile's random part has no "-"


def workspace() -> tempfile.TemporaryDirectory:
    """A new temporary folder for this export, after removing those that dead exports left."""
    remove_dead_workspaces()
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-")


def remove_dead_workspaces(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the workspaces in `folder` (the system's temporary folder) whose process is gone; returns them."""
    removed = []
    for path in sorted(Path(folder or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        match = _NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        try:
            if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
                continue  # another user's export: not this process's to judge
        except OSError:
            continue
        if process_exists(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary folder(s) that killed exports left: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, ValueError):
        return False
    return True
