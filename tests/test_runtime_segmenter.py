"""The Segmenter on tiny ONNX models whose right answers are known: pre-processing numbers, letterbox geometry,
argmax and confidence, batching, frame checks, rendering, foreign models and bad files."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_runtime_models import RGB_CLASSES, channel_model, export, seg_spec, small_seg_net

from edgepix.runtime import RenderOptions, Segmenter
from edgepix.runtime.core.errors import BackendError, InputError, ModelFormatError
from edgepix.runtime.description.foreign import ForeignModelWarning
from edgepix.runtime.description.spec import ModelSpec
from edgepix.runtime.tasks.imageops import (
    Normalizer,
    argmax_classes,
    as_bgr,
    letterbox_geometry,
    map_to_frame,
    softmax_confidence,
)

RED, GREEN, BLUE = (0, 0, 255), (0, 255, 0), (255, 0, 0)  # BGR


def halves_frame(h=60, w=100, left=RED, right=BLUE) -> np.ndarray:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[:, : w // 2] = left
    frame[:, w // 2:] = right
    return frame


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    return {
        "stretch": channel_model(tmp, name="stretch.onnx", batch=None),
        "letterbox": channel_model(tmp, name="letterbox.onnx", resize="letterbox", pad_value=114),
        "argmax": channel_model(tmp, name="argmax.onnx", argmax=True),
        "static2": channel_model(tmp, name="static2.onnx", batch=2),
        "net": export(small_seg_net(4), tmp / "net.onnx", torch.zeros(1, 3, 32, 48),
                      spec=seg_spec(classes=("a", "b", "c", "d"), mean=(0.485, 0.456, 0.406),
                                    std=(0.229, 0.224, 0.225)), dynamic_batch=True),
        "foreign": export(small_seg_net(4), tmp / "foreign.onnx", torch.zeros(1, 3, 32, 48)),
        "tmp": tmp,
    }


# ---- pre-processing -------------------------------------------------------------------------------------------


def reference_input(frame: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The spec's pre-processing in float64 with plain numpy: the definition the fused pass must match."""
    h, w = spec.input_size
    if spec.resize.value == "letterbox":
        g = letterbox_geometry(frame.shape[:2], (h, w))
        content = cv2.resize(frame, g.content_hw[::-1], interpolation=cv2.INTER_LINEAR)
        canvas = np.full((h, w, 3), spec.pad_value, np.uint8)
        canvas[g.top:g.top + g.content_hw[0], g.left:g.left + g.content_hw[1]] = content
    else:
        canvas = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
    x = canvas.astype(np.float64)
    if spec.channel_order.value == "RGB":
        x = x[..., ::-1]
    x = (x * spec.scale - np.array(spec.mean)) / np.array(spec.std)
    return x.transpose(2, 0, 1) if spec.input_layout.value == "NCHW" else x


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(resize="letterbox", pad_value=114),
    dict(channel_order="BGR", input_layout="NHWC", mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125), scale=1 / 127.5),
    dict(resize="letterbox", pad_value=0, input_layout="NHWC", input_size=(64, 40)),
])
def test_fused_normalisation_matches_a_float64_reference(overrides):
    spec = seg_spec(**overrides)
    rng = np.random.default_rng(0)
    for shape in ((60, 100, 3), (97, 31, 3), tuple(spec.input_size) + (3,)):
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        norm = Normalizer(spec, spec.input_size)
        out = norm.empty(1)
        out.fill(np.nan)  # every element must be written
        norm.fill(frame, out[0])
        assert out.dtype == np.float32
        np.testing.assert_allclose(out[0], reference_input(frame, spec), rtol=0, atol=2e-6)


def test_letterbox_geometry_centres_the_frame_and_keeps_its_aspect():
    g = letterbox_geometry((60, 100), (48, 48))
    assert g.content_hw == (29, 48) and (g.top, g.left) == (9, 0) and g.padded
    g = letterbox_geometry((100, 50), (64, 64))
    assert g.content_hw == (64, 32) and (g.top, g.left) == (0, 16)


# ---- post-processing ------------------------------------------------------------------------------------------


def test_argmax_matches_numpy_including_ties():
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(7, 300, 257)).astype(np.float32)  # many exact ties
    assert (argmax_classes(logits) == logits.argmax(0)).all()
    assert argmax_classes(logits).dtype == np.uint8
    half = logits.astype(np.float16)
    assert (argmax_classes(half) == half.argmax(0)).all()
    many = rng.standard_normal((300, 5, 6)).astype(np.float32)
    assert (argmax_classes(many) == many.argmax(0)).all() and argmax_classes(many).dtype == np.int32


def test_confidence_is_the_winning_softmax_probability():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((5, 40, 30)).astype(np.float32) * 4
    e = np.exp(logits.astype(np.float64) - logits.max(0))
    np.testing.assert_allclose(softmax_confidence(logits), (e / e.sum(0)).max(0), rtol=1e-5)


def test_nearest_resize_samples_the_model_pixel_under_each_frame_pixel_centre():
    model_map = np.arange(4, dtype=np.uint8).reshape(1, 4).repeat(2, 0)  # columns 0 1 2 3
    g = letterbox_geometry((2, 8), (2, 4))  # no padding, 2x horizontal
    assert (map_to_frame(model_map, g)[0] == [0, 0, 1, 1, 2, 2, 3, 3]).all()


# ---- end to end on models with known answers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stretch", "letterbox", "argmax"])
def test_class_maps_are_right_at_the_frame_size(models, kind):
    frame = halves_frame()
    frame[:20] = GREEN  # a green band on top, to catch vertical letterbox offsets too
    with Segmenter.load(models[kind]) as seg:
        r = seg.segment(frame)
    assert r.class_map.shape == (60, 100) and r.class_map.dtype == np.uint8
    expected = np.zeros((60, 100), np.uint8)
    expected[:, 50:] = 2
    expected[:20] = 1
    wrong = r.class_map != expected
    # Only pixels next to a colour edge may differ (bilinear mixing at the model's resolution).
    edge = np.zeros_like(wrong)
    edge[17:23] = True
    edge[:, 47:53] = True
    assert not (wrong & ~edge).any(), np.argwhere(wrong & ~edge)[:5]
    assert wrong.mean() < 0.03
    fractions = r.class_fractions(3)
    assert fractions.sum() == pytest.approx(1.0)
    assert np.abs(fractions - [0.5 * 40 / 60, 1 / 3, 0.5 * 40 / 60]).max() < 0.03
    if kind == "letterbox":
        g = r.geometry
        assert g.padded and g.content_hw == (29, 48) and (g.top, g.left) == (1, 0)
        assert r.model_map.shape == (32, 48)


def test_fusing_the_argmax_into_the_graph_changes_nothing_but_speed(models):
    frames = [cv2.resize(np.random.default_rng(i).integers(0, 256, (9, 13, 3), dtype=np.uint8), (70, 50))
              for i in range(4)]
    # Fused where the spec decides at the model's size (upsample classes); scores are upsampled unfused.
    fused = Segmenter.load(models["net"], upsample="classes")
    plain = Segmenter.load(models["net"], fuse_argmax=False, upsample="classes")
    opencv = Segmenter.load(models["net"], "opencv", upsample="classes")
    with Segmenter.load(models["net"]) as scores:
        assert scores.spec.upsample.value == "scores" and scores.backend.fused_argmax is None
    assert fused.backend.fused_argmax == "output.class_map" and "argmax fused" in fused.backend.description
    assert plain.backend.fused_argmax is None and opencv.backend.fused_argmax is None
    for f in frames:
        a, b, c = fused.segment(f), plain.segment(f), opencv.segment(f)
        assert (a.class_map == b.class_map).all() and (a.model_map == b.model_map).all()
        assert (a.class_map == c.class_map).mean() > 0.999
    with pytest.raises(InputError, match="load with confidence=True"):
        fused.segment(frames[0], confidence=True)
    with Segmenter.load(models["net"], confidence=True, upsample="classes") as conf:
        r = conf.segment(frames[0])
        assert conf.backend.fused_argmax is None
        assert r.confidence.shape == r.class_map.shape and r.confidence.dtype == np.float32
        assert 0.25 <= r.confidence.min() and r.confidence.max() <= 1.0
        assert (r.class_map == fused.segment(frames[0]).class_map).all()
    for s in (fused, plain, opencv):
        s.close()


def test_confidence_matches_the_softmax_of_the_backend_logits(models):
    frame = cv2.resize(np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8), (48, 32))
    with Segmenter.load(models["net"], confidence=True) as seg:
        r = seg.segment(frame)  # frame size == model size: no resize of the confidence
        logits = seg.backend.infer(seg.preprocess([frame]).tensor)["output"][0].astype(np.float64)
    e = np.exp(logits - logits.max(0))
    np.testing.assert_allclose(r.confidence, (e / e.sum(0)).max(0), rtol=1e-4)
    assert (r.class_map == logits.argmax(0)).all()


def test_timings_cover_each_stage(models):
    with Segmenter.load(models["stretch"]) as seg:
        frame = halves_frame()
        r = seg.segment(frame)
        seg.render(frame, r)
    t = r.timings
    assert t.preprocess > 0 and t.infer > 0 and t.postprocess > 0 and t.render > 0
    assert t.total == pytest.approx(t.preprocess + t.infer + t.postprocess + t.render)


def test_a_dynamic_size_model_runs_at_the_size_asked_for(tmp_path):
    from test_runtime_models import ChannelLogits

    from edgepix.runtime.core.errors import SpecError

    spec = seg_spec(dynamic_size=True, dynamic_batch=True)
    path = export(ChannelLogits(), tmp_path / "dyn.onnx", torch.zeros(1, 3, 32, 48), spec=spec, dynamic_batch=True,
                  dynamic_size=True)
    with Segmenter.load(path, input_size=(64, 96)) as seg:
        assert seg.input_size == (64, 96)
        prepared = seg.preprocess([halves_frame()])
        assert prepared.tensor.shape == (1, 3, 64, 96)
        r = seg.segment(halves_frame())
        assert r.model_map.shape == (64, 96) and (r.class_map[:, :45] == 0).all() and (r.class_map[:, 55:] == 2).all()
    with pytest.raises(SpecError, match="input_size: expected multiples of 32, got 60x96"):
        Segmenter.load(path, input_size=(60, 96))
    fixed = channel_model(tmp_path, name="fixed.onnx")
    with pytest.raises(SpecError, match="exported at a fixed 32x48"):
        Segmenter.load(fixed, input_size=(64, 96))


# ---- batches --------------------------------------------------------------------------------------------------


def count_calls(seg: Segmenter) -> list[int]:
    sizes: list[int] = []
    infer = seg.backend.infer

    def counting(feed, **kw):
        sizes.append(next(iter(feed.values())).shape[0])
        return infer(feed, **kw)

    seg.backend.infer = counting  # type: ignore[method-assign]
    return sizes


def test_static_batch_model_gets_full_padded_chunks(models):
    frames = [halves_frame(40 + 10 * i, 90, left=[RED, GREEN, BLUE][i % 3]) for i in range(5)]
    with Segmenter.load(models["static2"]) as seg:
        assert seg.static_batch == 2
        singles = [seg.segment(f).class_map for f in frames]
        calls = count_calls(seg)
        results = seg.segment_batch(frames)
    assert calls == [2, 2, 2]  # 5 frames: two full chunks and one padded
    assert len(results) == 5 and all(r.batch_size in (1, 2) for r in results)
    for r, s, f in zip(results, singles, frames):
        assert r.class_map.shape == f.shape[:2] and (r.class_map == s).all()


def test_dynamic_batch_model_runs_all_frames_at_once_or_in_max_batch_chunks(models):
    frames = [halves_frame(50, 70 + i) for i in range(5)]
    with Segmenter.load(models["stretch"]) as seg:
        calls = count_calls(seg)
        all_at_once = seg.segment_batch(frames)
    with Segmenter.load(models["stretch"], max_batch=2) as seg:
        calls2 = count_calls(seg)
        chunked = seg.segment_batch(frames)
    assert calls == [5] and calls2 == [2, 2, 1]
    for a, b in zip(all_at_once, chunked):
        assert (a.class_map == b.class_map).all()
    assert Segmenter.load(models["stretch"]).segment_batch([]) == []


# ---- frames ---------------------------------------------------------------------------------------------------


def test_grayscale_and_bgra_frames_are_converted(models):
    gray = np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (40, 1))
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    bgra = cv2.cvtColor(halves_frame(), cv2.COLOR_BGR2BGRA)
    with Segmenter.load(models["net"]) as seg:
        ref = seg.segment(bgr).class_map
        assert (seg.segment(gray).class_map == ref).all()
        assert (seg.segment(gray[..., None]).class_map == ref).all()
        assert (seg.segment(bgra).class_map == seg.segment(halves_frame()).class_map).all()
        assert (seg.segment(np.ascontiguousarray(bgr[:, ::-1])).class_map == seg.segment(bgr[:, ::-1]).class_map).all()


@pytest.mark.parametrize("frame, expected", [
    (np.zeros((40, 60, 3), np.float32), r"got dtype float32 with shape \(40, 60, 3\).*astype\(np.uint8\)"),
    (np.zeros((40, 60, 2), np.uint8), r"\(H, W, 3\).*got shape \(40, 60, 2\)"),
    (np.zeros((40, 60, 3, 1), np.uint8), r"got shape \(40, 60, 3, 1\)"),
    (np.zeros((0, 60, 3), np.uint8), r"non-empty image, got shape \(0, 60, 3\)"),
    ([[1, 2, 3]], "got list"),
])
def test_bad_frames_are_rejected_with_expected_and_actual(models, frame, expected):
    with Segmenter.load(models["stretch"]) as seg:
        with pytest.raises(InputError, match=expected):
            seg.segment(frame)
    with pytest.raises(InputError, match=expected):
        as_bgr(frame)


# ---- rendering ------------------------------------------------------------------------------------------------


def test_overlay_mask_side_and_hidden_classes(models):
    frame = halves_frame()
    frame[:20] = GREEN
    with Segmenter.load(models["stretch"]) as seg:
        r = seg.segment(frame)
        palette_bgr = np.array([c[::-1] for c in seg.spec.colours()], np.uint8)
        overlay = seg.render(frame, r, RenderOptions(alpha=0.4))
        expected = cv2.addWeighted(frame, 0.6, palette_bgr[r.class_map], 0.4, 0)
        assert (overlay == expected).all()
        mask = seg.render(frame, r, RenderOptions(mode="mask"))
        assert (mask == palette_bgr[r.class_map]).all()
        side = seg.render(frame, r, RenderOptions(mode="side"))
        default = overlay_at(frame, r, 0.5, palette_bgr)
        assert side.shape == (60, 200, 3) and (side[:, :100] == frame).all() and (side[:, 100:] == default).all()
        hidden = seg.render(frame, r, RenderOptions(hide=("blue",)))
        is_blue = r.class_map == 2
        assert is_blue.any() and (hidden[is_blue] == frame[is_blue]).all()
        assert (hidden[~is_blue] == default[~is_blue]).all()
        only_green = seg.render(frame, r, RenderOptions(mode="mask", show=("green",)))
        assert (only_green[r.class_map != 1] == 0).all() and (only_green[r.class_map == 1] == palette_bgr[1]).all()
        with_legend = seg.render(frame, r, RenderOptions(legend=True))
        plain = seg.render(frame, r)
        changed = np.argwhere((with_legend != plain).any(axis=2))
        assert len(changed) and changed[:, 0].max() < 60 and changed[:, 1].min() >= 8
        with pytest.raises(InputError, match="unknown class 'purple'.*valid: blue, green, red"):
            seg.render(frame, r, RenderOptions(show=("purple",)))
    assert r.timings.render > 0


def overlay_at(frame, r, alpha, palette_bgr):
    return cv2.addWeighted(frame, 1 - alpha, palette_bgr[r.class_map], alpha, 0)


def test_values_outside_the_class_list_keep_the_frame(models):
    from edgepix.runtime.tasks.render import Renderer

    renderer = Renderer(RGB_CLASSES, seg_spec().colours())
    frame = np.full((10, 10, 3), 77, np.uint8)
    label = np.zeros((10, 10), np.uint8)
    label[5:] = 255  # an ignore index in a label mask
    out = renderer.render(frame, label)
    assert (out[5:] == 77).all() and not (out[:5] == 77).all()


# ---- foreign models and overrides -----------------------------------------------------------------------------


def test_a_model_without_a_spec_gets_one_from_its_shapes_and_warns_once(models, tmp_path):
    path = tmp_path / "other.onnx"
    path.write_bytes(models["foreign"].read_bytes())
    with pytest.warns(ForeignModelWarning, match="other.onnx has no edgepix spec.*4 classes.*ImageNet"):
        seg = Segmenter.load(path)
    assert seg.spec.class_names == ("class0", "class1", "class2", "class3")
    assert seg.spec.input_size == (32, 48) and seg.spec.mean == (0.485, 0.456, 0.406)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Segmenter.load(path, classes=["sky", "road", "car", "person"], mean=[0.5] * 3, std=[0.25] * 3)
    assert again.spec.class_names == ("sky", "road", "car", "person")
    np.testing.assert_allclose(again.normalizer.a, (1 / 255) / 0.25)
    np.testing.assert_allclose(again.normalizer.b, -2.0)
    assert again.segment(halves_frame()).class_map.max() <= 3
    with pytest.raises(ModelFormatError, match="the spec lists 3 classes, the output has 4 channels"):
        Segmenter.load(path, classes=["a", "b", "c"])


def test_a_foreign_class_map_model_needs_class_names(tmp_path):
    path = export(torch.nn.Sequential(small_seg_net(3)), tmp_path / "cm.onnx", torch.zeros(1, 3, 32, 48))
    proto = onnx.load(str(path))  # add an ArgMax + Cast to make it a class-map model without a spec
    out = proto.graph.output[0].name
    proto.graph.node.extend([helper.make_node("ArgMax", [out], ["am"], axis=1, keepdims=0),
                             helper.make_node("Cast", ["am"], ["classes"], to=TensorProto.UINT8)])
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("classes", TensorProto.UINT8, [1, 32, 48]))
    onnx.save(proto, str(path))
    with pytest.raises(ModelFormatError, match="class map.*pass classes="):
        Segmenter.load(path)
    with pytest.warns(ForeignModelWarning):
        seg = Segmenter.load(path, classes=["x", "y", "z"])
    assert seg.graph_class_map and seg.segment(halves_frame()).class_map.max() <= 2


def test_spec_and_graph_disagreements_are_model_format_errors(tmp_path):
    five = export(small_seg_net(4), tmp_path / "five.onnx", torch.zeros(1, 3, 32, 48),
                  spec=seg_spec(classes=tuple("abcde")))
    for fuse in (True, False):
        with pytest.raises(ModelFormatError, match="spec lists 5 classes, the output has 4 channels"):
            Segmenter.load(five, fuse_argmax=fuse)
    size = export(small_seg_net(3), tmp_path / "size.onnx", torch.zeros(1, 3, 32, 48),
                  spec=seg_spec(input_size=(64, 64)))
    with pytest.raises(ModelFormatError, match=r"spec says input \(64, 64\).*fixed at \(32, 48\)"):
        Segmenter.load(size)


def test_generators_are_not_segmenters(tmp_path):
    spec = ModelSpec(task="generation-image", model_name="g", input_size=(32, 48), output_kind="image",
                     output_range=(-1, 1))
    path = export(small_seg_net(3), tmp_path / "g.onnx", torch.zeros(1, 3, 32, 48), spec=spec)
    with pytest.raises(ModelFormatError, match="generation-image model; load it with ImageGenerator"):
        Segmenter.load(path)


# ---- bad files ------------------------------------------------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError) as e:
        Segmenter.load(tmp_path / "nope.onnx")
    assert "model file not found" in one_line(e)


@pytest.mark.parametrize("backend", ["auto", "ort-cpu", "opencv"])
def test_a_file_that_is_not_onnx(tmp_path, backend):
    path = tmp_path / "fake.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    with pytest.raises(ModelFormatError) as e:
        Segmenter.load(path, backend)
    assert "is not an ONNX model" in one_line(e)


def test_an_onnx_file_onnx_runtime_rejects(tmp_path):
    node = helper.make_node("NoSuchOperator", ["images"], ["output"])
    graph = helper.make_graph([node], "bad", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = proto.metadata_props.add()
    entry.key, entry.value = "edgepix.spec", seg_spec(input_size=(8, 8)).to_json()
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelFormatError) as e:
        Segmenter.load(path, "ort-cpu")
    assert "ONNX Runtime can load" in one_line(e) and "NoSuchOperator" in str(e.value)


def test_a_closed_segmenter_says_so(models):
    seg = Segmenter.load(models["stretch"])
    seg.close()
    with pytest.raises(BackendError, match="closed; load the model again"):
        seg.segment(halves_frame())
