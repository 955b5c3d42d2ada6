"""The backend profile `auto` reads (runtime/backends/profile.py) and `edgepix tune`, which measures and writes it."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re

import pytest

from edgepix.runtime import load_backend
from edgepix.runtime.backends import profile
from edgepix.runtime.backends.registry import candidates
from edgepix.runtime.core.cpuinfo import cpu_features, usable_cores
from edgepix.runtime.core.errors import InputError


@pytest.fixture
def profile_file(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    monkeypatch.setenv(profile.PROFILE_ENV, str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_stale_notices(monkeypatch):
    monkeypatch.setattr(profile, "_STALE_SAID", set())  # "said once per process" must not leak between tests


def test_auto_tries_the_measured_backend_first_for_that_file_on_this_machine(seg_onnx, profile_file, tmp_path):
    fixed = candidates("auto", seg_onnx)
    assert fixed[0] == "ort-cpu" and profile.preferred_backend(seg_onnx) is None
    profile.record(seg_onnx, "opencv", {"p50_ms": {"opencv": 1.0}}, threads=usable_cores())
    assert candidates("auto", seg_onnx) == ["opencv"] + [n for n in fixed if n != "opencv"]
    with load_backend(seg_onnx, "auto") as backend:
        assert backend.name == "opencv"
    # Another file (even a copy with one byte changed) gets the fixed order.
    other = tmp_path / "other.onnx"
    other.write_bytes(seg_onnx.read_bytes() + b"\0")
    assert candidates("auto", other) == fixed
    entry = next(iter(json.loads(profile_file.read_text())["entries"].values()))
    assert entry["key"]["model_sha256"] == profile.model_digest(seg_onnx)
    assert entry["key"]["threads"] == usable_cores() and entry["key"]["cpu"] == cpu_features().model
    assert entry["key"]["libraries"]["onnxruntime"] == importlib.metadata.version("onnxruntime")


def upgrade_onnxruntime(monkeypatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "onnxruntime" else real(name))


@pytest.mark.parametrize(("change", "said"), [
    (upgrade_onnxruntime, "onnxruntime {onnxruntime} (now 9.9.9)"),
    (lambda m: m.setattr(profile, "gpu_name", lambda: "NVIDIA A100-SXM4-40GB"), "gpu none (now NVIDIA A100-SXM4-40GB)"),
    (lambda m: m.setattr(profile, "usable_cores", lambda: 64), "cores {cores} (now 64)"),
])
def test_a_measurement_made_under_other_conditions_is_stale_said_once(seg_onnx, profile_file, monkeypatch, caplog,
                                                                      change, said):
    fixed = candidates("auto", seg_onnx)
    profile.record(seg_onnx, "opencv", {}, threads=2)
    assert candidates("auto", seg_onnx, threads=2)[0] == "opencv"
    before = {"onnxruntime": importlib.metadata.version("onnxruntime"), "cores": usable_cores()}
    change(monkeypatch)  # a library upgrade, a GPU added, another machine
    with caplog.at_level(logging.WARNING):
        assert candidates("auto", seg_onnx, threads=2) == fixed
        assert candidates("auto", seg_onnx, threads=2) == fixed
        with load_backend(seg_onnx, "auto", threads=2) as backend:
            assert backend.name == "ort-cpu"
    stale = [r.getMessage() for r in caplog.records if "backend profile" in r.getMessage()]
    assert len(stale) == 1, stale  # once per model, in one line
    assert said.format(**before) in stale[0] and "auto keeps its default order" in stale[0]
    assert f"run `edgepix tune {seg_onnx.name}` again" in stale[0]


def test_a_measurement_at_other_threads_is_not_used(seg_onnx, profile_file, caplog):
    fixed = candidates("auto", seg_onnx)
    profile.record(seg_onnx, "opencv", {}, threads=1)
    with load_backend(seg_onnx, "auto", threads=1) as backend:
        assert backend.name == "opencv"
    with caplog.at_level(logging.WARNING):
        assert candidates("auto", seg_onnx, threads=3) == fixed
    assert "threads 1 (now 3)" in caplog.text and f"edgepix tune {seg_onnx.name} --threads 3` again" in caplog.text


def test_the_profile_keeps_the_newest_entries_up_to_its_cap(profile_file, tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "MAX_ENTRIES", 5)
    models = []
    for i in range(8):
        models.append(tmp_path / f"m{i}.onnx")
        models[-1].write_bytes(b"model %d" % i)
        profile.record(models[-1], "opencv", {"i": i}, threads=1)
    entries = list(json.loads(profile_file.read_text())["entries"].values())
    assert [e["measurements"]["i"] for e in entries] == [3, 4, 5, 6, 7]  # oldest first, the 3 oldest dropped
    profile.record(models[4], "ort-cpu", {"i": 44}, threads=1)  # the same key again: replaced, now the newest
    entries = list(json.loads(profile_file.read_text())["entries"].values())
    assert [e["measurements"]["i"] for e in entries] == [3, 5, 6, 7, 44]
    profile.record(models[4], "opencv", {"i": 45}, threads=2)  # another key for the same file: a new entry
    entries = list(json.loads(profile_file.read_text())["entries"].values())
    assert [e["measurements"]["i"] for e in entries] == [5, 6, 7, 44, 45]
    assert profile.preferred_backend(models[4], threads=1) == "ort-cpu"
    assert profile.preferred_backend(models[4], threads=2) == "opencv"
    assert profile.preferred_backend(models[0], threads=1) is None  # dropped


def test_a_damaged_old_or_disabled_profile_is_ignored(seg_onnx, profile_file, monkeypatch, caplog):
    profile_file.write_text('{"format": 2, "entries": [')
    with caplog.at_level(logging.WARNING):
        assert candidates("auto", seg_onnx)[0] == "ort-cpu"
    assert "ignoring the backend profile" in caplog.text
    profile_file.write_text(json.dumps({"format": 99, "entries": {}}))
    assert profile.read_profile() == {}
    # A profile of the first format (keyed on the CPU only) is not used, and the next record replaces it.
    profile_file.write_text(json.dumps({"format": 1, "entries": {f"{profile.model_digest(seg_onnx)}@cpu": {
        "backend": "opencv", "model": str(seg_onnx)}}}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert candidates("auto", seg_onnx)[0] == "ort-cpu"
    assert "written by an older edgepix (format 1, keyed on the CPU only)" in caplog.text
    profile.record(seg_onnx, "opencv", {}, threads=usable_cores())
    assert json.loads(profile_file.read_text())["format"] == profile.FORMAT
    assert candidates("auto", seg_onnx)[0] == "opencv"
    # Entries that are not what the profile writes are skipped, not trusted.
    data = json.loads(profile_file.read_text())
    data["entries"] = {"x": [1], "y": {"key": "not a key"}, **data["entries"]}
    profile_file.write_text(json.dumps(data))
    assert candidates("auto", seg_onnx)[0] == "opencv"
    monkeypatch.setenv(profile.PROFILE_ENV, "off")
    assert profile.profile_path() is None and profile.preferred_backend(seg_onnx) is None
    with pytest.raises(InputError, match="disabled"):
        profile.record(seg_onnx, "opencv", {}, threads=1)


def test_tune_measures_records_the_fastest_and_auto_follows(edgepix_cli, seg_onnx, profile_file):
    done = edgepix_cli("-q", "tune", str(seg_onnx), "--rounds", "6", "--warmup", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"^\| (\S+) \| ([0-9.]+) \|", done.stdout, re.M))
    assert {"ort-cpu", "opencv"} <= set(rows), done.stdout
    entry = next(iter(json.loads(profile_file.read_text())["entries"].values()))
    assert entry["backend"] == min(rows, key=lambda n: float(rows[n]))  # the fastest printed p50
    assert entry["measurements"]["p50_ms"]["ort-cpu"] == pytest.approx(float(rows["ort-cpu"]), abs=0.01)
    assert f"fastest: {entry['backend']}" in done.stdout
    assert entry["key"]["threads"] == 1
    assert candidates("auto", seg_onnx, threads=1)[0] == entry["backend"]


def test_tune_rejects_bad_input_in_one_line(edgepix_cli, tmp_path):
    done = edgepix_cli("tune", str(tmp_path / "missing.onnx"))
    assert done.returncode == 1 and "model file not found" in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1


def test_the_gpu_in_the_key_is_what_nvidia_smi_names(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"  # stands in for the driver's tool: the query the profile makes, and its answer
    smi.write_text('#!/bin/sh\ncase "$*" in *--query-gpu=name,compute_cap*) echo "NVIDIA H100 80GB HBM3, 9.0";; '
                   '*) exit 2;; esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    profile.gpu_name.cache_clear()
    try:
        assert profile.gpu_name() == "NVIDIA H100 80GB HBM3"
    finally:
        profile.gpu_name.cache_clear()
