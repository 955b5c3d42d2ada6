"""Sinks: video files (codec by extension, fps, size, constant frame rate for live sources), image folders, the
MJPEG server (protocol, statistics, slow and vanishing clients, a real browser), URI parsing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import cv2
import numpy as np
import pytest
from test_stream_support import channel_model, video_info, write_scene_video

from edgepix.runtime import Segmenter
from edgepix.runtime.core.errors import SinkError
from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
from edgepix.runtime.streams.sinks import (
    HttpSink,
    Output,
    RtpSink,
    SinkContext,
    StreamInfo,
    VideoFileSink,
    make_sink,
    parse_http_address,
    parse_rtp_address,
    parse_sink,
)
from edgepix.runtime.streams.sources import opencv_has_gstreamer


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    with Segmenter.load(channel_model(tmp_path_factory.mktemp("sink_model") / "c.onnx"), "ort-cpu", threads=1) as s:
        yield s


@pytest.mark.parametrize("name", ["out.mp4", "out.avi", "out.mkv"])
def test_video_sink_keeps_fps_size_and_every_frame_of_a_file(seg, tmp_path, name):
    video = write_scene_video(tmp_path / "in.mp4", n=20, size=(176, 144), fps=15)
    stats = Pipeline(seg, [str(video)], [str(tmp_path / name)], PipelineOptions(workers=2)).run()
    n, fps, size = video_info(tmp_path / name)
    assert (n, size) == (20, (176, 144)) and fps == pytest.approx(15)
    assert stats["sinks"][0]["files"][str(tmp_path / name)]["frames"] == 20
    assert not list(tmp_path.glob(".*partial*"))


def test_live_frames_are_placed_by_timestamp_at_a_constant_rate(tmp_path):
    sink = VideoFileSink("v.avi", tmp_path / "v.avi")
    sink.open(SinkContext([StreamInfo(0, "cam", 10.0, True)]))
    image = np.zeros((32, 48, 3), np.uint8)
    # 10 fps nominal; frames arrive at t = 0, 0.1, 0.4 (an outage of two frames) and 0.42 (too early: dropped)
    for i, t in enumerate((0.0, 0.1, 0.4, 0.42)):
        sink.write(Output(image + 40 * i, 0, i, 100.0 + t))
    sink.close()
    n, fps, size = video_info(tmp_path / "v.avi")
    assert n == 5 and fps == pytest.approx(10) and size == (48, 32)  # slots 0, 1, 2 (repeat), 3 (repeat), 4


def test_odd_and_changing_frame_sizes_are_written_at_the_first_even_size(tmp_path):
    sink = VideoFileSink("v.avi", tmp_path / "v.avi")
    sink.open(SinkContext([StreamInfo(0, "f", None, False)]))
    for i, (h, w) in enumerate(((31, 47), (60, 80), (31, 47))):
        sink.write(Output(np.full((h, w, 3), 100, np.uint8), 0, i, float(i)))
    sink.close()
    n, fps, size = video_info(tmp_path / "v.avi")
    assert n == 3 and size == (48, 32) and fps == pytest.approx(30)  # unknown source rate: 30


def test_image_pattern_sink_names_files_by_frame_index(seg, tmp_path):
    Pipeline(seg, ["synthetic://?size=64x48&fps=0&frames=5"], [str(tmp_path / "f_%03d.png")]).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f_{i:03d}.png" for i in range(5)]


@pytest.mark.parametrize("uri, kind", [("display://", "display"), ("null://", "null"), ("x.mp4", "video"),
                                       ("x.webm", "video"), ("dir/", "images"), ("d/%04d.jpg", "images"),
                                       ("http://0.0.0.0:8080", "http"), ("x.mp4?stream=1", "video"),
                                       ("rtp://192.168.1.20:5004?stream=1", "rtp")])
def test_sink_uris(uri, kind):
    spec = parse_sink(uri)
    assert spec.kind == kind
    assert spec.streams == (frozenset({1}) if "stream=1" in uri else None)


def test_bad_sink_uris_and_the_default_http_address():
    with pytest.raises(SinkError, match="unknown sink scheme"):
        parse_sink("ftp://x")
    with pytest.raises(SinkError, match="cannot tell"):
        parse_sink("out.xyz")
    assert parse_http_address(":8080", "u") == ("127.0.0.1", 8080)
    assert parse_http_address("localhost:9", "u") == ("127.0.0.1", 9)
    assert parse_http_address("0.0.0.0:8080", "u") == ("0.0.0.0", 8080)


def test_rtp_addresses_and_parameters():
    assert parse_rtp_address("192.168.1.20:5004", "u") == ("192.168.1.20", 5004)
    assert parse_rtp_address("localhost:5004", "u") == parse_rtp_address(":5004", "u") == ("127.0.0.1", 5004)
    assert parse_rtp_address("[::1]:5004", "u") == ("::1", 5004)
    for bad in ("rtp://127.0.0.1", "rtp://h:0", "rtp://h:65536", "rtp://h:port", "rtp://a!b:5004"):
        with pytest.raises(SinkError, match="rtp://") as e:
            make_sink(bad)
        assert "\n" not in str(e.value)
    sink = make_sink("rtp://239.0.0.1:5004?bitrate=2000&fps=25")
    assert isinstance(sink, RtpSink) and (sink.host, sink.port, sink.bitrate_kbits, sink.fps_override) == (
        "239.0.0.1", 5004, 2000, 25.0)
    assert not sink.lossless  # newest frame, like the display and HTTP sinks
    with pytest.raises(SinkError, match="bitrate"):
        make_sink("rtp://h:5004?bitrate=5")


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer (tests/test_gstreamer.py sends RTP)")
def test_the_rtp_sink_without_gstreamer_fails_in_one_line_before_the_model_loads(tmp_path):
    model = channel_model(tmp_path / "c.onnx")
    done = subprocess.run([sys.executable, "-m", "edgepix", "segment", str(model), "--source", "synthetic://?frames=3",
                           "--sink", "rtp://127.0.0.1:5004"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "rtp://127.0.0.1:5004 needs OpenCV built with GStreamer" in done.stderr
    assert "edgepix doctor" in done.stderr


def test_a_busy_port_is_a_sink_error(seg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SinkError, match="cannot listen"):
            Pipeline(seg, ["synthetic://?fps=0&frames=1&size=32x32"], [f"http://127.0.0.1:{port}"]).run()


def read_mjpeg_frames(response, n: int) -> list[np.ndarray]:
    frames = []
    while len(frames) < n:
        line = response.readline()
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
            response.readline()  # blank line
            frames.append(cv2.imdecode(np.frombuffer(response.read(length), np.uint8), cv2.IMREAD_COLOR))
    return frames


def run_in_thread(pipeline: Pipeline) -> threading.Thread:
    t = threading.Thread(target=pipeline.run, daemon=True)
    t.start()
    return t


def test_mjpeg_stream_page_and_statistics(seg):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)
    p = Pipeline(seg, ["synthetic://?size=96x64&fps=30"], [sink], PipelineOptions(duration=10))
    t = run_in_thread(p)
    try:
        while sink.server is None:
            time.sleep(0.01)
        base = sink.url
        with urllib.request.urlopen(base + "stream.mjpg", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            frames = read_mjpeg_frames(r, 3)
        assert all(f.shape == (64, 96, 3) for f in frames)
        page = urllib.request.urlopen(base, timeout=5).read().decode()
        assert 'src="stream/0.mjpg"' in page and "stats.json" in page
        stats = json.loads(urllib.request.urlopen(base + "stats.json", timeout=5).read())
        assert stats["frames"] > 0 and "infer" in stats["stages"] and stats["streams"][0]["state"] == "up"
        jpg = urllib.request.urlopen(base + "frame/0.jpg", timeout=5).read()
        assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).shape == (64, 96, 3)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "nothing", timeout=5)
    finally:
        p.stop()
        t.join(10)
    assert sink.server is None  # closed with the pipeline


def test_slow_and_vanishing_clients_never_hold_up_the_pipeline(seg):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0, client_timeout=1.0, quality=100)
    # shaded, noisy 640x480 frames at JPEG quality 100: far more than socket buffers hold
    p = Pipeline(seg, ["synthetic://?size=640x480&fps=0&frames=150&shading=1"], [sink, "null://"],
                 PipelineOptions(workers=2))
    p.start()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", sink.port))
    stalled.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")  # ... and never reads
    vanishing = socket.create_connection(("127.0.0.1", sink.port))
    vanishing.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
    vanishing.recv(100)
    vanishing.close()
    t0 = time.monotonic()
    try:
        assert p.wait(30), "the pipeline stalled"
        stats = p.run()
        assert stats["frames"] == 150 and time.monotonic() - t0 < 30
        deadline = time.monotonic() + 5
        while sink.clients and time.monotonic() < deadline:  # the stalled client is still connected, not reading
            time.sleep(0.05)
    finally:
        stalled.close()
    assert sink.clients_total == 2 and sink.clients == 0
    assert sink.clients_timed_out == 1  # the stalled client really blocked its sender, and only it


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="chromium is not installed (make setup installs it; or apt-get install chromium)")
def test_the_page_shows_live_frames_in_a_headless_browser(seg, tmp_path):
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)
    p = Pipeline(seg, ["synthetic://?size=320x240&fps=25"], [sink], PipelineOptions(duration=60))
    t = run_in_thread(p)
    shot = tmp_path / "page.png"
    try:
        while sink.server is None:
            time.sleep(0.01)
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=640,480",
                        f"--screenshot={shot}", "--virtual-time-budget=2000", sink.url],
                       capture_output=True, timeout=90, check=True)
    finally:
        p.stop()
        t.join(10)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (480, 640)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    colourful = ((hsv[..., 1] > 80) & (hsv[..., 2] > 40)).mean()
    # The page itself is grey on black; the class colours of the live view make a large colourful area.
    assert colourful > 0.05, f"the screenshot has no live view ({colourful:.3f} colourful)"
    assert p.stats()["sinks"][0]["frames_sent"] > 0


def test_display_without_a_screen_points_to_the_browser_view(seg, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SinkError, match="http://0.0.0.0:8080"):
        Pipeline(seg, ["synthetic://?fps=0&frames=1&size=32x32"], ["display://"]).run()


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")
def test_display_shows_frames_with_a_hud_on_a_virtual_screen(seg, tmp_path, monkeypatch):
    from edgepix.runtime.streams.sinks import display_available

    number = 90 + os.getpid() % 50
    xvfb = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/tmp/.X11-unix/X{number}") and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setenv("DISPLAY", f":{number}")
        monkeypatch.setenv("QT_LOGGING_RULES", "*=false")
        if display_available() is not None:
            pytest.skip(f"no usable display: {display_available()}")
        video = write_scene_video(tmp_path / "v.mp4", n=20, size=(160, 120))
        stats = Pipeline(seg, [str(video)], ["display://"], PipelineOptions()).run()
    finally:
        xvfb.kill()
        xvfb.wait(5)
    assert stats["frames"] == 20 and stats["sinks"][0]["frames_written"] >= 1 and not stats["errors"]


def test_the_last_words_wait_for_a_writer_that_silenced_stderr():
    """A worker abandoning its video silences file descriptor 2 for FFmpeg; the line printed before the process ends
    at once must not go to devnull: `keep_stderr_for_last_words` waits for the silence to end and keeps it ended."""
    from edgepix.runtime.streams.sinks import video

    before = os.fstat(2)
    silenced, release = threading.Event(), threading.Event()

    def abandoning_worker():
        with video._quiet_stderr(True):
            silenced.set()
            release.wait(5)

    worker = threading.Thread(target=abandoning_worker)
    worker.start()
    assert silenced.wait(5)
    assert os.fstat(2).st_ino != before.st_ino  # devnull for now
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    assert video.keep_stderr_for_last_words(timeout=5)
    assert time.monotonic() - t0 >= 0.15 and os.fstat(2).st_ino == before.st_ino
    def second_silencer():
        with video._quiet_stderr(True):
            pass

    second = threading.Thread(target=second_silencer, daemon=True)
    second.start()
    second.join(0.2)
    assert second.is_alive() and os.fstat(2).st_ino == before.st_ino  # no one silences it again
    video._SILENCING.release()  # this test process goes on: let the waiting thread silence and restore
    second.join(5)
    worker.join(5)
    assert not second.is_alive() and os.fstat(2).st_ino == before.st_ino
