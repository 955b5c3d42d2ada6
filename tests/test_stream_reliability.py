"""Reliability of the stream side: a full disk while writing a video, partial files left by a killed run, every
output path checked before the model loads, atomic writes that respect the umask, sources that reject absurd
parameters and say when a file ends early, an HTTP sink that bad clients cannot starve, and a live stream that is
back within 2 s of its server's return."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_edgepix
from test_stream_support import StreamServer, channel_model, free_port, need_ffmpeg, video_info, write_scene_video

from edgepix.runtime import Segmenter
from edgepix.runtime.core.errors import SinkError, SourceError
from edgepix.runtime.core.fileio import atomic_write_text
from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions, summary_line
from edgepix.runtime.streams.sinks import HttpSink
from edgepix.runtime.streams.sources import SourceOptions, open_source, parse_source


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return channel_model(tmp_path_factory.mktemp("reliability_model") / "c.onnx")


@pytest.fixture
def seg(model):
    with Segmenter.load(model, "ort-cpu", threads=1) as s:
        yield s


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


# ---- a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a video of a few hundred frames cannot fit (300 frames of 320x240 took 600 KB as MPEG-4)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs here ({e})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)


@pytest.mark.parametrize("name", ["out.mp4", "out.avi"])
def test_a_full_disk_fails_the_run_with_one_line_and_leaves_no_broken_video(model, small_disk, name):
    out = small_disk / name
    done = run_edgepix("-q", "segment", str(model), "--source", "synthetic://?size=320x240&fps=0&frames=300&seed=1",
                       "--sink", str(out))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(out) in lines[0] and "no space left on device" in lines[0]
    # Complete and playable, or absent; and no partial file left behind on the full disk.
    assert not out.exists() or video_info(out)[0] > 0
    assert not [p.name for p in small_disk.iterdir() if "partial" in p.name]


def test_a_full_disk_is_in_the_statistics(seg, small_disk):
    out = small_disk / "out.avi"
    p = Pipeline(seg, ["synthetic://?size=320x240&fps=0&frames=300&seed=1"], [str(out)])
    with pytest.raises(SinkError, match="no space left on device"):
        p.run()
    stats = p.stats()
    files = stats["sinks"][0]["files"]
    assert files[str(out)]["frames"] == 0 and not files[str(out)]["complete"]
    assert "no space left" in files[str(out)]["error"] and not out.exists()


# ---- killed runs, output paths, umask ------------------------------------------------------------------------------


def test_a_partial_video_of_a_killed_run_is_removed_by_the_next_run(model, tmp_path):
    out = tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "edgepix", "-q", "segment", str(model), "--source", "synthetic://?size=160x120&fps=30",
           "--sink", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        partials: list[Path] = []
        while time.monotonic() < deadline:
            partials = [p for p in tmp_path.iterdir() if "partial" in p.name and p.stat().st_size > 10_000]
            if partials:
                break
            time.sleep(0.1)
        assert partials, "the run did not start writing its video"
    finally:
        proc.send_signal(signal.SIGKILL)  # a power cut: no chance to clean up
        proc.wait(10)
    assert partials[0].exists() and not out.exists()

    done = run_edgepix("-q", "segment", str(model), "--source", "synthetic://?size=160x120&fps=0&frames=10",
                       "--sink", str(out))
    assert done.returncode == 0, done.stderr
    assert f"removed 1 partial file(s) left by an interrupted run writing {out}" in done.stderr
    assert partials[0].name in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and video_info(out)[0] == 10


def _hold_partial(target: str, ready: str) -> None:
    """In a child process: create a partial file of `target`, say so, then wait to be killed."""
    from edgepix.runtime.core.fileio import PartialFile

    part = PartialFile(target)
    Path(ready).write_text(str(part.path))
    time.sleep(60)


def test_stale_partial_files_are_removed_and_live_ones_left_alone(tmp_path):
    import multiprocessing

    from edgepix.runtime.core.fileio import remove_stale_partials

    target = tmp_path / "model.onnx"
    ctx = multiprocessing.get_context("spawn")
    dead = ctx.Process(target=_hold_partial, args=(str(target), str(tmp_path / "dead.txt")))
    alive = ctx.Process(target=_hold_partial, args=(str(target), str(tmp_path / "alive.txt")))
    dead.start()
    alive.start()
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "dead.txt").exists() and (tmp_path / "alive.txt").exists()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(10)
        dead_part = Path((tmp_path / "dead.txt").read_text())
        alive_part = Path((tmp_path / "alive.txt").read_text())
        legacy = tmp_path / ".model.onnx.abc123.partial"  # the name older versions used
        legacy.write_bytes(b"x")
        removed = remove_stale_partials(target)
        assert sorted(removed) == sorted([dead_part, legacy])
        assert alive_part.exists() and not dead_part.exists()  # a running writer keeps its file
    finally:
        alive.kill()
        alive.join(10)


def test_atomic_writes_get_the_mode_the_umask_gives_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("a.json") == mode("b.json") == 0o644 and mode("c.json") == 0o600
    os.chmod(tmp_path / "a.json", 0o640)
    atomic_write_text(tmp_path / "a.json", "[]")  # overwriting keeps the file's mode, as open() does
    assert mode("a.json") == 0o640


@pytest.mark.parametrize("flag", ["--stats", "--sink"])
def test_an_unwritable_output_fails_before_the_model_loads(tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    broken_model = tmp_path / "broken.onnx"  # loading it would fail: the output check must come first
    broken_model.write_bytes(b"not an onnx file")
    target = str(blocker / ("stats.json" if flag == "--stats" else "out.mp4"))
    done = run_edgepix("-q", "segment", str(broken_model), "--source", "synthetic://?fps=0&frames=3&size=32x32",
                       "--sink", "null://" if flag == "--stats" else target,
                       *(["--stats", target] if flag == "--stats" else []))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "a_file" in lines[0] and "broken.onnx" not in lines[0]


def noise_model(path: Path) -> Path:
    """A tiny noise -> image generator (z (N, 16) -> tanh image (N, 3, 8, 12)) built with the onnx package."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 3 * 8 * 12)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 3, 8, 12], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["z", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["r"]),
         helper.make_node("Tanh", ["r"], ["image"])], "noise",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 12])], initializer=[w, shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    spec = ModelSpec(task="generation-noise", model_name="dcgan", input_size=(8, 12), latent_size=16,
                     output_range=(-1.0, 1.0), output_kind="image", input_name="z", output_name="image",
                     mean=(0, 0, 0), std=(1, 1, 1), dynamic_batch=True)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, spec.to_json()
    onnx.save(proto, str(path))
    return path


def test_generate_checks_grid_and_out_before_any_work(tmp_path):
    model = noise_model(tmp_path / "gen.onnx")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = run_edgepix("-q", "generate", str(model), "--num", "4", "--out", str(tmp_path / "images"),
                       "--grid", str(blocker / "grid.png"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "--grid" in lines[0], done.stderr
    assert not list((tmp_path / "images").glob("*.png"))  # nothing was generated first
    done = run_edgepix("-q", "generate", str(model), "--num", "4", "--out", str(tmp_path / "images"),
                       "--grid", str(tmp_path / "grid.png"))
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "images").glob("*.png"))) == 4 and (tmp_path / "grid.png").stat().st_size > 0


# ---- sources -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, message", [
    ("synthetic://?size=100000x100000", "size: expected 16..4096"),
    ("synthetic://?seed=-1", "seed: expected an integer 0.."),
    ("synthetic://?seed=" + "9" * 5000, "seed: expected an integer"),
    ("synthetic://?size=" + "9" * 5000 + "x16", "size: expected WIDTHxHEIGHT"),
    ("synthetic://?fps=0.0001", "fps: expected 0 (as fast as possible) or 0.1..1000"),
    ("synthetic://?fps=nan", "fps: expected 0"),
    ("synthetic://?frames=-5", "frames: expected an integer >= 1"),
    ("synthetic://?frames=0", "frames: expected an integer >= 1"),
    ("synthetic://?speed=inf", "speed: expected 0..1000"),
])
def test_absurd_synthetic_parameters_are_one_line_errors(uri, message):
    with pytest.raises(SourceError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")) as e:
        parse_source(uri)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_absurd_source_options_are_one_line_errors():
    for kwargs in ({"size": (10**6, 10)}, {"fps": 1e-6}, {"read_timeout": float("nan")}, {"open_timeout": 1e12}):
        with pytest.raises(SourceError):
            SourceOptions(**kwargs)


def test_a_negative_frame_count_fails_the_command_with_one_line(model):
    done = run_edgepix("-q", "segment", str(model), "--source", "synthetic://?frames=-5", "--sink", "null://")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "frames" in lines[0], done.stderr


def test_a_slow_paced_source_delivers_its_first_frame_at_once():
    source = open_source("synthetic://?size=32x32&fps=0.2")
    t0 = time.monotonic()
    with source:
        frame = next(iter(source))
    assert frame.index == 0 and time.monotonic() - t0 < 2.0


def test_a_truncated_video_says_how_many_frames_its_container_promised(seg, tmp_path):
    video = write_scene_video(tmp_path / "full.avi", n=60, size=(96, 64), fourcc="MJPG")
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])  # a copy that broke off halfway
    stats = Pipeline(seg, [str(cut)], ["null://"]).run()
    stream = stats["streams"][0]
    assert 0 < stream["frames_read"] < 60 and stream["frames_promised"] == 60
    assert f"promised 60 frames, {stream['frames_read']} could be decoded" in stream["warning"]
    assert "promised 60 frames" in summary_line(stats)
    # a complete file says nothing of the kind
    stats = Pipeline(seg, [str(video)], ["null://"]).run()
    assert stats["streams"][0]["warning"] is None and "promised" not in summary_line(stats)


def test_a_folder_of_only_undecodable_files_is_an_error(model, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "c.mp4"):
        (folder / name).write_bytes(b"this is not an image")
    source = open_source(str(folder), SourceOptions(loop=True))  # and looping it does not spin forever
    frames: list = []
    reader = threading.Thread(target=lambda: frames.extend(source), daemon=True)
    source.start()
    reader.start()
    reader.join(10)
    ended = not reader.is_alive()
    source.close()
    assert ended, "the source never ended"
    assert frames == [] and "none of the 3 file(s) could be decoded" in source.error
    done = run_edgepix("-q", "segment", str(model), "--source", str(folder), "--sink", "null://")
    assert done.returncode == 1 and "none of the 3 file(s) could be decoded" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ---- the HTTP sink and bad clients ---------------------------------------------------------------------------------


@contextlib.contextmanager
def http_pipeline(seg, sink: HttpSink, uri: str = "synthetic://?size=160x120&fps=25"):
    p = Pipeline(seg, [uri], [sink], PipelineOptions(duration=120))
    t = threading.Thread(target=p.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while sink.server is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield p
    finally:
        p.stop()
        t.join(15)


def closed_by_server(s: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection (True) or `timeout` passes (False)."""
    s.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def test_silent_and_half_sent_requests_are_closed_within_seconds(seg):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)  # the defaults a user gets
    with http_pipeline(seg, sink):
        silent = socket.create_connection(("127.0.0.1", sink.port))
        half = socket.create_connection(("127.0.0.1", sink.port))
        half.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        trickle = socket.create_connection(("127.0.0.1", sink.port))
        t0 = time.monotonic()
        for i in range(7):  # a byte a second keeps a per-read timeout happy, not an overall one
            with contextlib.suppress(OSError):
                trickle.sendall(b"GET / HTTP/1.0\r\nX: y\r\n"[i:i + 1])
            time.sleep(1.0)
        results = {name: closed_by_server(s, 8.0) for name, s in
                   (("silent", silent), ("half", half), ("trickle", trickle))}
        elapsed = time.monotonic() - t0
        for s in (silent, half, trickle):
            s.close()
        stats = sink.stats()
    assert all(closed for closed, _ in results.values()), results
    assert results["silent"][1].startswith(b"HTTP/1.0 408") and results["half"][1].startswith(b"HTTP/1.0 408")
    assert elapsed < 16 and stats["requests_timed_out"] == 3


def test_viewers_beyond_the_cap_get_a_clear_503_and_the_rest_keeps_working(seg):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0, max_clients=2, max_connections=8)
    with http_pipeline(seg, sink):
        viewers = [urllib.request.urlopen(sink.url + "stream.mjpg", timeout=5) for _ in range(2)]
        for v in viewers:
            v.read(1000)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(sink.url + "stream.mjpg", timeout=5)
        assert e.value.code == 503 and b"2 viewers" in e.value.read()
        stats = json.loads(urllib.request.urlopen(sink.url + "stats.json", timeout=5).read())
        assert stats["frames"] > 0
        # connections beyond max_connections are answered at once, without a thread
        extra = [socket.create_connection(("127.0.0.1", sink.port)) for _ in range(8)]
        closed, data = closed_by_server(extra[-1], 3.0)
        assert closed and data.startswith(b"HTTP/1.0 503")
        for s in extra:
            s.close()
        for v in viewers:
            v.close()
    assert sink.stats()["refused_busy"] >= 2


def count_frames(port: int, counter: dict, stop: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        while not stop.is_set():
            data = s.recv(65536)
            if not data:
                return
            counter["n"] += data.count(b"--edgepixframe")


def test_sixty_silent_connections_do_not_starve_a_viewer_or_the_statistics(seg):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)
    with http_pipeline(seg, sink):
        counter, stop = {"n": 0}, threading.Event()
        viewer = threading.Thread(target=count_frames, args=(sink.port, counter, stop), daemon=True)
        viewer.start()
        time.sleep(1.0)
        n0 = counter["n"]
        time.sleep(3.0)
        before = counter["n"] - n0
        bad = []
        for i in range(60):  # never send, send half a request, or ask for the stream and never read
            s = socket.create_connection(("127.0.0.1", sink.port))
            if i % 3 == 1:
                s.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            bad.append(s)
        n0 = counter["n"]
        latencies = []
        for _ in range(3):
            t1 = time.monotonic()
            urllib.request.urlopen(sink.url + "stats.json", timeout=10).read()
            latencies.append(time.monotonic() - t1)
            time.sleep(1.0)
        during = counter["n"] - n0
        stop.set()
        for s in bad:
            s.close()
    rate_before, rate_during = before / 3.0, during / sum(1.0 + x for x in latencies)
    print(f"viewer: {rate_before:.1f} frames/s before, {rate_during:.1f} with 60 bad connections; "
          f"/stats.json max {max(latencies) * 1000:.0f} ms")
    assert rate_during >= 0.9 * rate_before and max(latencies) < 1.0


# ---- a live stream whose server restarts ---------------------------------------------------------------------------


def test_a_live_stream_is_back_within_two_seconds_of_its_servers_return(tmp_path):
    need_ffmpeg()
    video = write_scene_video(tmp_path / "cam.mp4", n=45, size=(320, 240), fps=15)
    server = StreamServer(video, free_port()).start()
    source = open_source(server.url, SourceOptions(open_timeout=5.0, read_timeout=2.0)).start()
    gaps = []
    try:
        for _ in range(2):
            time.sleep(1.5)
            outages_before = len(source.outages)
            server.kill()
            time.sleep(3.0)
            # From the server's start, not from when it listens: a client may connect (and so close ffmpeg's
            # one-client listening socket) before the listening port is seen.
            t_back = time.monotonic()
            server.start()
            deadline = t_back + 10
            while time.monotonic() < deadline and not (len(source.outages) > outages_before
                                                       and source.outages[-1].first_frame):
                time.sleep(0.005)
            gaps.append((source.outages[-1].first_frame or float("inf")) - t_back)
        stats = source.stats()
    finally:
        source.close()
        server.kill()
    print("first frame after each restart: " + ", ".join(f"{g:.2f} s" for g in gaps))
    assert max(gaps) < 2.0
    assert stats["reconnects"] == 2
    for o in stats["outages"]:
        assert None not in o.values() and not o["ongoing"], o
        assert o["start_s"] < o["answered_s"] <= o["reopened_s"] <= o["first_frame_s"], o
        assert o["first_frame_s"] - o["answered_s"] < 2.0
