"""Nothing lost on a full disk or a crash: every write goes through the one writer (temp file, checked write, fsync,
rename, folder fsync), a full disk ends a run in one line with nothing truncated or empty at a final path, and a
rerun completes every output. Archives remember the settings their outputs were made with.

The full-disk cases run on a small tmpfs mounted here (root only; skipped with the reason elsewhere) and resized
between the failing run and the rerun. EDGEPIX_FULL_DISK_SIZES=N sweeps N disk sizes instead of the default few."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_edgepix
from test_ray import assert_same_outputs, conv_model, make_archive, outputs
from test_stream_reliability import noise_model

from edgepix.runtime.batch.archive import ArchiveJob, run_archive
from edgepix.runtime.batch.worker import STATE_FOLDER, read_journal
from edgepix.runtime.core import fileio
from edgepix.runtime.core.errors import InputError, SinkError
from edgepix.runtime.tasks.render import RenderOptions

MASK = RenderOptions(mode="mask")


# ---- the writer ---------------------------------------------------------------------------------------------


def test_a_commit_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fileio.atomic_write_bytes(tmp_path / "a.bin", b"x" * 1000)
    assert events == ["fsync file", "rename", "fsync folder"]
    events.clear()
    fileio.write_image(tmp_path / "b.png", np.full((4, 5, 3), 7, np.uint8))
    assert events == ["fsync file", "rename", "fsync folder"]
    assert cv2.imread(str(tmp_path / "b.png")).tolist() == np.full((4, 5, 3), 7, np.uint8).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.png"]  # no partial file left


def test_a_write_that_fails_part_way_leaves_nothing_at_the_final_path(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def write(fd, data):  # the second chunk finds the disk full, after a short first write
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SinkError, match=r"^cannot write .*c\.png: No space left on device$"):
        fileio.write_image(tmp_path / "c.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(OSError):
        fileio.atomic_write_bytes(tmp_path / "d.bin", b"y" * 100)
    assert list(tmp_path.iterdir()) == [] and len(calls) >= 2


def test_files_keep_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        fileio.write_image(tmp_path / "e.png", np.zeros((2, 2, 3), np.uint8))
        fileio.atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"e.png": "0o640",
                                                                                   "f.json": "0o640"}


# ---- a small disk -----------------------------------------------------------------------------------------------


def _can_mount() -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    return None


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int):
    """A tmpfs of `size_kb` KiB at `folder`; `resize(kb)` grows it (for the rerun); unmounted at the end."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def resize(kb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(folder)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def disk_sizes(total_kb: int) -> list[int]:
    """Disk sizes (KiB, whole 4 KiB pages: tmpfs counts in pages) from almost nothing to just under what the whole
    run needs."""
    n = int(os.environ.get("EDGEPIX_FULL_DISK_SIZES", "4"))
    pages = total_kb // 4
    return sorted({4 * (2 + (pages - 3) * i // max(1, n - 1)) for i in range(n)})


def disk_usage_kb(folder: Path) -> int:
    """What the files under `folder` take on a tmpfs: whole pages each."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


def assert_no_damaged_output(sink: Path) -> None:
    """Every file at a final name is whole: images decode to their full size, videos to at least one frame."""
    for name in outputs(sink):
        path = sink / name
        assert path.stat().st_size > 0, f"{name} is empty"
        if name.endswith((".png", ".jpg")):
            data = np.frombuffer(path.read_bytes(), np.uint8)
            assert cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None, f"{name} is truncated"
        else:
            cap = cv2.VideoCapture(str(path))
            ok, _ = cap.read()
            cap.release()
            assert ok, f"{name} does not decode"


@pytest.fixture(scope="module")
def convs(tmp_path_factory) -> Path:
    return conv_model(tmp_path_factory.mktemp("model") / "convs.onnx", size=64)


@pytest.fixture(scope="module")
def archive_inputs(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("inputs"), videos=2, frames=6, images=24, broken=False)


@pytest.fixture(scope="module")
def reference(convs, archive_inputs, tmp_path_factory) -> Path:
    sink = tmp_path_factory.mktemp("reference")
    summary = run_archive(ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(sink), render=MASK,
                                     quiet=True))
    assert summary["done"] == 26 and summary["failed"] == 0
    return sink


@pytest.mark.slow
def test_archive_on_a_full_disk_leaves_only_whole_outputs_and_a_rerun_completes_them(convs, archive_inputs,
                                                                                     reference, tmp_path):
    total_kb = disk_usage_kb(reference) + 8  # + the folders' own pages
    sizes = disk_sizes(total_kb)
    assert len(sizes) == int(os.environ.get("EDGEPIX_FULL_DISK_SIZES", "4")), (total_kb, sizes)
    full = []
    for size_kb in sizes:
        sink = tmp_path / f"disk{size_kb}"
        with small_disk(sink, size_kb) as resize:
            job = ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(sink / "out"), render=MASK,
                             quiet=True)
            try:
                run_archive(job)
            except SinkError as e:  # the disk filled up: one line that says so
                message = str(e)
                assert "\n" not in message and "no space left" in message.lower(), repr(message)
                full.append(size_kb)
            assert_no_damaged_output(sink / "out")
            journaled = {e["output"] for e in read_journal(sink / "out")}
            assert journaled <= set(outputs(sink / "out")), size_kb  # nothing journaled that is not there
            resize(total_kb * 4)
            summary = run_archive(job)
            assert summary["failed"] == 0 and summary["done"] + summary["skipped"] == 26, (size_kb, summary)
            assert_same_outputs(sink / "out", reference)
    assert len(full) >= len(sizes) - 2, (sizes, full)  # all but the largest sizes were too small for the run


@pytest.mark.slow
def test_the_png_folder_sink_and_generate_on_a_full_disk(seg_onnx, tmp_path):
    noise = noise_model(tmp_path / "noise.onnx")
    with small_disk(tmp_path / "disk", 48) as resize:
        frames = tmp_path / "disk" / "frames"
        r = run_edgepix("--quiet", "segment", str(seg_onnx), "--source", "synthetic://?size=160x120", "--sink",
                        f"{frames}/f_%05d.png", "--max-frames", "400")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "No space left" in r.stderr or "disk full" in r.stderr, r.stderr
        assert_no_damaged_output(frames)
        images = tmp_path / "disk" / "generated"
        r = run_edgepix("--quiet", "generate", str(noise), "--num", "5000", "--out", str(images))
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        written = outputs(images)
        assert 0 < len(written) < 5000
        assert_no_damaged_output(images)
        resize(65536)  # tmpfs gives every file at least one 4 KiB page
        r = run_edgepix("--quiet", "generate", str(noise), "--num", "5000", "--out", str(images))
        assert r.returncode == 0, r.stderr
        assert len(outputs(images)) == 5000
        assert_no_damaged_output(images)
        assert not [p for p in images.iterdir() if p.name.startswith(".")]  # no partial file left behind


# ---- archive settings --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_archive_rerun_with_other_settings_is_refused_or_redone_with_overwrite(convs, archive_inputs, reference,
                                                                                  tmp_path):
    sink = tmp_path / "out"
    shutil.copytree(reference, sink)
    same = run_archive(ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(sink), render=MASK,
                                  quiet=True))
    assert same["skipped"] == 26 and same["done"] == 0
    overlay = ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(sink),
                         render=RenderOptions(mode="overlay"), quiet=True)
    with pytest.raises(InputError, match=r"other settings \(vis mask -> overlay\); rerun with --overwrite"):
        run_archive(overlay)
    other_model = conv_model(tmp_path / "other.onnx", size=48)
    with pytest.raises(InputError, match=r"other settings \(model_sha256 [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\."):
        run_archive(ArchiveJob(model=other_model, sources=[f"{archive_inputs}/**/*"], sink=str(sink), render=MASK,
                               quiet=True))
    redone = run_archive(ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(sink),
                                    render=RenderOptions(mode="overlay"), quiet=True, overwrite=True))
    assert redone["done"] == 26 and redone["skipped"] == 0
    fresh = tmp_path / "fresh"
    run_archive(ArchiveJob(model=convs, sources=[f"{archive_inputs}/**/*"], sink=str(fresh),
                           render=RenderOptions(mode="overlay"), quiet=True))
    assert_same_outputs(sink, fresh)
    assert (sink / STATE_FOLDER / "settings.json").exists()
    r = run_edgepix("--quiet", "segment", str(convs), "--source", f"{archive_inputs}/**/*", "--sink", f"{sink}/",
                    "--archive", "--vis", "mask")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr, r.stderr
