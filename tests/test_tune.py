"""The backend profile `auto` reads (runtime/backends/profile.py) and `edgepix tune`, which measures and writes it."""

from __future__ import annotations

import json
import logging
import re

import pytest

from edgepix.runtime import load_backend
from edgepix.runtime.backends import profile
from edgepix.runtime.backends.registry import candidates
from edgepix.runtime.core.errors import InputError


@pytest.fixture
def profile_file(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    monkeypatch.setenv(profile.PROFILE_ENV, str(path))
    return path


def test_auto_tries_the_measured_backend_first_for_that_file_on_this_machine(seg_onnx, profile_file, tmp_path,
                                                                              monkeypatch):
    fixed = candidates("auto", seg_onnx)
    assert fixed[0] == "ort-cpu" and profile.preferred_backend(seg_onnx) is None
    profile.record(seg_onnx, "opencv", {"p50_ms": {"opencv": 1.0}})
    assert candidates("auto", seg_onnx) == ["opencv"] + [n for n in fixed if n != "opencv"]
    with load_backend(seg_onnx, "auto") as backend:
        assert backend.name == "opencv"
    # Another file (even a copy with one byte changed) and another machine get the fixed order.
    other = tmp_path / "other.onnx"
    other.write_bytes(seg_onnx.read_bytes() + b"\0")
    assert candidates("auto", other) == fixed
    monkeypatch.setattr(profile, "machine_fingerprint", lambda: "another-cpu")
    assert candidates("auto", seg_onnx) == fixed


def test_a_damaged_or_disabled_profile_is_ignored(seg_onnx, profile_file, monkeypatch, caplog):
    profile_file.write_text('{"format": 1, "entries": [')
    with caplog.at_level(logging.WARNING):
        assert candidates("auto", seg_onnx)[0] == "ort-cpu"
    assert "ignoring the backend profile" in caplog.text
    profile_file.write_text(json.dumps({"format": 99, "entries": {}}))
    assert profile.read_profile() == {}
    monkeypatch.setenv(profile.PROFILE_ENV, "off")
    assert profile.profile_path() is None and profile.preferred_backend(seg_onnx) is None
    with pytest.raises(InputError, match="disabled"):
        profile.record(seg_onnx, "opencv", {})


def test_tune_measures_records_the_fastest_and_auto_follows(edgepix_cli, seg_onnx, profile_file):
    done = edgepix_cli("-q", "tune", str(seg_onnx), "--rounds", "6", "--warmup", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"^\| (\S+) \| ([0-9.]+) \|", done.stdout, re.M))
    assert {"ort-cpu", "opencv"} <= set(rows), done.stdout
    entry = next(iter(json.loads(profile_file.read_text())["entries"].values()))
    assert entry["backend"] == min(rows, key=lambda n: float(rows[n]))  # the fastest printed p50
    assert entry["measurements"]["p50_ms"]["ort-cpu"] == pytest.approx(float(rows["ort-cpu"]), abs=0.01)
    assert f"fastest: {entry['backend']}" in done.stdout
    assert candidates("auto", seg_onnx)[0] == entry["backend"]


def test_tune_rejects_bad_input_in_one_line(edgepix_cli, tmp_path):
    done = edgepix_cli("tune", str(tmp_path / "missing.onnx"))
    assert done.returncode == 1 and "model file not found" in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1
