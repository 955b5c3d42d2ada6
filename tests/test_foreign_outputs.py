"""Models as they come: a foreign NHWC model with a one-channel sigmoid output is described by `edgepix spec`,
segmented like its vendor's pipeline would (the probability upsampled bilinearly to the frame, then thresholded),
counted and benchmarked in its own layout; specs that cannot be right for a graph are refused in one line; the
output layouts and kinds reach every consumer; the first output is checked against the spec."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_edgepix
from onnx import TensorProto, helper
from torch import nn

from edgepix.runtime.backends import load_backend
from edgepix.runtime.core.errors import InputError, ModelFormatError, SpecError
from edgepix.runtime.data.synthetic import MovingScene, SceneConfig, make_scene
from edgepix.runtime.description.onnxedit import ClassMapFusion, append_argmax
from edgepix.runtime.description.spec import ModelSpec, OutputKind
from edgepix.runtime.description.specfile import read_spec, write_spec
from edgepix.runtime.tasks.decode import OutputDecoder
from edgepix.runtime.tasks.imageops import stretch_geometry
from edgepix.runtime.tasks.segmenter import Segmenter

REAL_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")  # Debian's opencv-doc (Makefile installs it)
SIZE = 256


class NHWCBinary(nn.Module):
    """A vendor-style person segmenter: NHWC RGB 0..1 in, the foreground's sigmoid probability out, NHWC."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x.permute(0, 3, 1, 2))
        y = nn.functional.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)
        return torch.sigmoid(y).permute(0, 2, 3, 1)


def nhwc_binary_flops(size: int) -> int:
    """The net's multiply-adds x 2 at a size x size input, counted by hand: 2 x output elements x weights per
    output element, for each convolution (the counter's definition; bias, ReLU, resize and sigmoid not counted)."""
    h1, h2 = size // 2, size // 4
    return (2 * h1 * h1 * 16 * (3 * 9) + 2 * h2 * h2 * 32 * (16 * 9) + 2 * h2 * h2 * 32 * (32 * 9)
            + 2 * h2 * h2 * 1 * 32)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """The net trained for a few seconds to find anything that is not background in 64x64 synthetic scenes (it is
    fully convolutional), exported at [1, 256, 256, 3] by torch.onnx.export: no edgepix spec in it."""
    torch.manual_seed(0)
    scenes = [make_scene(70_000 + i, SceneConfig(size=(64, 64))) for i in range(96)]
    x = torch.from_numpy(np.stack([im[..., ::-1] / 255.0 for im, _ in scenes]).astype(np.float32))
    y = torch.from_numpy(np.stack([m != 0 for _, m in scenes]).astype(np.float32))[..., None]
    model = NHWCBinary()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, len(scenes), (16,))
        loss = nn.functional.binary_cross_entropy(model(x[idx]).clamp(1e-6, 1 - 1e-6), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("foreign") / "person.onnx"
    with torch.no_grad():
        torch.onnx.export(model.eval(), torch.zeros(1, SIZE, SIZE, 3), str(path), input_names=["input"],
                          output_names=["output"], opset_version=17, dynamo=False)
    assert "edgepix.spec" not in {p.key for p in onnx.load(str(path)).metadata_props}
    return path


@pytest.fixture(scope="module")
def described(foreign, tmp_path_factory) -> Path:
    """`edgepix spec` with the class names and the input's 0..1 normalisation, the rest read from the graph."""
    out = tmp_path_factory.mktemp("described") / "described.onnx"
    r = run_edgepix("spec", str(foreign), "--set", "classes=background,person", "mean=0,0,0", "std=1,1,1",
                    "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def clip_frames(tmp_path: Path, n: int) -> tuple[Path, list[np.ndarray]]:
    """The first `n` frames of vtest.avi (768x576 street footage) written to a short clip, or a moving synthetic
    scene of that size where the video is not installed; and the frames as the clip decodes them."""
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (768, 576))
    if REAL_VIDEO.exists():
        cap = cv2.VideoCapture(str(REAL_VIDEO))
        for _ in range(n):
            ok, frame = cap.read()
            assert ok
            writer.write(frame)
        cap.release()
    else:
        for image, _ in MovingScene(seed=3, config=SceneConfig(size=(576, 768))).frames(n):
            writer.write(image)
    writer.release()
    cap = cv2.VideoCapture(str(clip))
    frames = [cap.read()[1] for _ in range(n)]
    cap.release()
    return clip, frames


def reference_mask(session: ort.InferenceSession, frame: np.ndarray) -> np.ndarray:
    """The vendor's pipeline, in numpy and ONNX Runtime: resize to 256 bilinear, RGB, /255, run, upsample the
    probability bilinearly to the frame, threshold at 0.5."""
    x = cv2.cvtColor(cv2.resize(frame, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    prob = session.run(None, {"input": (x.astype(np.float32) / 255.0)[None]})[0][0, :, :, 0]
    return cv2.resize(prob, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR) > 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ---- the foreign model, described and run --------------------------------------------------------------------


def test_spec_reads_layout_and_kind_from_the_graph(foreign, described):
    spec = ModelSpec.from_onnx(described)
    assert spec.input_layout.value == "NHWC" and spec.output_layout.value == "NHWC"
    assert spec.output_kind is OutputKind.BINARY_PROBABILITY and spec.class_names == ("background", "person")
    assert spec.input_size == (SIZE, SIZE) and spec.output_stride == 1 and spec.threshold == 0.5
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    inferred = read_spec(foreign).spec  # without --set: what the runtime would assume
    assert inferred.output_kind is OutputKind.BINARY_PROBABILITY and inferred.class_names == ("background",
                                                                                             "foreground")


def test_segment_matches_the_vendor_pipeline_frame_by_frame(described, tmp_path):
    clip, frames = clip_frames(tmp_path, 8)
    session = ort.InferenceSession(str(described), providers=["CPUExecutionProvider"])
    with Segmenter.load(described, "ort-cpu") as seg:
        ious = [iou(seg.segment(f).class_map == 1, reference_mask(session, f)) for f in frames]
    foreground = np.mean([reference_mask(session, f).mean() for f in frames])
    assert 0.001 < foreground < 0.999  # masks with something in them, or the IoU would say nothing
    assert min(ious) >= 0.99, ious
    out = tmp_path / "out.mp4"
    r = run_edgepix("-q", "segment", str(described), "--source", str(clip), "--sink", str(out))
    assert r.returncode == 0, r.stderr
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 8 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 768
    cap.release()


def test_info_and_bench_count_flops_in_the_models_own_layout(described, tmp_path):
    from edgepix.benchmarks.flops import model_flops

    expected = nhwc_binary_flops(SIZE)
    assert expected == 127_664_128
    assert model_flops(described, ModelSpec.from_onnx(described)) == expected
    r = run_edgepix("info", str(described))
    assert r.returncode == 0 and "0.128 GFLOP per image" in r.stdout, r.stdout + r.stderr
    r = run_edgepix("-q", "bench", str(described), "--backends", "ort-cpu", "--runs", "3", "--warmup", "1",
                    "--format", "json", "--accuracy-n", "2")
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    row = report["results"][0]
    assert row["gflops_per_image"] == pytest.approx(expected / 1e9) and row["input_shape"] == [1, SIZE, SIZE, 3]
    assert row["accuracy"] is None  # a person model scored against the synthetic shapes would mean nothing
    assert any("no accuracy" in n and "background, person" in n for n in report["notes"])


def test_bench_stream_runs_the_nhwc_model_in_both_loops(described):
    from edgepix.benchmarks.stream import StreamBenchOptions, run_stream_bench

    report = run_stream_bench(described, "synthetic://?size=320x240",
                              StreamBenchOptions(frames=6, backend="ort-cpu", sink="null://", workers=1, threads=1))
    assert report["results"]["naive"]["frames"] == 6 and report["results"]["pipeline"]["frames"] == 6
    with pytest.raises(InputError, match=r"^StreamBenchOptions.frames: expected a positive integer, got '6'"):
        StreamBenchOptions(frames="6")


def test_the_naive_loop_reads_the_output_as_the_segmenter_does(described, tmp_path):
    from edgepix.benchmarks.stream_bound import _naive_decode

    spec = ModelSpec.from_onnx(described)
    session = ort.InferenceSession(str(described), providers=["CPUExecutionProvider"])
    frame = make_scene(5, SceneConfig(size=(300, 400)))[0]
    x = cv2.cvtColor(cv2.resize(frame, (SIZE, SIZE)), cv2.COLOR_BGR2RGB).astype(np.float32)[None] / 255.0
    naive = _naive_decode(spec)(session.run(None, {"input": x})[0][0], (400, 300))
    assert iou(naive == 1, reference_mask(session, frame)) >= 0.99


# ---- impossible specs ----------------------------------------------------------------------------------------


def graph(path: Path, *, inp: list[int], out: list[int], dtype=TensorProto.FLOAT, nodes=None, extra=()) -> Path:
    """A tiny ONNX model (no spec) whose output has the shape and type given: a Resize of the input to that shape
    (a constant stand-in for a network), or the nodes given."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, inp)
    y = helper.make_tensor_value_info("output", dtype, out)
    if nodes is None:
        extra = [helper.make_tensor("sizes", TensorProto.INT64, [4], out), *extra]
        nodes = [helper.make_node("Resize", ["input", "", "", "sizes"], ["output"], mode="linear")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(extra)),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_impossible_specs_are_refused_in_one_line(foreign, tmp_path):
    nchw256 = graph(tmp_path / "c256.onnx", inp=[1, 3, 64, 64], out=[1, 256, 64, 64])
    five = graph(tmp_path / "five.onnx", inp=[1, 3, 64, 64], out=[1, 5, 64, 64])
    two = graph(tmp_path / "two.onnx", inp=[1, 3, 64, 64], out=[1, 2, 64, 64])
    odd = graph(tmp_path / "odd.onnx", inp=[1, 3, 64, 64], out=[1, 3, 24, 24])
    cases = [
        # the NHWC output read as NCHW: 256 "classes" on a 256x1 map, with ignore_index -1 to get past the class
        # check: the case that wrote a video of colour stripes
        (foreign, {"output_layout": "NCHW", "ignore_index": -1}, SpecError,
         r"^ignore_index: label masks never hold negative values, got -1; set ignore_index=none"),
        (nchw256, {"ignore_index": -1}, SpecError, r"^ignore_index: label masks never hold negative values"),
        (foreign, {"output_layout": "NCHW"}, ModelFormatError,
         r"is a 256x1 map for a 256x256 input, not the input divided by a whole stride; read as NHWC it is a "
         r"1-channel map of the input: set output_layout=NHWC"),
        (five, {"class_names": ["a", "b", "c"]}, ModelFormatError,
         r"5 channels \(output: float32 \[1, 5, 64, 64\] read as NCHW\)|3 class names given but the output has 5"),
        (foreign, {"class_names": ["a", "b", "c"]}, ModelFormatError,
         r"a one-channel binary_probability output has 2 classes .*; pass classes=background,NAME"),
        (odd, {"class_names": ["a", "b", "c"]}, ModelFormatError, r"is a 24x24 map for a 64x64 input, not the input "
         r"divided by a whole stride"),
        (two, {"output_kind": "binary_logit", "class_names": ["a", "b"]}, ModelFormatError,
         r"output_kind binary_logit has one channel, .* has 2; set output_kind=probabilities"),
        (foreign, {"threshold": 1.5}, SpecError, r"^threshold: expected a probability strictly between 0 and 1, "
         r"got 1.5"),
        (foreign, {"output_layout": "NHCW"}, SpecError, r"^output_layout: expected one of 'NCHW', 'NHWC', got"),
    ]
    for path, given, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            read_spec(path, given=dict(given))
        assert "\n" not in str(caught.value), str(caught.value)
    # the same through the command: exit 1, one line, nothing written
    out = tmp_path / "never.onnx"
    r = run_edgepix("spec", str(foreign), "--set", "classes=background,person", "ignore_index=-1",
                    "output_layout=NCHW", "--out", str(out))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr
    assert "ignore_index" in r.stderr


def test_an_embedded_spec_that_contradicts_the_graph_is_refused_by_spec_and_segmenter(foreign, tmp_path):
    spec = read_spec(foreign, given={"class_names": ["background", "person"]}).spec
    wrong = tmp_path / "wrong.onnx"
    from edgepix.runtime.description.onnxedit import write_with_metadata

    # written past the checks, as a hand edit would: read_spec and the Segmenter refuse it
    write_with_metadata(foreign, wrong, {"edgepix.spec": spec.replace(output_layout="NCHW").to_json()})
    with pytest.raises(ModelFormatError, match="set output_layout=NHWC"):
        read_spec(wrong, given={"model_name": "x"})
    for fuse in (True, False):
        with pytest.raises(ModelFormatError, match="set output_layout=NHWC"):
            Segmenter.load(wrong, "ort-cpu", fuse_argmax=fuse, upsample="classes")


def test_bad_argument_types_are_input_errors_in_one_line(described):
    with pytest.raises(InputError, match=r"^fuse_argmax: expected None, an output name or a ClassMapFusion, got "
                                         r"False \(bool\)"):
        load_backend(described, "ort-cpu", fuse_argmax=False)
    with pytest.raises(InputError, match=r"^backend 'ort-cpu': option threads: expected an integer or None, got "
                                         r"'2' \(str\)"):
        load_backend(described, "ort-cpu", threads="2")
    with pytest.raises(InputError, match=r"^backend: expected a backend name"):
        load_backend(described, 3)
    with pytest.raises(InputError, match=r"^fuse_argmax: expected True or False, got 'yes'"):
        Segmenter.load(described, fuse_argmax="yes")
    with pytest.raises(InputError, match=r"^model: expected a model file's path or a loaded Backend, got "):
        Segmenter.load(ModelSpec.from_onnx(described))
    from edgepix.benchmarks.harness import BenchConfig

    with pytest.raises(InputError, match=r"^BenchConfig.batches: expected a tuple of integers, got \('1',\)"):
        BenchConfig(batches=("1",))


# ---- the first output against the spec -----------------------------------------------------------------------


def test_the_first_output_that_contradicts_the_spec_is_warned_about_once(tmp_path, caplog):
    """A graph without a sigmoid described as a probability: the logits leave 0..1, one warning per Segmenter."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [40.0, -40.0, 0.0])
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["logit"]),
             helper.make_node("Transpose", ["logit"], ["output"], perm=[0, 2, 3, 1])]
    path = graph(tmp_path / "logit.onnx", inp=[1, 32, 32, 3], out=[1, 32, 32, 1], nodes=nodes, extra=[w])
    assert read_spec(path).spec.output_kind is OutputKind.BINARY_LOGIT  # no Sigmoid: a logit
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 2] = 255  # BGR: logit = 40 (R - G) / 255 = 40 in every pixel, far outside 0..1
    frames = [red, *(np.full((40, 40, 3), v, np.uint8) for v in (90, 200))]
    described, right = tmp_path / "d.onnx", tmp_path / "r.onnx"
    write_spec(path, described, read_spec(path, given={
        "output_kind": "binary_probability", "class_names": ["background", "thing"], "mean": [0, 0, 0],
        "std": [1, 1, 1]}).spec)
    with caplog.at_level(logging.WARNING, logger="edgepix.runtime.segmenter"):
        with Segmenter.load(described, "ort-cpu") as seg:
            for f in frames:
                seg.segment(f)
    warnings = [r.getMessage() for r in caplog.records if r.name == "edgepix.runtime.segmenter"]
    assert len(warnings) == 1 and "set output_kind=binary_logit" in warnings[0], warnings
    caplog.clear()
    write_spec(path, right, read_spec(path, given={
        "class_names": ["background", "thing"], "mean": [0, 0, 0], "std": [1, 1, 1]}).spec)
    with caplog.at_level(logging.WARNING, logger="edgepix.runtime.segmenter"), Segmenter.load(right) as seg:
        maps = [seg.segment(f).class_map for f in frames]
    assert not [r for r in caplog.records if r.name == "edgepix.runtime.segmenter"]
    assert (maps[0] == 1).all() and all((m == 0).all() for m in maps[1:])  # red is foreground, grey (logit 0) not


# ---- layouts and kinds through the decoder and the fused graph ------------------------------------------------


def scores_graph(path: Path, *, kind: str, layout: str, classes: int) -> Path:
    """A constant-free model whose output is a smooth function of the input: Resize of a 1x1 Conv of the input
    (channel mixing), then Softmax/Sigmoid as the kind says, in the layout asked."""
    channels = 1 if kind.startswith("binary") else classes
    rng = np.random.default_rng(classes)
    w = helper.make_tensor("w", TensorProto.FLOAT, [channels, 3, 1, 1], rng.normal(0, 4, channels * 3).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [channels], rng.normal(0, 1, channels).tolist())
    size = helper.make_tensor("sz", TensorProto.INT64, [4], [1, channels, 16, 24])
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["small"]),
             helper.make_node("Resize", ["small", "", "", "sz"], ["scores"], mode="nearest")]
    last = "scores"
    if kind == "probabilities":
        nodes.append(helper.make_node("Softmax", [last], ["act"], axis=1))
        last = "act"
    elif kind == "binary_probability":
        nodes.append(helper.make_node("Sigmoid", [last], ["act"]))
        last = "act"
    shape = [1, channels, 16, 24]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [last], ["output"], perm=[0, 2, 3, 1]))
        shape = [1, 16, 24, channels]
    else:
        nodes.append(helper.make_node("Identity", [last], ["output"]))
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 48])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, b, size]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind, layout", [("logits", "NCHW"), ("logits", "NHWC"), ("probabilities", "NHWC"),
                                          ("binary_probability", "NCHW"), ("binary_probability", "NHWC"),
                                          ("binary_logit", "NHWC")])
def test_every_kind_and_layout_is_inferred_decoded_and_fused_alike(tmp_path, kind, layout):
    classes = 2 if kind.startswith("binary") else 4
    path = scores_graph(tmp_path / "m.onnx", kind=kind, layout=layout, classes=classes)
    spec = read_spec(path, given={"class_names": [f"c{i}" for i in range(classes)]}).spec
    assert (spec.output_kind.value, spec.output_layout.value, spec.output_stride) == (kind, layout, 2)
    frames = [cv2.resize(np.random.default_rng(i).integers(0, 256, (6, 9, 3), dtype=np.uint8), (70, 50))
              for i in range(3)]
    classes_arg = {"classes": list(spec.class_names)}
    with Segmenter.load(path, "ort-cpu", upsample="classes", **classes_arg) as fused, \
            Segmenter.load(path, "ort-cpu", upsample="classes", fuse_argmax=False, **classes_arg) as plain, \
            Segmenter.load(path, "ort-cpu", upsample="scores", **classes_arg) as smooth:
        assert fused.backend.fused_argmax == "output.class_map" and plain.backend.fused_argmax is None
        assert smooth.backend.fused_argmax is None  # scores are upsampled: nothing to fuse
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for f in frames:
            a, b, c = fused.segment(f), plain.segment(f), smooth.segment(f)
            assert (a.class_map == b.class_map).all() and (a.model_map == b.model_map).all()
            raw = session.run(None, {"input": plain.preprocess([f]).tensor})[0][0]
            hwc = np.ascontiguousarray(raw if layout == "NHWC" else raw.transpose(1, 2, 0))
            at_frame = cv2.resize(hwc, (70, 50), interpolation=cv2.INTER_LINEAR).reshape(50, 70, -1)
            cut = math.log(0.5 / 0.5) if kind == "binary_logit" else 0.5
            expected = (at_frame[..., 0] > cut) if kind.startswith("binary") else at_frame.argmax(-1)
            assert (c.class_map == expected).mean() > 0.999  # OpenCV's resize per plane vs of the HWC array


def test_a_fused_threshold_is_a_constant_of_the_outputs_type(tmp_path):
    path = scores_graph(tmp_path / "b.onnx", kind="binary_logit", layout="NCHW", classes=2)
    data = path.read_bytes()
    fused, name = append_argmax(data, ClassMapFusion("output", threshold=math.log(0.8 / 0.2)))
    onnx.checker.check_model(onnx.load_from_string(fused), full_check=True)
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 32, 48)).astype(np.float32)
    logit = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    mask = ort.InferenceSession(fused, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert name == "output.class_map" and mask.dtype == np.uint8 and mask.shape == (1, 1, 16, 24)
    assert (mask == (logit > math.log(4)).astype(np.uint8)).all() and 0 < mask.mean() < 1


def test_class_maps_of_any_integer_type_and_layout_are_read(tmp_path):
    for dtype, shape in ((TensorProto.INT64, [1, 32, 48, 1]), (TensorProto.INT32, [1, 1, 32, 48]),
                         (TensorProto.UINT8, [1, 32, 48])):
        nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
                 helper.make_node("Greater", ["m", "zero"], ["g"]),
                 helper.make_node("Cast", ["g"], ["c"], to=dtype),
                 helper.make_node("Reshape", ["c", "shape"], ["output"])]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
        shape_t = helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape)
        path = graph(tmp_path / f"cm{dtype}.onnx", inp=[1, 3, 32, 48], out=shape, dtype=dtype, nodes=nodes,
                     extra=[zero, shape_t])
        spec = read_spec(path, given={"class_names": ["a", "b"]}).spec
        assert spec.output_kind is OutputKind.CLASS_MAP
        assert spec.output_layout.value == ("NHWC" if shape[-1] == 1 else "NCHW")
        with Segmenter.load(path, "ort-cpu", classes=["a", "b"], mean=[0, 0, 0], std=[1, 1, 1]) as seg:
            r = seg.segment(np.full((10, 20, 3), 200, np.uint8))
        assert r.class_map.dtype == np.uint8 and r.class_map.shape == (10, 20) and (r.class_map == 1).all()


def test_scores_upsampling_decides_at_the_frame_and_classes_at_the_model():
    """Scores that cross between two model pixels: at 4x, the bilinear scores put the edge where they cross, the
    nearest class map at the model pixels' border."""
    spec = ModelSpec(task="segmentation", model_name="m", input_size=(1, 4), class_names=("a", "b"))
    logits = np.array([[[3.0, 2.0, -2.0, -3.0]], [[-3.0, 0.0, 3.0, 3.0]]], np.float32)  # (C=2, 1, 4): cross at 1.29
    g = stretch_geometry((1, 16), (1, 4))
    smooth = OutputDecoder(spec.replace(upsample="scores")).frame_map(logits, g)
    blocky = OutputDecoder(spec.replace(upsample="classes")).frame_map(logits, g)
    hwc = np.ascontiguousarray(logits.transpose(1, 2, 0))
    expected = cv2.resize(hwc, (16, 1), interpolation=cv2.INTER_LINEAR).argmax(-1).reshape(1, 16)
    assert (smooth == expected).all() and smooth.tolist() == [[0] * 7 + [1] * 9]
    assert blocky.tolist() == [[0] * 8 + [1] * 8]
    # a binary probability crossing 0.5 at 0.6 of the way from the second model pixel to the third
    prob = np.array([[[0.1], [0.2], [0.7], [0.9]]], np.float32).reshape(1, 4, 1)  # (h, w, 1) NHWC
    b = ModelSpec(task="segmentation", model_name="m", input_size=(1, 4), class_names=("bg", "fg"),
                  output_kind="binary_probability", output_layout="NHWC")
    up = cv2.resize(prob[..., 0], (16, 1), interpolation=cv2.INTER_LINEAR) > 0.5
    assert (OutputDecoder(b).frame_map(prob, g) == up).all()
    assert OutputDecoder(b.replace(upsample="classes")).frame_map(prob, g).tolist() == [[0] * 8 + [1] * 8]


# ---- spec versions ---------------------------------------------------------------------------------------------


def test_a_version_1_spec_loads_with_what_version_1_meant(tmp_path):
    from edgepix.runtime.description.onnxedit import write_with_metadata

    path = scores_graph(tmp_path / "v1.onnx", kind="logits", layout="NCHW", classes=4)
    data = read_spec(path, given={"class_names": list("abcd")}).spec.to_dict()
    for key in ("output_layout", "threshold", "upsample", "output_stride"):
        del data[key]
    data["format_version"] = 1
    old = tmp_path / "old.onnx"
    import json

    write_with_metadata(path, old, {"edgepix.spec": json.dumps(data)})
    spec = ModelSpec.from_onnx(old)
    assert spec.format_version == 2 and spec.output_layout.value == "NCHW" and spec.upsample.value == "classes"
    assert spec.output_stride == 1 and spec.threshold == 0.5
    with pytest.raises(ModelFormatError, match="set output_stride=2"):  # checked against the graph like any spec
        Segmenter.load(old, "ort-cpu")
    data["output_stride"] = 2
    write_with_metadata(path, old, {"edgepix.spec": json.dumps(data)})
    with Segmenter.load(old, "ort-cpu") as seg:  # today's behaviour: decided at the model's size, fused
        assert seg.backend.fused_argmax == "output.class_map" and not seg.decoder.scores_upsample
    with pytest.raises(SpecError, match="output_layout: missing from spec"):
        ModelSpec.from_dict({**data, "format_version": 2})
