"""Sources: URI parsing, frame conversion, files frame by frame, live newest-frame policy, image lists."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from test_stream_support import write_scene_video

from edgepix.runtime.core.errors import InputError, SourceError
from edgepix.runtime.streams.sources import (
    Frame,
    FrameBuffer,
    SourceKind,
    SourceOptions,
    open_source,
    opencv_has_gstreamer,
    parse_source,
    sane_fps,
    to_bgr8,
)


@pytest.mark.parametrize("uri, kind, target", [
    ("0", SourceKind.CAMERA, "0"),
    ("/dev/video2", SourceKind.CAMERA, "/dev/video2"),
    ("v4l2:///dev/video1", SourceKind.CAMERA, "/dev/video1"),
    ("v4l2://3", SourceKind.CAMERA, "/dev/video3"),
    ("csi://1", SourceKind.CSI, "1"),
    ("rtsp://10.0.0.5:554/stream?channel=1", SourceKind.NETWORK, "rtsp://10.0.0.5:554/stream?channel=1"),
    ("rtmp://127.0.0.1/live/x", SourceKind.NETWORK, "rtmp://127.0.0.1/live/x"),
    ("https://example.com/cam.m3u8", SourceKind.NETWORK, "https://example.com/cam.m3u8"),
    ("gst://videotestsrc ! appsink", SourceKind.GSTREAMER, "videotestsrc ! appsink"),
    ("synthetic://?size=320x240&fps=0", SourceKind.SYNTHETIC, ""),
    ("", SourceKind.SYNTHETIC, ""),
])
def test_uris_parse_like_jetson_inference(uri, kind, target):
    spec = parse_source(uri)
    assert spec.kind is kind and spec.target == target


def test_camera_mode_comes_from_the_query_and_live_flags_follow_the_kind(tmp_path):
    spec = parse_source("/dev/video0?size=1280x720&fps=30&codec=mjpg")
    assert spec.options.size == (1280, 720) and spec.options.fps == 30 and spec.options.codec == "MJPG"
    assert spec.live
    video = write_scene_video(tmp_path / "v.mp4", n=3)
    assert not parse_source(str(video)).live
    assert parse_source(str(video), SourceOptions(realtime=True)).live
    assert parse_source("synthetic://?fps=25").live and not parse_source("synthetic://?fps=0").live


@pytest.mark.parametrize("uri, words", [
    ("ftp://host/x", ["unknown source scheme", "rtsp://", "synthetic://"]),
    ("/no/such/video.mp4", ["no such file", "synthetic://"]),
    ("synthetic://?colour=red", ["unknown synthetic:// parameter", "size"]),
    ("synthetic://?size=big", ["WIDTHxHEIGHT"]),
    ("/dev/video0?zoom=2", ["unknown source parameter", "size"]),
    ("csi://front", ["csi://N"]),
])
def test_bad_uris_say_what_was_expected(uri, words):
    with pytest.raises(SourceError) as e:
        parse_source(uri)
    for w in words:
        assert w in str(e.value)


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")
@pytest.mark.parametrize("uri", ["csi://0", "gst://videotestsrc ! videoconvert ! appsink"])
def test_gstreamer_sources_without_gstreamer_point_to_doctor(uri):
    with pytest.raises(SourceError, match="edgepix doctor") as e:
        open_source(uri).start()
    assert "GStreamer" in str(e.value)


def test_a_missing_camera_fails_at_start_with_the_cameras_that_exist():
    with pytest.raises(SourceError, match="cameras here"):
        open_source("/dev/video77").start()


def test_frames_of_any_camera_format_become_bgr_uint8():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_bgr8(grey).shape == (3, 4, 3) and (to_bgr8(grey)[..., 1] == grey).all()
    assert to_bgr8(grey[..., None]).shape == (3, 4, 3)
    bgra = np.dstack([np.full((3, 4), v, np.uint8) for v in (10, 20, 30, 255)])
    assert (to_bgr8(bgra) == (10, 20, 30)).all()
    deep = np.full((3, 4, 3), 65535, np.uint16)
    assert (to_bgr8(deep) == 255).all()
    assert (to_bgr8(np.ones((2, 2, 3), np.float32)) == 255).all()
    with pytest.raises(InputError, match="expected"):
        to_bgr8(np.zeros((2, 2, 5), np.uint8))


@pytest.mark.parametrize("value, expected", [(25.0, 25.0), (29.97, 29.97), (0.0, None), (90000.0, None),
                                             (1000.0, None), (float("nan"), None), (None, None)])
def test_odd_fps_metadata_is_not_believed(value, expected):
    assert sane_fps(value) == expected


def test_a_video_file_is_read_frame_by_frame_without_drops(tmp_path):
    video = write_scene_video(tmp_path / "v.mp4", n=30, size=(160, 120))
    source = open_source(str(video))
    frames = []
    for frame in source:  # a slow consumer: the reader waits, nothing is lost
        frames.append(frame)
        time.sleep(0.002)
    assert [f.index for f in frames] == list(range(30))
    assert frames[0].image.shape == (120, 160, 3) and frames[0].image.dtype == np.uint8
    assert source.dropped == 0 and source.fps == pytest.approx(25) and source.error is None
    assert frames[-1].pts_ms > frames[0].pts_ms


def test_realtime_files_keep_only_the_newest_frame_and_count_drops(tmp_path):
    video = write_scene_video(tmp_path / "v.mp4", n=40, size=(160, 120), fps=100)
    source = open_source(str(video), SourceOptions(realtime=True))
    got, ages = [], []
    for frame in source:  # a consumer at ~25 fps behind a 100 fps "camera"
        ages.append(time.monotonic() - frame.timestamp)
        got.append(frame.index)
        time.sleep(0.04)
    assert source.dropped > 10 and len(got) + source.dropped == 40
    assert got == sorted(got)
    assert np.median(ages) < 0.02  # what the consumer takes is fresh, not 40 ms behind per frame


def test_synthetic_source_paces_itself_and_stops_after_frames():
    source = open_source("synthetic://?size=64x48&fps=50&frames=10&seed=3")
    t0 = time.monotonic()
    frames = list(source)
    elapsed = time.monotonic() - t0
    assert len(frames) == 10 and frames[0].image.shape == (48, 64, 3)
    assert 0.12 < elapsed < 2.0  # 10 frames at 50 fps: about 0.2 s


def test_image_folder_in_natural_order_skips_undecodable_files(tmp_path):
    for i in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), np.full((20, 30), i * 20, np.uint8))  # grayscale PNGs
    (tmp_path / "frame3.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(open_source(str(tmp_path)))
    assert [int(f.image[0, 0, 0]) for f in frames] == [20, 40, 200]
    assert all(f.image.shape == (20, 30, 3) for f in frames)
    glob_frames = list(open_source(str(tmp_path / "frame1*.png")))
    assert [int(f.image[0, 0, 0]) for f in glob_frames] == [20, 200]
    one = list(open_source(str(tmp_path / "frame2.png")))
    assert len(one) == 1


def test_newest_frame_buffer_replaces_untaken_frames():
    stop = threading.Event()
    buf = FrameBuffer(1, drop=True)
    for i in range(5):
        buf.put(Frame(np.zeros((2, 2, 3), np.uint8), i, time.monotonic()), stop)
    with buf.cond:
        assert buf.take().index == 4 and buf.take() is None
    assert buf.dropped == 4


class HangingReader:
    """A live reader whose first connection delivers a few frames and then blocks in read() for good, like a
    network read the backend never times out; later connections deliver normally."""

    live = True
    nominal_fps = 50.0
    ended_cleanly = False
    pace_by_pts = False
    connections = 0

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.n = 0
        self.closed = False

    def open(self) -> None:
        HangingReader.connections += 1
        self.connection = HangingReader.connections

    def read(self):
        self.n += 1
        if self.connection == 1 and self.n > 3:
            self.release.wait(30)  # stuck
            return None
        time.sleep(0.02)
        return np.full((8, 8, 3), self.connection, np.uint8), None

    def close(self) -> None:
        self.closed = True


def test_a_read_that_never_returns_is_abandoned_and_the_source_reconnects(monkeypatch):
    import edgepix.runtime.streams.sources as sources

    release = threading.Event()
    HangingReader.connections = 0
    monkeypatch.setattr(sources.live, "make_reader", lambda spec: HangingReader(release))
    spec = parse_source("rtsp://127.0.0.1:9/cam", SourceOptions(read_timeout=0.5))
    source = sources.Source(spec)
    assert source.stall_timeout == 1.0
    got = []
    t0 = time.monotonic()
    for frame in source:
        got.append(int(frame.image[0, 0, 0]))
        if got.count(2) >= 5 or time.monotonic() - t0 > 10:
            break
    stuck = source.outages[0]
    source.close()
    release.set()
    assert got[:3] == [1, 1, 1] and got.count(2) >= 5  # frames from the second connection after the stall
    assert source.reconnects == 1 and "no frame for" in stuck.reason and stuck.end is not None
    assert 0.9 < stuck.start - t0 < 3.0


def test_the_uri_help_rows_are_the_rows_the_docs_and_the_cli_show(edgepix_cli):
    """One help text per kind: docs/streams.md's URI tables hold exactly the kinds' URI_HELP rows, and
    `edgepix segment --help` lists every URI."""
    from pathlib import Path

    from edgepix.runtime.streams.sinks import URI_HELP as SINK_URIS
    from edgepix.runtime.streams.sources import URI_HELP as SOURCE_URIS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "streams.md").read_text()
    table_rows = [line for line in docs.splitlines() if line.startswith("| `")]
    uri_rows = [f"| {uri} | {what} |" for uri, what in SOURCE_URIS + SINK_URIS]
    assert [row for row in table_rows if row in uri_rows] == uri_rows
    assert len(SOURCE_URIS) == 7 and len(SINK_URIS) == 6
    help_text = edgepix_cli("segment", "--help").stdout
    for uri, _ in SOURCE_URIS + SINK_URIS:
        assert uri.replace("`", "") in help_text
