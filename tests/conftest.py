"""Shared fixtures. Models and data are made here, tiny and synthetic; nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_edgepix(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `edgepix` command in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "edgepix", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def edgepix_cli():
    return run_edgepix
