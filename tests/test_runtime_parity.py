"""Acceptance: the Segmenter on the default model (fastscnn, 6 synthetic classes, 512x512, exported by
edgepix.export) against PyTorch, ONNX Runtime against OpenCV, and a torch-free runtime process.

An untrained network is a weak judge of argmax agreement: its logits are nearly tied, so float noise decides
the argmax, and it hardly depends on its input, so a broken pre-processing can still "agree". The fixture
therefore fits the network to synthetic scenes first, cheaply and deterministically: BatchNorm statistics are
re-estimated on 24 scenes and the final 1x1 classifier is solved in closed form (class-balanced ridge regression
of one-hot targets on the classifier's input features). The tests check that this worked (few near-ties, a clear
accuracy), and a negative control (feeding BGR where the model expects RGB) shows the comparison can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepix.runtime import Segmenter
from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE, MovingScene, SceneConfig, make_scene
from edgepix.runtime.description.spec import ModelSpec

SIZE = (512, 512)
FRAME = (576, 768)
N_FRAMES = 20
MEAN, STD = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
REPORT: dict[str, float] = {}


def fit_fastscnn() -> torch.nn.Module:
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    model = create_model("fastscnn", num_classes=len(CLASS_NAMES))
    scenes = [make_scene(1000 + i, SceneConfig(size=(128, 128))) for i in range(24)]
    x = torch.from_numpy(np.stack([reference_input(im, (128, 128)) for im, _ in scenes]))
    y = torch.from_numpy(np.stack([m for _, m in scenes])).long()
    for m in model.modules():  # 1. BatchNorm statistics of this data
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 8):
            model(x[i:i + 8])
    model.eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # 2. the 1x1 classifier
    assert head.kernel_size == (1, 1) and head.out_channels == len(CLASS_NAMES)
    features = []
    hook = head.register_forward_hook(lambda mod, inp, out: features.append(inp[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    f = features[0]
    n, c, h, w = f.shape
    target = F.interpolate(y[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().reshape(-1)
    a = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c).double(), torch.ones(n * h * w, 1, dtype=torch.float64)], 1)
    t = F.one_hot(target, len(CLASS_NAMES)).double() * 2 - 1
    weight = (1.0 / torch.bincount(target, minlength=len(CLASS_NAMES)).double().clamp(min=1))[target].sqrt()[:, None]
    aw, tw = a * weight, t * weight
    solution = torch.linalg.solve(aw.T @ aw + 1e-2 * torch.eye(c + 1, dtype=torch.float64), aw.T @ tw)
    with torch.no_grad():
        head.weight.copy_(solution[:c].T.float().reshape(len(CLASS_NAMES), c, 1, 1))
        head.bias.copy_(solution[c].float())
    with torch.no_grad():
        REPORT["fit pixel accuracy (128x128 scenes)"] = float((model(x).argmax(1) == y).float().mean())
    return model


def reference_input(frame: np.ndarray, size=SIZE) -> np.ndarray:
    """Stretch resize, BGR -> RGB, (x / 255 - mean) / std in float64: written here without the runtime."""
    resized = cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = (resized[..., ::-1].astype(np.float64) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads on a busy 2-core machine stall each other (20x slower, measured)
    try:
        return _fitted(tmp)
    finally:
        torch.set_num_threads(threads)


def _fitted(tmp):
    from edgepix.export.to_onnx import OnnxExportOptions, export_onnx

    model = fit_fastscnn()
    spec = ModelSpec(task="segmentation", model_name="fastscnn", input_size=SIZE, class_names=CLASS_NAMES,
                     palette=PALETTE)
    logits_path, argmax_path = tmp / "fastscnn.onnx", tmp / "fastscnn-argmax.onnx"
    export_onnx(model, spec, logits_path, OnnxExportOptions())
    export_onnx(model, spec, argmax_path, OnnxExportOptions(argmax=True, simplify=False))
    scene = MovingScene(seed=7, config=SceneConfig(size=FRAME))
    frames = [scene.next()[0] for _ in range(N_FRAMES)]
    with torch.no_grad():
        logits = [model(torch.from_numpy(reference_input(f)[None]))[0].numpy() for f in frames]
    return {"model": model, "onnx": logits_path, "argmax_onnx": argmax_path, "frames": frames, "logits": logits}


def torch_class_map(logits: np.ndarray) -> np.ndarray:
    model_map = logits.argmax(0).astype(np.uint8)
    return cv2.resize(model_map, (FRAME[1], FRAME[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def test_the_fitted_model_is_decisive_and_input_dependent(fitted):
    logits = np.stack(fitted["logits"])
    top2 = np.partition(logits, -2, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    REPORT["near-tie pixels (top-2 margin < 1e-3)"] = float((margin < 1e-3).mean())
    REPORT["median top-2 logit margin"] = float(np.median(margin))
    used = np.bincount(logits.argmax(1).ravel(), minlength=len(CLASS_NAMES)) / margin.size
    assert REPORT["near-tie pixels (top-2 margin < 1e-3)"] < 0.005
    assert (used > 0.005).sum() >= 4, used  # predictions vary with the scene, not one class everywhere
    assert REPORT["fit pixel accuracy (128x128 scenes)"] > 0.5


def test_segmenter_class_maps_equal_pytorch_argmax(fitted):
    agree_frame = agree_model = total_frame = total_model = 0
    max_logit = max_input = 0.0
    # Decided at the model's size as PyTorch's argmax is (upsample classes): the argmax inside the ONNX Runtime graph.
    with Segmenter.load(fitted["onnx"], "ort-cpu", upsample="classes") as seg, \
            Segmenter.load(fitted["onnx"], "ort-cpu", fuse_argmax=False, upsample="classes") as plain:
        assert seg.backend.fused_argmax
        for frame, ref_logits in zip(fitted["frames"], fitted["logits"]):
            r = seg.segment(frame)
            ref_map = ref_logits.argmax(0)
            agree_model += int((r.model_map == ref_map).sum())
            total_model += ref_map.size
            agree_frame += int((r.class_map == torch_class_map(ref_logits)).sum())
            total_frame += r.class_map.size
            tensor = plain.preprocess([frame]).tensor
            max_input = max(max_input, float(np.abs(tensor[0] - reference_input(frame)).max()))
            max_logit = max(max_logit, float(np.abs(plain.run(tensor)[0] - ref_logits).max()))
            assert (plain.segment(frame).class_map == r.class_map).all()
    REPORT["Segmenter vs PyTorch, frame resolution"] = agree_frame / total_frame
    REPORT["Segmenter vs PyTorch, model resolution"] = agree_model / total_model
    REPORT["max |input - float64 reference|"] = max_input
    REPORT["max |ONNX Runtime logits - PyTorch logits|"] = max_logit
    assert agree_frame / total_frame >= 0.999
    assert agree_model / total_model >= 0.999
    assert max_input < 1e-5 and max_logit < 1e-3


def test_scores_upsampling_equals_pytorch_logits_interpolated_to_the_frame(fitted):
    """The default (`upsample` scores): the logits resized bilinearly to the frame, then the argmax, as PyTorch
    evaluates (F.interpolate, align_corners=False, the same half-pixel grid as OpenCV's INTER_LINEAR)."""
    agree = total = 0
    with Segmenter.load(fitted["onnx"], "ort-cpu") as seg:
        assert seg.spec.upsample.value == "scores" and seg.backend.fused_argmax is None
        for frame, ref_logits in zip(fitted["frames"], fitted["logits"]):
            up = F.interpolate(torch.from_numpy(ref_logits)[None], size=FRAME, mode="bilinear", align_corners=False)
            ref = up[0].argmax(0).numpy()
            agree += int((seg.segment(frame).class_map == ref).sum())
            total += ref.size
    REPORT["Segmenter (upsample scores) vs PyTorch interpolate + argmax"] = agree / total
    assert agree / total >= 0.999


def test_onnx_runtime_and_opencv_agree(fitted):
    agree = total = 0
    with Segmenter.load(fitted["onnx"], "ort-cpu") as a, Segmenter.load(fitted["onnx"], "opencv") as b:
        for frame in fitted["frames"]:
            ma, mb = a.segment(frame).class_map, b.segment(frame).class_map
            agree += int((ma == mb).sum())
            total += ma.size
    REPORT["ort-cpu vs opencv"] = agree / total
    assert agree / total >= 0.999


def test_the_exported_argmax_graph_gives_the_same_maps(fitted):
    # An exported argmax graph decides at the model's size, as the logits model does with upsample classes.
    with Segmenter.load(fitted["onnx"], upsample="classes") as a, Segmenter.load(fitted["argmax_onnx"]) as b:
        assert b.spec.output_kind.value == "class_map" and b.graph_class_map and not b.fused_argmax
        for frame in fitted["frames"][:5]:
            assert (a.segment(frame).class_map == b.segment(frame).class_map).all()


def test_negative_control_a_channel_swap_is_caught(fitted):
    """The same comparison with the colour channels fed in the wrong order must fail by a wide margin."""
    agree = total = 0
    with Segmenter.load(fitted["onnx"], "ort-cpu", channel_order="BGR") as wrong:
        for frame, ref_logits in zip(fitted["frames"][:5], fitted["logits"][:5]):
            m = wrong.segment(frame).class_map
            agree += int((m == torch_class_map(ref_logits)).sum())
            total += m.size
    REPORT["negative control (BGR fed as RGB) vs PyTorch"] = agree / total
    assert agree / total < 0.95


TORCH_FREE = r"""
import json, sys
import edgepix.runtime
from edgepix.runtime import Segmenter
from edgepix.runtime.data.synthetic import MovingScene, SceneConfig
seg = Segmenter.load(sys.argv[1])
scene = MovingScene(seed=1, config=SceneConfig(size=(576, 768)))
shapes = []
for _ in range(10):
    frame = scene.next()[0]
    result = seg.segment(frame)
    seg.render(frame, result)
    shapes.append(list(result.class_map.shape))
print(json.dumps({"frames": len(shapes), "shape": shapes[0], "backend": seg.backend.name,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}))
"""


def test_a_fresh_runtime_process_segments_without_torch(fitted):
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, str(fitted["onnx"])], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 10 and out["shape"] == list(FRAME) and out["torch"] == []


def test_importing_the_runtime_package_loads_nothing_heavy():
    code = ("import sys, edgepix.runtime as rt; before = sorted(m for m in ('numpy', 'cv2', 'onnxruntime', 'torch') "
            "if m in sys.modules); rt.Segmenter; print(before, 'onnxruntime' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # The package itself is free; naming Segmenter loads numpy and OpenCV, and ONNX Runtime only when a model loads.
    assert r.stdout.strip() == "[] False False"
