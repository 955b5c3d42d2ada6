"""Usage errors end in one line that says what was expected, before any work: a training size the models cannot
take, an ONNX file given where a checkpoint belongs, checkpoints whose fields have the wrong types; outputs that
cannot be written (read-only, a folder, inside a file, a full disk), bad flag values, bad source URIs, a pipe closed
early, an unreachable cluster; interrupts (a second Ctrl-C, SIGTERM, SIGKILL) leave nothing partial behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO
from test_runtime_models import channel_model, seg_spec

from edgepix.export.to_onnx import OnnxExportOptions, exported_spec
from edgepix.runtime.core.errors import ExportError, ModelFormatError
from edgepix.train.checkpoint import load_checkpoint, wrap_state_dict


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind, imgsz, expected", [
    ("pix2pix", 64, "must be a multiple of 128 (at least 128)"),
    ("pix2pix", 192, "must be a multiple of 256 (at least 256)"),
    ("gan", 48, "dcgan image_size must be one of (32, 64, 128), got 48"),
])
def test_train_with_a_size_the_models_cannot_take_fails_in_one_line_before_any_work(edgepix_cli, tmp_path, kind,
                                                                                     imgsz, expected):
    out = tmp_path / "run"
    result = edgepix_cli("train", kind, "--data", "synthetic", "--imgsz", str(imgsz), "--epochs", "1",
                         "--synthetic-n", "8", "--batch", "2", "--out", str(out))
    line = one_error_line(result)
    assert expected in line and f"--imgsz {imgsz}" in line
    assert not out.exists()  # nothing was made: no data, no run folder


def test_export_size_below_the_divisor_suggests_a_size_that_exists():
    spec = seg_spec(input_size=(128, 128), size_divisor=128)
    with pytest.raises(ExportError, match="multiple of 128 for this model, got 64x64; try 128x128"):
        exported_spec(spec, OnnxExportOptions(imgsz=(64, 64)))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    return channel_model(tmp_path_factory.mktemp("onnx"))


def test_export_of_an_onnx_file_says_it_is_onnx_not_a_checkpoint(edgepix_cli, onnx_model):
    line = one_error_line(edgepix_cli("export", str(onnx_model), "--no-verify"))
    assert f"{onnx_model} is an ONNX model, not a training checkpoint" in line
    assert f"edgepix info {onnx_model}" in line and "--format engine" in line
    assert "Python objects" not in line


def test_an_onnx_file_named_like_a_checkpoint_is_named_as_onnx(edgepix_cli, onnx_model, tmp_path):
    disguised = tmp_path / "model.pt"
    disguised.write_bytes(onnx_model.read_bytes())
    line = one_error_line(edgepix_cli("info", str(disguised)))
    assert "is an ONNX model, not a training checkpoint (.pt); rename it to model.onnx" in line


def crafted(tmp_path, **fields):
    ckpt = wrap_state_dict({"w": torch.zeros(2)}, arch="fastscnn", arch_kwargs={"num_classes": 3}, spec=seg_spec())
    path = tmp_path / "crafted.pt"
    torch.save({**ckpt, **fields}, path)
    return path


CRAFTED = {
    "arch is an int": (dict(arch=5), "'arch' must be a model name"),
    "arch is empty": (dict(arch=""), "'arch' must be a model name"),
    "arch_kwargs is a list": (dict(arch_kwargs=[1, 2]), "'arch_kwargs' must be a dict"),
    "arch_kwargs has an int key": (dict(arch_kwargs={1: 2}), "'arch_kwargs' must be a dict"),
    "spec is a str": (dict(spec="x"), "'spec' must be a dict"),
    "spec has an int key": (dict(spec={**seg_spec().to_dict(), 1: 2}), "keys must be strings"),
    "spec scale is a 400-digit int": (dict(spec={**seg_spec().to_dict(), "scale": 10**400}),
                                      "scale: expected a finite number"),
    "model is a list": (dict(model=[1, 2]), "'model' must be a dict of parameter names to tensors"),
    "model holds an int": (dict(model={"w": 1}), "'model' must be a dict of parameter names to tensors"),
    "ema is a str": (dict(ema="x"), "'ema' must be a dict of parameter names to tensors"),
    "epoch is a str": (dict(epoch="x"), "'epoch' must be a non-negative int"),
    "epoch is negative": (dict(epoch=-3), "'epoch' must be a non-negative int"),
    "metrics is a list": (dict(metrics=[1]), "'metrics' must be a dict"),
    "optimizer is a str": (dict(optimizer="adam"), "'optimizer' must be a dict"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_checkpoint_fields_of_the_wrong_type_are_named(tmp_path, name):
    fields, message = CRAFTED[name]
    with pytest.raises(ModelFormatError, match=message) as e:
        load_checkpoint(crafted(tmp_path, **fields))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("verb", ["info", "export"])
@pytest.mark.parametrize("name", ["arch is an int", "model is a list", "metrics is a list"])
def test_info_and_export_of_crafted_checkpoints_end_in_one_line(edgepix_cli, tmp_path, verb, name):
    fields, message = CRAFTED[name]
    line = one_error_line(edgepix_cli(verb, str(crafted(tmp_path, **fields)), *(["--no-verify"] if verb == "export"
                                                                                 else [])))
    assert line.startswith(f"edgepix {verb}: error: ") and message in line


def test_arch_kwargs_that_do_not_build_the_architecture_end_in_one_line(edgepix_cli, tmp_path):
    line = one_error_line(edgepix_cli("export", str(crafted(tmp_path, arch_kwargs={"num_classes": "six"})),
                                      "--no-verify"))
    assert line.startswith("edgepix export: error: ") and "'arch_kwargs' does not build" in line


# ---- misuse of outputs, sources and flags: one line, the right exit code, nothing left at the output path -------


def only_line(result, code: int) -> str:
    """The one line on stderr of a command that exited with `code` (nothing else on stderr)."""
    lines = result.stderr.splitlines()
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    return lines[0]


def nothing_at(path: Path) -> None:
    """Nothing at `path`, and no partial file of it beside it."""
    assert not path.exists(), path
    if path.parent.is_dir():
        assert not list(path.parent.glob(f".{path.name}.*")), list(path.parent.iterdir())


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip() or r.returncode})")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into: permission bits for a normal user; for root (whom they do not stop), a
    read-only tmpfs."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    _mount_tmpfs(folder, "ro,size=64k")
    try:
        yield folder
    finally:
        _unmount(folder)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last block."""
    folder = tmp_path / "full"
    _mount_tmpfs(folder, "size=64k")
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield folder
    finally:
        _unmount(folder)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


SPEC_OUTS = {
    "read-only folder": lambda fx: fx["read_only_dir"] / "new.onnx",
    "an existing folder": lambda fx: fx["tmp_path"],
    "a path inside a file": lambda fx: fx["a_file"] / "new.onnx",
    "a full disk": lambda fx: fx["full_disk"] / "new.onnx",
}
SPEC_OUT_MESSAGES = {"read-only folder": "Read-only file system", "an existing folder": "is a folder",
                     "a path inside a file": "a-file/new.onnx", "a full disk": "No space left on device"}


@pytest.mark.parametrize("case", sorted(SPEC_OUTS))
def test_spec_out_that_cannot_be_written_is_one_line(edgepix_cli, onnx_model, tmp_path, request, case):
    fixtures = {"tmp_path": tmp_path}
    for name in {"read-only folder": ["read_only_dir"], "a path inside a file": ["a_file"],
                 "a full disk": ["full_disk"]}.get(case, []):
        fixtures[name] = request.getfixturevalue(name)
    out = SPEC_OUTS[case](fixtures)
    before = sorted(out.iterdir()) if out.is_dir() else None
    line = only_line(edgepix_cli("spec", str(onnx_model), "--set", "classes=a,b,c", "--out", str(out)), 1)
    assert line.startswith("edgepix spec: error: ") and str(out) in line and SPEC_OUT_MESSAGES[case] in line
    if case == "an existing folder":
        assert sorted(out.iterdir()) == before  # nothing written into it
    else:
        nothing_at(out)


@pytest.mark.parametrize("case", ["a folder", "a path inside a file", "read-only folder", "off"])
def test_tune_with_a_profile_it_cannot_write_fails_before_measuring(edgepix_cli, onnx_model, tmp_path, request,
                                                                   monkeypatch, case):
    profile = {"a folder": lambda: tmp_path, "a path inside a file": lambda: request.getfixturevalue("a_file") / "p",
               "read-only folder": lambda: request.getfixturevalue("read_only_dir") / "profile.json",
               "off": lambda: "off"}[case]()
    monkeypatch.setenv("EDGEPIX_PROFILE", str(profile))
    t0 = time.monotonic()
    line = only_line(edgepix_cli("tune", str(onnx_model), "--rounds", "500", "--warmup", "100"), 1)
    assert line.startswith("edgepix tune: error: ") and "EDGEPIX_PROFILE" in line and "--dry-run" in line
    assert time.monotonic() - t0 < 60  # refused before 500 interleaved rounds of every backend
    if case != "off":
        assert str(profile) in line
    if case in ("a path inside a file", "read-only folder"):
        nothing_at(Path(profile))


@pytest.mark.parametrize("fmt", ["triton", "deepstream"])
@pytest.mark.parametrize("case", ["read-only folder", "a file", "a path inside a file"])
def test_export_folder_formats_refuse_an_out_they_cannot_write(edgepix_cli, onnx_model, request, fmt, case):
    out = {"read-only folder": lambda: request.getfixturevalue("read_only_dir") / "repo",
           "a file": lambda: request.getfixturevalue("a_file"),
           "a path inside a file": lambda: request.getfixturevalue("a_file") / "repo"}[case]()
    line = only_line(edgepix_cli("export", str(onnx_model), "--format", fmt, "--out", str(out)), 1)
    assert line.startswith("edgepix export: error: ") and str(out) in line and f"--format {fmt}" in line
    if case == "a file":
        assert "expected a folder, found a file" in line and out.read_text() == "not a folder\n"
    else:
        assert not out.exists()


def test_a_failed_folder_export_removes_the_folders_it_made(edgepix_cli, tmp_path):
    out = tmp_path / "new" / "repo"
    missing = tmp_path / "missing.pt"
    line = only_line(edgepix_cli("export", str(missing), "--format", "triton", "--out", str(out)), 1)
    assert "missing.pt" in line
    assert not (tmp_path / "new").exists()  # made for the export, removed with it


@pytest.fixture(scope="module")
def noise_onnx(tmp_path_factory):
    from test_stream_reliability import noise_model

    return noise_model(tmp_path_factory.mktemp("noise") / "noise.onnx")


@pytest.mark.parametrize("seed", ["-1", str(2**63), "x"])
def test_generate_with_a_seed_numpy_cannot_take_is_a_usage_error(edgepix_cli, noise_onnx, tmp_path, seed):
    out = tmp_path / "images"
    line = only_line(edgepix_cli("generate", str(noise_onnx), "--num", "4", "--seed", seed, "--out", str(out)), 2)
    assert line.startswith("edgepix generate: error: argument --seed: expected an integer in 0..9223372036854775807")
    assert line.endswith("(see edgepix generate --help)")
    assert not out.exists()


def test_generate_seeds_at_both_ends_work(edgepix_cli, noise_onnx, tmp_path):
    for seed in ("0", str(2**63 - 1)):
        r = edgepix_cli("-q", "generate", str(noise_onnx), "--num", "2", "--seed", seed, "--out", str(tmp_path / seed))
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (tmp_path / seed).iterdir()) == ["00000.png", "00001.png"]


@pytest.mark.parametrize("url, reason", [("http://[::1", "Invalid IPv6 URL"),
                                         ("rtsp://camera:99999/live", "Port out of range")])
def test_a_malformed_source_url_is_one_line(edgepix_cli, onnx_model, tmp_path, url, reason):
    out = tmp_path / "out.mp4"
    line = only_line(edgepix_cli("segment", str(onnx_model), "--source", url, "--sink", str(out)), 1)
    assert line.startswith(f"edgepix segment: error: {url}: not a valid URL ({reason}")
    nothing_at(out)


@pytest.mark.parametrize("verb, flag", [("segment", "--source"), ("generate", "--input")])
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_source_is_a_usage_error_not_the_synthetic_scenes(edgepix_cli, onnx_model, tmp_path, verb, flag,
                                                                    empty):
    out = tmp_path / "out.mp4"
    line = only_line(edgepix_cli(verb, str(onnx_model), flag, empty, "--sink", str(out), "--max-frames", "5"), 2)
    assert line.startswith(f"edgepix {verb}: error: argument {flag}")
    assert "expected a source URI" in line and "got an empty string" in line
    nothing_at(out)


def test_argparse_usage_errors_are_one_line(edgepix_cli, onnx_model):
    line = only_line(edgepix_cli("segment", str(onnx_model), "--vis", "sparkles"), 2)
    assert line.startswith("edgepix segment: error: argument --vis: invalid choice: 'sparkles'")
    assert line.endswith("(see edgepix segment --help)")


def test_a_reader_that_closes_the_pipe_ends_info_quietly(onnx_model):
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| head -3` after its lines: every write of edgepix's gets EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "edgepix", "info", str(onnx_model)], cwd=REPO, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 1 and r.stderr == "", r.stderr[-3000:]


# ---- clusters ---------------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


@pytest.mark.parametrize("verb", ["generate", "segment"])
def test_an_unreachable_ray_address_is_one_line_in_seconds(edgepix_cli, noise_onnx, onnx_model, tmp_path, verb):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    if verb == "generate":
        args = ["generate", str(noise_onnx), "--num", "4", "--out", str(out)]
    else:
        images = tmp_path / "images"
        images.mkdir()
        cv2.imwrite(str(images / "a.png"), np.zeros((8, 8, 3), np.uint8))
        args = ["segment", str(onnx_model), "--source", str(images), "--sink", f"{out}/"]
    t0 = time.monotonic()
    line = only_line(edgepix_cli("-q", *args, "--engine", "ray", "--address", address, timeout=120), 1)
    assert time.monotonic() - t0 < 60  # Ray alone retried for minutes
    assert line.startswith(f"edgepix {verb}: error: cannot reach the Ray cluster at {address}: Connection refused")
    assert "ray start --head" in line
    assert not out.exists()


# ---- interrupts ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_seg_onnx(tmp_path_factory):
    """Convolutions at 512x512: tens of milliseconds a frame, so that signals land while the workers are inside
    ONNX Runtime or OpenCV."""
    from test_runtime_models import export, seg_spec, small_seg_net

    path = tmp_path_factory.mktemp("slow") / "slow.onnx"
    return export(small_seg_net(3), path, torch.zeros(1, 3, 512, 512), spec=seg_spec(input_size=(512, 512)))


def _archive(model: Path, source: Path, sink: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepix", "-q", "segment", str(model), "--source", str(source),
                             "--sink", f"{sink}/", "--archive", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _committed(sink: Path) -> list[dict]:
    from edgepix.runtime.batch.worker import read_journal

    return read_journal(sink)


def test_an_interrupted_archive_counts_every_committed_output_as_done(slow_seg_onnx, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        cv2.imwrite(str(images / f"{i:02d}.png"), rng.integers(0, 256, (240, 320, 3), np.uint8))
    sink = tmp_path / "out"
    proc = _archive(slow_seg_onnx, images, sink, "--chunk", "16", "--workers", "1")
    _wait_for(lambda: len(_committed(sink)) >= 3)  # inside the first chunk of 16
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.splitlines() == ["edgepix segment: interrupted"], err[-3000:]
    summary = json.loads((sink / ".edgepix" / "summary.json").read_text())
    committed = {e["output"] for e in _committed(sink)}
    on_disk = {p.name for p in sink.glob("*.png")}
    done = {r["output"] for r in summary["items"] if r["outcome"] == "done"}
    assert done == committed == on_disk and summary["done"] == len(done) >= 3
    assert summary["interrupted"] == 48 - len(done) and summary["interrupted_run"] is True
    assert not list(sink.glob(".*.partial*"))


@pytest.mark.parametrize("second_after", [0.0, 0.02, 0.1])
def test_a_second_ctrl_c_ends_an_archive_run_in_one_line(slow_seg_onnx, tmp_path, second_after):
    from test_stream_support import write_scene_video

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        write_scene_video(videos / f"v{i}.mp4", n=150, size=(320, 240), seed=i)
    sink = tmp_path / "out"
    proc = _archive(slow_seg_onnx, videos, sink, "--workers", "2")
    _wait_for(lambda: len(list(sink.glob(".v*.partial.mp4"))) == 2)  # both workers inside a video
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    time.sleep(second_after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # Before: "terminate called without an active exception" and SIGABRT, C++ threads torn down at exit.
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgepix segment: interrupted"), err[-3000:]
    assert not [p for p in sink.iterdir() if not p.name.startswith(".")]  # partial files are hidden; no output
    summary = json.loads((sink / ".edgepix" / "summary.json").read_text())
    assert summary["done"] == 0 and summary["interrupted"] == 2


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """A fastscnn checkpoint as training would write it, untrained (the export does not care, and it is instant)."""
    from edgepix.train.checkpoint import save_checkpoint
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    model = create_model("fastscnn", num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "fastscnn.pt"
    save_checkpoint(path, wrap_state_dict(model.state_dict(), arch="fastscnn", arch_kwargs={"num_classes": 3},
                                          spec=seg_spec(input_size=(64, 64))))
    return path


def test_sigterm_during_an_export_removes_its_temporary_folder(untrained_checkpoint, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "model.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "edgepix", "export", str(untrained_checkpoint), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    _wait_for(lambda: any(tmp.glob(f"edgepix-export-{proc.pid}-*")), timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.splitlines()[-1] == "edgepix export: interrupted", err[-3000:]
    assert list(tmp.iterdir()) == []
    nothing_at(out)


def test_the_next_export_removes_the_temporary_folders_of_killed_ones(untrained_checkpoint, tmp_path):
    from edgepix.export.workspace import remove_dead_workspaces

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edgepix", "export", str(untrained_checkpoint), "--out",
                             str(tmp_path / "model.onnx")], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp)})
    _wait_for(lambda: any(tmp.glob(f"edgepix-export-{proc.pid}-*")), timeout=120)
    proc.kill()  # SIGKILL: no Python runs, the folder stays
    proc.wait()
    # one folder, or two when the kill lands inside the ONNX step, which opens its own workspace within the export's
    left = sorted(tmp.glob(f"edgepix-export-{proc.pid}-*"))
    assert 1 <= len(left) <= 2
    alive = tmp / f"edgepix-export-{os.getpid()}-inuse123"  # this test process: alive, so in use
    alive.mkdir()
    assert remove_dead_workspaces(tmp) == left
    assert sorted(tmp.iterdir()) == [alive]
