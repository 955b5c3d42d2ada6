"""Helpers for the stream tests (tiny ONNX models built without torch, test videos, an ffmpeg stream server),
and checks that the helpers make what the other stream tests assume."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgepix.benchmarks.stream_bound import LiveServer, free_port  # noqa: F401 - free_port: for the other tests
from edgepix.runtime.data.synthetic import MovingScene, SceneConfig
from edgepix.runtime.description.spec import ONNX_METADATA_KEY, ModelSpec, default_palette

RGB_CLASSES = ("red", "green", "blue")
RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)  # BGR


def channel_model(path: Path, *, size: tuple[int, int] = (64, 64), dynamic_batch: bool = True) -> Path:
    """An ONNX model whose logits are its normalised RGB input channels (a 1x1 identity convolution): the class
    of a pixel is its strongest colour, 0 red, 1 green, 2 blue. Built with the onnx package alone."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w = size
    batch = "batch" if dynamic_batch else 1
    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w", "b"], ["output"])], "channels",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3, h, w])],
        initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = ModelSpec(task="segmentation", model_name="channels", input_size=size, class_names=RGB_CLASSES,
                     palette=default_palette(3), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     dynamic_batch=dynamic_batch)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, spec.to_json()
    onnx.save(model, str(path))
    return path


def palette_bgr(index: int) -> np.ndarray:
    r, g, b = default_palette(3)[index]
    return np.array([b, g, r], np.uint8)


def write_scene_video(path: Path, *, n: int = 50, size: tuple[int, int] = (320, 240), fps: float = 25.0,
                      seed: int = 0, fourcc: str = "mp4v") -> Path:
    """A video of a moving synthetic scene; size is (W, H)."""
    w, h = size
    scene = MovingScene(seed=seed, config=SceneConfig(size=(h, w)))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for image, _ in scene.frames(n):
        writer.write(image)
    writer.release()
    return path


def write_colour_video(path: Path, colours, *, size: tuple[int, int] = (96, 64), fps: float = 25.0) -> Path:
    """Frame i is filled with colours[i] (BGR); MJPG in .avi keeps flat colours exact enough."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for c in colours:
        writer.write(np.full((h, w, 3), c, np.uint8))
    writer.release()
    return path


def video_info(path: Path) -> tuple[int, float, tuple[int, int]]:
    """(frames actually decodable, fps, (W, H)) of a video file."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"{path} does not open"
    fps = cap.get(cv2.CAP_PROP_FPS)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n, fps, size


def need_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        pytest.skip("ffmpeg is not installed (make setup installs it; or apt-get install ffmpeg)")
    return exe


class StreamServer(LiveServer):
    """The benchmarks' ffmpeg test camera (`stream_bound.LiveServer`: a looping video as MPEG-TS over HTTP on
    127.0.0.1, one client, a short GOP so a reconnecting client decodes at once); skips where ffmpeg is absent."""

    def start(self) -> StreamServer:  # type: ignore[override]
        need_ffmpeg()
        super().start()
        return self


def test_channel_model_classes_pixels_by_their_strongest_colour(tmp_path):
    from edgepix.runtime import Segmenter

    with Segmenter.load(channel_model(tmp_path / "c.onnx"), "ort-cpu") as seg:
        for colour, cls in ((RED, 0), (GREEN, 1), (BLUE, 2)):
            result = seg.segment(np.full((30, 40, 3), colour, np.uint8))
            assert result.class_map.shape == (30, 40) and (result.class_map == cls).all()


def test_scene_video_has_the_frames_fps_and_size_asked_for(tmp_path):
    n, fps, size = video_info(write_scene_video(tmp_path / "v.mp4", n=12, size=(160, 120), fps=20))
    assert (n, size) == (12, (160, 120)) and fps == pytest.approx(20)
