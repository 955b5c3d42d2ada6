"""The pipeline end to end: multi-stream batching and routing, order with several workers, bounds, statistics,
and `edgepix segment` finishing its video file on Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from test_stream_support import (
    BLUE,
    GREEN,
    RED,
    channel_model,
    palette_bgr,
    video_info,
    write_colour_video,
    write_scene_video,
)

from edgepix.runtime import RenderOptions, Segmenter
from edgepix.runtime.core.errors import InputError
from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions, choose_workers
from edgepix.runtime.streams.sinks import NullSink

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return channel_model(tmp_path_factory.mktemp("stream_model") / "channels.onnx")


def mask_seg(model, **kw):
    return Segmenter.load(model, "ort-cpu", threads=1, render=RenderOptions(mode="mask"), **kw)


def colour_class(image: np.ndarray) -> int:
    """Which palette colour fills a rendered mask image."""
    mean = image.reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - palette_bgr(c)).sum() for c in range(3)]))


def test_two_streams_are_batched_and_each_result_reaches_its_own_sink(model, tmp_path):
    a = write_colour_video(tmp_path / "a.avi", [RED] * 20, size=(96, 64))
    b = write_colour_video(tmp_path / "b.avi", [BLUE] * 20, size=(80, 48))
    calls = []
    with mask_seg(model) as seg:
        run = seg.run

        def counting(tensor):
            calls.append(tensor.shape[0])
            return run(tensor)

        seg.run = counting
        sinks = [f"{tmp_path / 'out_a'}/?stream=0", f"{tmp_path / 'out_b'}/?stream=1", str(tmp_path / "both") + "/"]
        stats = Pipeline(seg, [str(a), str(b)], sinks, PipelineOptions(workers=2, batch_timeout=1.0)).run()
    assert stats["frames"] == 40 and [s["frames_processed"] for s in stats["streams"]] == [20, 20]
    assert calls and all(n == 2 for n in calls) and stats["batches"]["sizes"] == {"2": 20}
    out_a = sorted((tmp_path / "out_a").iterdir())
    out_b = sorted((tmp_path / "out_b").iterdir())
    assert len(out_a) == len(out_b) == 20
    for path in out_a:
        image = cv2.imread(str(path))
        assert image.shape == (64, 96, 3) and colour_class(image) == 0  # red frames -> class 0 colour
    for path in out_b:
        image = cv2.imread(str(path))
        assert image.shape == (48, 80, 3) and colour_class(image) == 2  # blue frames -> class 2 colour
    # A sink without ?stream= gets both, one subfolder each.
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["0", "1"]
    assert len(list((tmp_path / "both" / "1").iterdir())) == 20


def test_a_partial_batch_is_pushed_after_the_timeout(model, tmp_path):
    a = write_colour_video(tmp_path / "a.avi", [RED] * 6)
    with mask_seg(model) as seg:
        t0 = time.monotonic()
        # stream 1 is a live synthetic source at 2 fps: most batches cannot wait for it
        stats = Pipeline(seg, [str(a), "synthetic://?size=64x48&fps=2"], ["null://"],
                         PipelineOptions(workers=1, batch_timeout=0.05, max_frames=8)).run()
    assert stats["frames"] == 8 and time.monotonic() - t0 < 3.0
    assert stats["batches"]["sizes"].get("1", 0) >= 4


@pytest.mark.parametrize("workers, prefetch", [(3, True), (2, False), (1, True)])
def test_several_workers_keep_frame_order_in_the_video(model, tmp_path, workers, prefetch):
    colours = [RED, GREEN, BLUE] * 10
    src = write_colour_video(tmp_path / "rgb.avi", colours)
    out = tmp_path / "out.avi"
    with mask_seg(model) as seg:
        stats = Pipeline(seg, [str(src)], [str(out)], PipelineOptions(workers=workers, prefetch=prefetch)).run()
    assert stats["frames"] == 30
    cap = cv2.VideoCapture(str(out))
    seen = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        seen.append(colour_class(image))
    assert seen == [0, 1, 2] * 10


def test_max_frames_duration_and_statistics(model, tmp_path):
    with mask_seg(model) as seg:
        stats = Pipeline(seg, ["synthetic://?size=64x48&fps=0"], ["null://"],
                         PipelineOptions(workers=2, max_frames=25)).run()
        assert stats["frames"] == 25
        t0 = time.monotonic()
        stats = Pipeline(seg, ["synthetic://?size=64x48&fps=40"], ["null://"],
                         PipelineOptions(workers=2, duration=1.0)).run()
        elapsed = time.monotonic() - t0
    assert 0.9 < elapsed < 3.0 and 25 <= stats["frames"] <= 45
    for stage in ("decode", "frame_age", "preprocess", "infer", "postprocess", "render", "latency"):
        s = stats["stages"][stage]
        assert s["n"] > 0 and s["p50"] <= s["p90"] <= s["p99"]
    assert stats["fps"] > 20 and stats["peak_rss_mb"] > 0 and stats["first_output_s"] < 1.0
    assert stats["streams"][0]["live"] and stats["streams"][0]["reconnects"] == 0
    json.dumps(stats)  # JSON-ready


def test_a_failing_sink_stops_the_pipeline_with_its_error(model):
    class Broken(NullSink):
        lossless = True

        def write(self, out):
            raise OSError("disk full")

    with mask_seg(model) as seg:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="disk full"):
            Pipeline(seg, ["synthetic://?size=64x48&fps=0"], [Broken("broken://")], PipelineOptions()).run()
        assert time.monotonic() - t0 < 5


def test_bad_stream_numbers_and_options_are_refused(model):
    with mask_seg(model) as seg:
        with pytest.raises(InputError, match="stream 3 does not exist"):
            Pipeline(seg, ["synthetic://"], ["null://?stream=3"])
    with pytest.raises(InputError):
        PipelineOptions(workers=0)


def test_worker_choice_by_backend():
    plan = choose_workers("ort-cpu", cores=2)
    assert (plan.workers, plan.threads, plan.backend_options()) == (1, 2, {"threads": 2, "spin_wait": False})
    plan = choose_workers("ort-cpu", cores=2, workers=2)
    assert (plan.workers, plan.threads, plan.backend_options()) == (2, 1, {"threads": 1})
    assert choose_workers("ort-cpu", cores=1).backend_options() == {"threads": 1}
    # OpenCV: one worker unless asked (then one net per worker: WorkerPlan.for_processor)
    assert choose_workers("opencv", cores=8).workers == 1 and choose_workers("opencv", workers=3).workers == 3
    assert choose_workers("ort-cuda", cores=6).workers == 2 and choose_workers("ort-cuda").backend_options() == {}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_leaves_a_playable_video_file(model, tmp_path, sig):
    out, stats_file = tmp_path / "out.mp4", tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepix", "segment", str(model), "--source", "synthetic://?size=160x120&fps=25",
         "--sink", str(out), "--stats", str(stats_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def partials() -> list:
        return list(tmp_path.glob(".out.mp4.*.partial.mp4"))

    deadline = time.monotonic() + 20
    while not partials() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partials(), "the video is not being written"
    time.sleep(1.0)  # about 25 frames
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.exists() and not partials()
    n, fps, size = video_info(out)
    stats = json.loads(stats_file.read_text())
    written = stats["sinks"][0]["files"][str(out)]["frames"]
    assert n == written and n >= 10, (n, written)
    assert fps == pytest.approx(25) and size == (160, 120)
    assert "segmented" in err


def test_cli_writes_stats_and_refuses_checkpoints(model, tmp_path, edgepix_cli):
    video = write_scene_video(tmp_path / "v.mp4", n=15, size=(160, 120))
    r = edgepix_cli("segment", str(model), "--source", str(video), "--sink", str(tmp_path / "o.mkv"),
                    "--sink", "null://", "--vis", "side", "--stats", str(tmp_path / "s.json"), "--max-frames", "10")
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["frames"] == 10
    n, fps, size = video_info(tmp_path / "o.mkv")
    assert n == 10 and size == (320, 120) and fps == pytest.approx(25)  # side by side: twice as wide
    r = edgepix_cli("segment", str(tmp_path / "model.pt"))
    assert r.returncode == 1 and "edgepix export" in r.stderr
    r = edgepix_cli("segment", str(model), "--source", "nope://x")
    assert r.returncode == 1 and "unknown source scheme" in r.stderr
