"""A real network stream: ffmpeg serves MPEG-TS over HTTP on 127.0.0.1, is killed mid-run and started again.
The pipeline reconnects, keeps counting frames, reports the outage, and the other stream never stalls."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import pytest
from test_stream_support import StreamServer, channel_model, free_port, need_ffmpeg, write_scene_video

from edgepix.runtime import Segmenter
from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
from edgepix.runtime.streams.sources import SourceOptions, SourceState, open_source

FPS = 25.0


def wait_for(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture
def server(tmp_path):
    need_ffmpeg()
    video = write_scene_video(tmp_path / "camera.mp4", n=50, size=(320, 240), fps=FPS)
    s = StreamServer(video, free_port()).start()
    yield s
    s.kill()


def test_a_stream_whose_server_restarts_reconnects_and_the_other_stream_keeps_going(server, tmp_path):
    options = SourceOptions(open_timeout=5.0, read_timeout=2.0, backoff_initial=0.1, backoff_max=1.0)
    seg = Segmenter.load(channel_model(tmp_path / "c.onnx"), "ort-cpu", threads=1)
    # stream 0: a live synthetic camera; stream 1: the network stream
    pipeline = Pipeline(seg, ["synthetic://?size=160x120&fps=25", server.url], [f"{tmp_path / 'net'}/?stream=1"],
                        PipelineOptions(workers=2, batch_timeout=0.03, duration=60), source_options=options)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    try:
        net = None
        assert wait_for(lambda: pipeline.per_stream[1] >= 40, 20), "no frames from the network stream"
        net = pipeline.sources[1]
        age_before = pipeline.recorder.summary()["frame_age"]

        server.kill()
        t_kill = time.monotonic()
        assert wait_for(lambda: net.state is SourceState.DOWN, 5), "the outage was not noticed"
        t_down = time.monotonic()
        frames_at_down = pipeline.per_stream[1]
        other_at_down = pipeline.per_stream[0]
        time.sleep(1.5)  # the server stays away; reconnect attempts fail meanwhile
        other_during = pipeline.per_stream[0] - other_at_down
        assert net.state is SourceState.DOWN and net.outages[-1].attempts >= 2

        server.start()
        t_back = time.monotonic()
        assert wait_for(lambda: net.frames_read > 0 and net.reconnects == 1 and net.state is SourceState.UP, 10)
        reconnect_s = net.outages[-1].end - t_back
        assert wait_for(lambda: pipeline.per_stream[1] >= frames_at_down + 25, 10), "frames stopped after reconnect"
    finally:
        pipeline.stop()
        thread.join(15)
        seg.close()
    stats = pipeline.stats()
    stream = stats["streams"][1]
    print(f"outage noticed after {t_down - t_kill:.2f} s; reconnected {reconnect_s:.2f} s after the server "
          f"returned; other stream {other_during} frames in 1.5 s of outage; frame age before the outage "
          f"p50 {age_before.p50:.1f} ms p90 {age_before.p90:.1f} ms")
    assert reconnect_s < 5.0
    assert stream["reconnects"] == 1 and len(stream["outages"]) == 1 and not stream["outages"][0]["ongoing"]
    assert stream["outages"][0]["duration_s"] > 1.4
    assert stats["streams"][0]["reconnects"] == 0
    assert other_during >= 0.6 * FPS * 1.5, "the live stream stalled while the other one was down"
    # Newest-frame policy: frames are taken fresh, not queued behind the decoder.
    assert age_before.p50 < 2 * 1000 / FPS
    written = len(list((tmp_path / "net").iterdir()))
    assert written == stream["frames_read"] - stream["dropped"] or written >= frames_at_down + 25


def test_reconnect_attempts_limit_ends_the_stream_with_the_reason(server):
    source = open_source(server.url, SourceOptions(read_timeout=1.0, reconnect_attempts=2, backoff_initial=0.05,
                                                   backoff_max=0.1))
    source.start()
    try:
        assert wait_for(lambda: source.frames_read > 5, 10)
        server.kill()
        assert wait_for(lambda: source.ended, 10)
    finally:
        source.close()
    assert source.error and "gave up after 2 reconnect attempt(s)" in source.error
    assert source.outages[-1].attempts == 2


def test_an_unreachable_stream_fails_at_start_within_the_open_timeout():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="cannot open"):
        open_source(f"http://127.0.0.1:{free_port()}/none.ts", SourceOptions(open_timeout=2.0)).start()
    assert time.monotonic() - t0 < 5


@pytest.fixture
def http_folder(tmp_path):
    """A plain HTTP file server on 127.0.0.1 for a folder (in this process)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_video_file_over_http_is_read_frame_by_frame(http_folder):
    folder, base = http_folder
    raw = write_scene_video(folder.parent / "raw.mp4", n=40, size=(160, 120), fps=FPS)
    # The stdlib's file server cannot serve byte ranges, so put the index first (as web videos have it).
    subprocess.run([need_ffmpeg(), "-loglevel", "error", "-i", str(raw), "-c", "copy", "-movflags", "+faststart",
                    str(folder / "clip.mp4")], check=True)
    source = open_source(f"{base}/clip.mp4")
    frames = []
    for frame in source:
        frames.append(frame.index)
        time.sleep(0.005)  # a consumer slower than the download: a live source would drop frames
    assert not source.live and source.dropped == 0 and frames == list(range(40))


def test_live_hls_is_paced_by_its_timestamps_not_dropped_segment_by_segment(http_folder):
    folder, base = http_folder
    video = write_scene_video(folder.parent / "camera.mp4", n=50, size=(160, 120), fps=FPS)
    writer = subprocess.Popen(
        [need_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1", "-i",
         str(video), "-an", "-c:v", "mpeg2video", "-g", "25", "-f", "hls", "-hls_time", "1", "-hls_list_size", "4",
         "-hls_flags", "delete_segments", str(folder / "live.m3u8")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(list(folder.glob("live*.ts"))) >= 2, 15)
        source = open_source(f"{base}/live.m3u8").start()
        assert source.live
        arrivals = []
        for frame in source:
            arrivals.append(frame.timestamp)
            if arrivals[-1] - arrivals[0] > 3.0:
                break
        source.close()
    finally:
        writer.kill()
        writer.wait(5)
    gaps = np.diff(arrivals[1:])  # after the first frame
    # Segments of 25 frames arrive at once; paced by their timestamps they come out one per 40 ms.
    assert len(arrivals) >= 0.8 * FPS * 3 and source.dropped <= 3
    assert np.percentile(gaps, 90) < 0.08


def test_an_mjpeg_http_camera_is_a_live_source(tmp_path):
    """Many IP cameras serve multipart MJPEG over HTTP; the pipeline's own HTTP sink is one."""
    from edgepix.runtime.streams.sinks import HttpSink

    seg = Segmenter.load(channel_model(tmp_path / "c.onnx"), "ort-cpu", threads=1)
    sink = HttpSink("http://127.0.0.1:0", "127.0.0.1", 0)
    camera = Pipeline(seg, ["synthetic://?size=160x120&fps=25"], [sink], PipelineOptions(duration=30))
    thread = threading.Thread(target=camera.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: sink.server is not None, 10)
        source = open_source(sink.url + "stream.mjpg", SourceOptions(open_timeout=5.0)).start()
        frames = []
        for frame in source:
            frames.append(frame)
            if len(frames) == 25:
                break
        source.close()
    finally:
        camera.stop()
        thread.join(10)
        seg.close()
    assert source.live and frames[-1].image.shape == (120, 160, 3)
    assert frames[-1].timestamp - frames[0].timestamp < 3.0  # about 1 s of a 25 fps camera
