"""Image -> image generation through the stream pipeline: `edgepix generate --input VIDEO|URI --sink ...` gets every
source and sink, statistics and the HTTP page, and `edgepix segment --then` chains a segmenter into a mask -> image
generator, on live sources too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_runtime_generator import Identity, image_spec
from test_runtime_models import export
from test_stream_support import free_port

from edgepix.runtime import ImageGenerator, Pipeline, Segmenter
from edgepix.runtime.core.errors import ModelFormatError
from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE, SceneConfig, make_scene
from edgepix.runtime.streams.pipeline import PipelineOptions
from edgepix.runtime.tasks.processor import FrameProcessor, SegmentThenGenerate


@pytest.fixture(scope="module")
def identity_onnx(tmp_path_factory) -> Path:
    """A 1x1 convolution that copies its input (with mean/std 0.5 and range [-1, 1] the output is the input)."""
    return export(Identity(), tmp_path_factory.mktemp("gen") / "identity.onnx", torch.zeros(1, 3, 32, 32),
                  spec=image_spec(), dynamic_batch=True)


@pytest.fixture(scope="module")
def mask_to_image_onnx(tmp_path_factory) -> Path:
    """The same copying model as a mask -> image generator of the synthetic scenes' classes: its pictures are
    the palette-coloured masks it is given, so a chain's output can be checked against the segmenter's maps."""
    spec = image_spec(class_names=CLASS_NAMES, palette=PALETTE, input_size=(64, 64))
    return export(Identity(), tmp_path_factory.mktemp("gen") / "mask2img.onnx", torch.zeros(1, 3, 64, 64),
                  spec=spec, dynamic_batch=True)


def write_video(path: Path, n: int, size=(96, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    for i in range(n):
        writer.write(make_scene(i, SceneConfig(size=(size[1], size[0])))[0])
    writer.release()
    return path


def count_frames(path: Path) -> tuple[int, tuple[int, ...] | None]:
    cap = cv2.VideoCapture(str(path))
    n, shape = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, shape = n + 1, frame.shape
    cap.release()
    return n, shape


def test_every_processor_meets_the_protocol(seg_onnx, identity_onnx, mask_to_image_onnx):
    with Segmenter.load(seg_onnx) as seg, ImageGenerator.load(identity_onnx) as gen:
        assert isinstance(seg, FrameProcessor) and isinstance(gen, FrameProcessor)
        chain = SegmentThenGenerate(seg, ImageGenerator.load(mask_to_image_onnx))
        assert isinstance(chain, FrameProcessor)
        chain.generator.close()
        with pytest.raises(ModelFormatError, match="mask -> image generator"):
            SegmentThenGenerate(seg, gen)


def test_generate_a_video_into_a_video_with_statistics(edgepix_cli, identity_onnx, tmp_path):
    video = write_video(tmp_path / "in.avi", 12)
    out, stats = tmp_path / "out.mp4", tmp_path / "s.json"
    done = edgepix_cli("generate", str(identity_onnx), "--input", str(video), "--sink", str(out),
                       "--stats", str(stats), "--frame-size")
    assert done.returncode == 0, done.stderr
    s = json.loads(stats.read_text())
    assert s["frames"] == 12 and s["streams"][0]["frames_processed"] == 12
    for stage in ("decode", "preprocess", "infer", "postprocess", "render", "latency"):
        assert s["stages"][stage]["n"] >= 12, stage
    assert count_frames(out) == (12, (64, 96, 3))  # --frame-size: the input's size
    # Without --frame-size the pictures keep the model's size; --out DIR writes numbered PNGs as before.
    done = edgepix_cli("-q", "generate", str(identity_onnx), "--input", str(video), "--out", str(tmp_path / "f"))
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "f").glob("*.png"))
    assert len(files) == 12 and files[0].name == "000000.png"
    assert cv2.imread(str(files[0])).shape == (32, 32, 3)


def test_generate_from_a_live_source_into_the_http_page(identity_onnx, tmp_path):
    port = free_port()
    stats = tmp_path / "s.json"
    proc = subprocess.Popen([sys.executable, "-m", "edgepix", "generate", str(identity_onnx), "--input",
                             "synthetic://?size=96x64&fps=20", "--sink", f"http://127.0.0.1:{port}",
                             "--frame-size", "--duration", "6", "--stats", str(stats)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base, live = f"http://127.0.0.1:{port}/", None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                live = json.loads(urllib.request.urlopen(base + "stats.json", timeout=2).read())
                if live["frames"] >= 5:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert live is not None and live["frames"] >= 5
        jpg = urllib.request.urlopen(base + "frame/0.jpg", timeout=5).read()
        assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).shape == (64, 96, 3)
        assert "edgepix identity.onnx" in urllib.request.urlopen(base, timeout=5).read().decode()
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = json.loads(stats.read_text())
    assert final["frames"] >= 20 and final["streams"][0]["state"] in ("up", "ended")


def test_a_chain_paints_the_class_maps_and_generates_from_them(seg_onnx, mask_to_image_onnx):
    frames = [make_scene(i, SceneConfig(size=(64, 96)))[0] for i in range(3)]
    with Segmenter.load(seg_onnx) as seg:
        maps = [r.class_map for r in seg.segment_batch(frames)]
        chain = SegmentThenGenerate(seg, ImageGenerator.load(mask_to_image_onnx), show="generated")
        pictures = []
        for frame in frames:  # this segmenter has a static batch of 1
            prepared = chain.preprocess([frame])
            pictures.extend(chain.postprocess(chain.run(prepared.tensor), prepared))
        chain.generator.close()
    lut = np.array([(b, g, r) for r, g, b in PALETTE], np.uint8)
    for image, class_map in zip(pictures, maps):
        assert image.shape == (64, 96, 3)
        # The copying generator returns the painted mask: away from class edges (where the resizes blend
        # colours) every pixel is its class's colour.
        same = np.abs(image.astype(int) - lut[class_map].astype(int)).max(axis=2) <= 8
        assert same.mean() > 0.9, same.mean()


def test_segment_then_generate_on_a_live_source(edgepix_cli, seg_onnx, mask_to_image_onnx, tmp_path):
    out, stats = tmp_path / "chain.mp4", tmp_path / "s.json"
    done = edgepix_cli("segment", str(seg_onnx), "--then", str(mask_to_image_onnx), "--source",
                       "synthetic://?size=96x64&fps=20", "--sink", str(out), "--duration", "3",
                       "--stats", str(stats))
    assert done.returncode == 0, done.stderr
    s = json.loads(stats.read_text())
    assert s["frames"] >= 20 and s["config"]["then"] == str(mask_to_image_onnx)
    assert s["streams"][0]["uri"].startswith("synthetic://")
    n, shape = count_frames(out)
    assert n >= 20 and shape == (64, 192, 3)  # the frame and the picture side by side


def test_a_chain_needs_a_mask_to_image_generator(edgepix_cli, seg_onnx, identity_onnx):
    done = edgepix_cli("segment", str(seg_onnx), "--then", str(identity_onnx), "--source",
                       "synthetic://?size=96x64&frames=2&fps=0", "--sink", "null://")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "mask -> image generator" in lines[-1] and len(lines) <= 2, done.stderr


def test_pipeline_takes_an_image_generator_from_python(identity_onnx):
    with ImageGenerator.load(identity_onnx, to_frame_size=True) as gen:
        with Pipeline(gen, ["synthetic://?size=96x64&frames=5&fps=0"], ["null://"],
                      PipelineOptions(max_frames=5)) as p:
            stats = p.run()
    assert stats["frames"] == 5 and stats["stages"]["infer"]["n"] == 5
