"""Stable masks on video: the flicker, lag and accuracy measures, and the temporal stabilizer, on the synthetic
moving scenes with label noise injected at the model's output (a controlled source of flicker)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edgepix.runtime.core.errors import InputError
from edgepix.runtime.data.flicker import FlickerMeter, LagMeter, TemporalScore
from edgepix.runtime.data.synthetic import CLASS_NAMES, MovingScene, SceneConfig
from edgepix.runtime.description.spec import OutputKind
from edgepix.runtime.tasks.temporal import (
    Stabilizer,
    TemporalMode,
    TemporalOptions,
    TemporalState,
    decision_margin,
    small_frame,
)

C = len(CLASS_NAMES)
FRAME = (240, 320)
MODEL = (128, 128)


def noisy_scores(truth: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """What a model that knows the truth but hesitates would output: one-hot logits of the true class (x2) plus
    Gaussian noise, at the model's resolution."""
    small = cv2.resize(truth, MODEL[::-1], interpolation=cv2.INTER_NEAREST)
    scores = np.eye(C, dtype=np.float32)[small].transpose(2, 0, 1) * 2.0
    return scores + rng.normal(0, noise, size=scores.shape).astype(np.float32)


def score_stream(mode: str, noise: float, *, frames: int = 60, seed: int = 1) -> dict:
    scene = MovingScene(seed=seed, config=SceneConfig(size=FRAME))
    state = TemporalState(TemporalOptions(mode=mode))
    score = TemporalScore(C)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        frame, truth = scene.next()
        classes = state.update(noisy_scores(truth, noise, rng), frame).argmax(0).astype(np.uint8)
        score.update(classes, truth)
    return score.summary()


def test_flicker_rises_with_the_injected_noise():
    flicker = [score_stream("off", noise)["flicker"] for noise in (0.0, 0.4, 0.8, 1.2)]
    # Without noise only the model-size grid flickers: boundary pixels of an object that moved less than a model
    # pixel take the class of the nearest model pixel, which may change.
    assert flicker[0] < 0.02
    assert flicker[0] < flicker[1] < flicker[2] < flicker[3], flicker
    assert flicker[3] > 0.1


@pytest.mark.parametrize("mode", ["ema", "flow"])
def test_the_stabilizer_removes_most_flicker_without_lag_or_loss_of_accuracy(mode):
    before, after = score_stream("off", 0.8), score_stream(mode, 0.8)
    assert after["flicker"] <= 0.5 * before["flicker"], (before, after)
    assert after["lag_frames"] <= 1 and before["lag_frames"] == 0
    assert after["miou"] >= before["miou"] - 0.005, (before, after)


def test_a_plain_average_lags_behind_moving_objects_and_the_gate_does_not():
    """Without the motion gate (threshold 255: nothing counts as motion) the EMA trails the objects."""
    scene = MovingScene(seed=4, config=SceneConfig(size=FRAME), max_speed=8.0)
    gated = TemporalState(TemporalOptions(mode="ema", alpha=0.2))
    plain = TemporalState(TemporalOptions(mode="ema", alpha=0.2, motion_threshold=255.0))
    lags = {"gated": LagMeter(), "plain": LagMeter()}
    rng = np.random.default_rng(0)
    for _ in range(60):
        frame, truth = scene.next()
        scores = noisy_scores(truth, 0.0, rng)
        for name, state in (("gated", gated), ("plain", plain)):
            classes = state.update(scores, frame).argmax(0).astype(np.uint8)
            lags[name].update(cv2.resize(classes, FRAME[::-1], interpolation=cv2.INTER_NEAREST), truth)
    assert lags["gated"].lag == 0 and lags["plain"].lag >= 1, (lags["gated"].agreement(), lags["plain"].agreement())


def test_decision_margin_is_the_lead_of_the_top_class_in_logits_for_every_kind_of_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(5, 8, 9)).astype(np.float32)
    ranked = np.sort(logits, axis=0)
    assert np.allclose(decision_margin(logits), ranked[-1] - ranked[-2], atol=1e-5)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    assert np.allclose(decision_margin(softmax, OutputKind.PROBABILITIES), ranked[-1] - ranked[-2], atol=1e-3)
    z = logits[:1]  # a binary output: its logit against the threshold's, whichever scale it comes in
    assert np.allclose(decision_margin(z, OutputKind.BINARY_LOGIT, 0.5), np.abs(z[0] - 0.5), atol=1e-5)
    p = 1 / (1 + np.exp(-z))
    t = 1 / (1 + np.exp(-0.5))
    assert np.allclose(decision_margin(p, OutputKind.BINARY_PROBABILITY, t), np.abs(z[0] - 0.5), atol=1e-3)


def test_unsure_pixels_lean_on_the_history_sure_ones_follow_and_changed_ones_start_afresh():
    """One still picture twice, then once with its left side changed. Class 0 was sure everywhere; the new scores
    tie classes 0 and 1 in the top rows (unsure) and make class 1 sure in the bottom rows."""
    options = TemporalOptions(mode="ema", alpha=0.3, alpha_min=0.05, near_motion=0)
    state = TemporalState(options)
    frame = np.full((120, 160, 3), 80, np.uint8)
    old = np.zeros((C, 12, 16), np.float32)
    old[0] = 4.0
    state.update(old, frame)
    new = np.zeros_like(old)
    new[0, :6], new[1, :6] = 1.0, 1.0  # a tie: margin 0
    new[1, 6:] = 4.0  # class 1 leads by 4 logits, more than confident_margin
    out = state.update(new, frame)
    assert np.allclose(out[:, :6], old[:, :6] + 0.05 * (new[:, :6] - old[:, :6]), atol=1e-5)
    assert np.allclose(out[:, 6:], old[:, 6:] + 0.3 * (new[:, 6:] - old[:, 6:]), atol=1e-5)
    moved = frame.copy()
    moved[:, :40] = 200  # the left quarter changed: there the new frame's scores pass whole
    out = state.update(new, moved)
    assert np.allclose(out[:, :, :3], new[:, :, :3], atol=1e-5)
    assert not np.allclose(out[:, :, 6:], new[:, :, 6:], atol=0.1)


def test_a_hesitant_region_flickers_less_than_with_one_weight_and_a_sure_change_passes_as_fast():
    """A still picture: in the top half the model hesitates between classes 1 and 2 (a lead of +-0.5 logits at
    random), in the bottom half it switches once, surely, from class 3 to class 4."""
    frame = np.full((120, 160, 3), 80, np.uint8)
    rng = np.random.default_rng(0)
    weighted = TemporalState(TemporalOptions(mode="ema"))
    uniform = TemporalState(TemporalOptions(mode="ema", alpha_min=TemporalOptions().alpha))  # one weight for all
    changes = {"weighted": 0, "uniform": 0}
    switched_at = {}
    previous = {}
    for t in range(60):
        scores = np.zeros((C, 32, 32), np.float32)
        scores[1, :16] = 3.0 + rng.normal(0, 0.5, size=(16, 32))
        scores[2, :16] = 3.0
        scores[3 if t < 30 else 4, 16:] = 4.0
        for name, state in (("weighted", weighted), ("uniform", uniform)):
            classes = state.update(scores, frame).argmax(0)
            if name in previous:
                changes[name] += int((classes[:16] != previous[name][:16]).sum())
            previous[name] = classes
            if t >= 30 and name not in switched_at and (classes[16:] == 4).all():
                switched_at[name] = t
    assert changes["weighted"] <= 0.6 * changes["uniform"], changes
    assert switched_at == {"weighted": 31, "uniform": 31}, switched_at  # one frame late: the lag of an EMA at 0.3


def test_the_motion_gate_ignores_sensor_noise_but_not_a_moving_edge():
    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur((rng.random((480, 640, 3)) * 255).astype(np.uint8), (0, 0), 8)
    state = TemporalState(TemporalOptions(mode="ema"))

    def noisy() -> np.ndarray:  # independent sensor noise of 8 levels in every channel of every pixel
        return np.clip(picture + rng.normal(0, 8, picture.shape), 0, 255).astype(np.uint8)

    assert state._moved(small_frame(noisy(), (256, 256)), small_frame(noisy(), (256, 256))).mean() < 0.005
    before, after = picture.copy(), picture.copy()
    cv2.rectangle(before, (200, 150), (360, 300), (90, 140, 60), -1)
    cv2.rectangle(after, (204, 150), (364, 300), (90, 140, 60), -1)  # moved 4 pixels right
    moved = state._moved(small_frame(before, (256, 256)), small_frame(after, (256, 256)))
    changed = cv2.resize((before != after).any(axis=2).astype(np.uint8), (256, 256), interpolation=cv2.INTER_AREA) > 0
    assert moved[changed].mean() > 0.9
    # the gate hugs the edge: beside it, the new frame's unsteady boundary would pass unsmoothed
    assert (moved & ~changed).sum() < 0.5 * changed.sum(), ((moved & ~changed).sum(), changed.sum())


def test_a_scene_cut_resets_the_state():
    state = TemporalState(TemporalOptions(mode="ema"))
    rng = np.random.default_rng(0)
    a, b = MovingScene(seed=1, config=SceneConfig(size=FRAME)), MovingScene(seed=2, config=SceneConfig(size=FRAME))
    for _ in range(5):
        frame, truth = a.next()
        state.update(noisy_scores(truth, 0.5, rng), frame)
    frame, truth = b.next()
    cut = np.zeros_like(frame)  # a black frame: the mean change exceeds any threshold
    scores = noisy_scores(truth, 0.5, rng)
    out = state.update(scores, cut)
    assert state.resets == 1 and np.array_equal(out, scores)  # nothing of the old scene mixed in


def test_two_streams_do_not_share_state():
    stabilizer = Stabilizer(TemporalOptions(mode="ema"))
    rng = np.random.default_rng(0)
    scenes = {i: MovingScene(seed=i + 1, config=SceneConfig(size=FRAME)) for i in (0, 1)}
    alone = TemporalState(TemporalOptions(mode="ema"))
    for _ in range(6):
        for stream, scene in scenes.items():
            frame, truth = scene.next()
            scores = noisy_scores(truth, 0.6, rng)
            out = stabilizer.state(stream).update(scores, frame)
            if stream == 1:
                expected = alone.update(scores, frame)
                assert np.array_equal(out, expected)  # stream 0's frames changed nothing of stream 1's
    assert stabilizer.state(0) is not stabilizer.state(1)
    stabilizer.reset(0)
    assert stabilizer.state(0).scores is None and stabilizer.state(1).scores is not None


def test_hysteresis_steadies_class_maps_of_models_without_scores():
    scene = MovingScene(seed=1, config=SceneConfig(size=FRAME))
    state = TemporalState(TemporalOptions(mode="hysteresis"))
    off, steady = TemporalScore(C), TemporalScore(C)
    rng = np.random.default_rng(0)
    for _ in range(60):
        frame, truth = scene.next()
        classes = noisy_scores(truth, 0.8, rng).argmax(0).astype(np.uint8)
        off.update(classes, truth)
        steady.update(state.update(classes, frame), truth)
    assert steady.summary()["flicker"] <= 0.6 * off.summary()["flicker"]


def test_flicker_on_real_video_follows_the_flow():
    """A panning camera over a textured picture whose mask pans with it: no flicker; the same with a tenth of the
    pixels relabelled at random in each frame: about a tenth."""
    rng = np.random.default_rng(3)
    world = cv2.GaussianBlur((rng.random((300, 500, 3)) * 255).astype(np.uint8), (0, 0), 3)
    labels = (cv2.GaussianBlur(rng.random((300, 500)), (0, 0), 12) > 0.5).astype(np.uint8)
    steady, noisy = FlickerMeter(), FlickerMeter()
    for t in range(12):
        x = 40 + 3 * t  # the camera pans 3 pixels a frame
        frame, mask = world[40:240, x:x + 320], labels[40:240, x:x + 320]
        steady.update(frame, mask)
        flipped = mask.copy()
        hit = rng.random(mask.shape) < 0.1
        flipped[hit] = 1 - flipped[hit]
        noisy.update(frame, flipped)
    assert steady.flicker < 0.01, steady.flicker
    assert 0.12 < noisy.flicker < 0.25, noisy.flicker  # 1 - (0.9^2 + 0.1^2) = 0.18 of the pixels change


def test_bad_options_are_one_line_errors():
    with pytest.raises(InputError, match="unknown temporal mode 'smooth'"):
        TemporalOptions(mode="smooth")
    with pytest.raises(InputError, match="alpha"):
        TemporalOptions(mode="ema", alpha=0)
    with pytest.raises(InputError, match="alpha_min"):
        TemporalOptions(mode="ema", alpha_min=0)
    assert TemporalOptions(mode="ema", alpha=0.02).alpha_min == 0.02  # --temporal-alpha below alpha_min lowers both
    assert TemporalOptions().mode is TemporalMode.OFF


# ---- in the pipeline and on the command line ---------------------------------------------------------------------


def test_segment_with_temporal_ema_writes_the_flicker_figure(seg_onnx, tmp_path):
    from conftest import run_edgepix
    from test_stream_support import write_scene_video

    video = write_scene_video(tmp_path / "scene.mp4", n=30, size=(160, 120))
    figures = {}
    for mode in ("off", "ema"):
        stats = tmp_path / f"{mode}.json"
        r = run_edgepix("--quiet", "segment", str(seg_onnx), "--source", str(video), "--sink", "null://",
                        "--temporal", mode, "--stats", str(stats))
        assert r.returncode == 0, r.stderr
        figures[mode] = json.loads(stats.read_text())["temporal"]
    assert figures["off"]["mode"] == "off" and figures["ema"]["mode"] == "ema"
    assert 0.0 <= figures["ema"]["flicker"] <= figures["off"]["flicker"] < 1.0, figures
    assert figures["ema"]["flicker_per_stream"] == [figures["ema"]["flicker"]]


def test_pipeline_streams_keep_their_own_temporal_state_and_a_reconnect_resets_it(seg_onnx):
    from edgepix.runtime import Pipeline, PipelineOptions, Segmenter

    seg = Segmenter.load(seg_onnx, "ort-cpu", fuse_argmax=False)
    options = PipelineOptions(max_frames=20, temporal=TemporalOptions(mode="ema"), measure_flicker=True)
    pipeline = Pipeline(seg, ["synthetic://?size=160x120&seed=1", "synthetic://?size=160x120&seed=2"], ["null://"],
                        options)
    stats = pipeline.run()
    states = pipeline.stabilizer.states
    assert sorted(states) == [0, 1] and states[0] is not states[1]
    assert states[0].frame is not None and states[1].frame is not None
    assert not np.array_equal(states[0].scores, states[1].scores)
    assert len(stats["temporal"]["flicker_per_stream"]) == 2
    pipeline.sources[1].reconnects += 1  # what a reconnect does to the source's count
    state = pipeline._temporal_state(1)
    assert state.scores is None and state.resets == 1 and pipeline.stabilizer.state(0).scores is not None
    seg.close()


def test_ema_on_a_class_map_model_is_one_line(seg_onnx):
    from edgepix.runtime import Segmenter

    # decided at the model's size, the argmax is fused into the graph: a class map comes out
    with Segmenter.load(seg_onnx, "ort-cpu", upsample="classes") as seg:
        assert seg.fused_argmax
        prepared = seg.preprocess([np.zeros((64, 64, 3), np.uint8)])
        raw = seg.run(prepared.tensor)
        with pytest.raises(InputError, match="smooths scores, but the argmax was fused"):
            seg.stabilize(raw, [(TemporalState(TemporalOptions(mode="ema")), np.zeros((64, 64, 3), np.uint8))])
        held = seg.stabilize(raw, [(TemporalState(TemporalOptions(mode="hysteresis")),
                                    np.zeros((64, 64, 3), np.uint8))])
        assert np.array_equal(held, raw)  # the first frame passes through
