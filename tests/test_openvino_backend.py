"""The openvino backend: the same answers as ONNX Runtime on the fixtures' models, the Backend contract (options,
fused argmax, closing), `auto` untouched, and an import that happens only when the backend is used."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgepix.runtime.backends import load_backend, registry
from edgepix.runtime.core.errors import BackendError, DependencyError
from edgepix.runtime.data.synthetic import SceneConfig, make_scene
from edgepix.runtime.description.spec import ModelSpec

openvino = pytest.importorskip("openvino", reason="the openvino backend needs pip install 'edgepix[openvino]'")


def scene_batch(spec: ModelSpec, n: int = 8) -> np.ndarray:
    """Labelled synthetic scenes, pre-processed as the Segmenter feeds them (seeds no other test uses)."""
    from edgepix.runtime.tasks.imageops import Normalizer

    size = spec.input_size
    frames = [make_scene(7_700_000 + i, SceneConfig(size=size))[0] for i in range(n)]
    return Normalizer(spec, size)(frames)[0]


def test_class_maps_agree_with_onnx_runtime_and_fp32_logits_are_close(seg_onnx):
    spec = ModelSpec.from_onnx(seg_onnx)
    x = scene_batch(spec, 8)
    with load_backend(seg_onnx, "ort-cpu", threads=1) as ort_cpu, load_backend(seg_onnx, "openvino", threads=1) as ov:
        assert ov.metadata == ort_cpu.metadata and ov.spec == spec
        assert [t.describe() for t in ov.inputs] == [t.describe() for t in ort_cpu.inputs]
        expected = np.concatenate([ort_cpu.infer(x[i:i + 1])[spec.output_name] for i in range(len(x))])
        got = np.concatenate([ov.infer(x[i:i + 1])[spec.output_name] for i in range(len(x))])
        assert "precision f32" in ov.description
    assert got.shape == expected.shape and got.dtype == np.float32
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) <= 1e-4 * max(scale, 1.0)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    assert agreement >= 0.999, agreement


def test_fused_argmax_returns_the_same_class_map(seg_onnx):
    spec = ModelSpec.from_onnx(seg_onnx)
    x = scene_batch(spec, 1)
    with load_backend(seg_onnx, "ort-cpu") as ort_cpu, \
            load_backend(seg_onnx, "openvino", fuse_argmax=spec.output_name) as ov:
        assert ov.fused_argmax == spec.output_name + ".class_map"
        assert ov.output(ov.fused_argmax).dtype == np.uint8
        class_map = ov.infer(x)[ov.fused_argmax]
        reference = ort_cpu.infer(x)[spec.output_name].argmax(1)
    assert class_map.shape == reference.shape == (1, *spec.input_size)
    assert float((class_map == reference).mean()) >= 0.999


def test_options_are_typed_and_checked(seg_onnx):
    with pytest.raises(BackendError, match="inference_precision: expected one of 'f32', 'bf16', 'f16', 'default'"):
        load_backend(seg_onnx, "openvino", inference_precision="f64")
    with pytest.raises(BackendError, match="threads: expected a positive integer"):
        load_backend(seg_onnx, "openvino", threads=0)
    with pytest.raises(BackendError, match="unknown option for backend 'openvino': 'thread'"):
        load_backend(seg_onnx, "openvino", thread=2)
    with pytest.raises(BackendError, match="openvino device 'NPU' is not here; OpenVINO .* sees CPU"):
        load_backend(seg_onnx, "openvino", device="NPU")


def test_a_closed_backend_refuses_to_run(seg_onnx):
    spec = ModelSpec.from_onnx(seg_onnx)
    backend = load_backend(seg_onnx, "openvino")
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(scene_batch(spec, 1))


def test_auto_keeps_its_order_and_never_picks_openvino(seg_onnx):
    assert "openvino" not in registry.AUTO_ORDER_ONNX
    assert registry.backend_status()["openvino"] is None
    assert "openvino" not in registry.candidates("auto", seg_onnx)


LAZY = r"""
import sys
from edgepix.runtime.backends import backend_status, load_backend
import edgepix.runtime.backends.openvino
status = backend_status()
print("imported", "openvino" in sys.modules, status["openvino"] is None)
"""

MISSING = r"""
import sys
sys.modules["openvino"] = None  # as if the package were not installed
from edgepix.runtime.backends import backend_status, load_backend
from edgepix.runtime.backends.openvino import OpenVINOBackend
print(backend_status()["openvino"])
for attempt in (lambda: load_backend(sys.argv[1], "openvino"), lambda: OpenVINOBackend(sys.argv[1])):
    try:
        attempt()
    except Exception as e:
        print(type(e).__name__, "|", str(e))
"""


def test_openvino_is_imported_only_when_the_backend_is_created():
    r = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "imported False True"


def test_a_missing_openvino_is_one_line_that_says_how_to_install_it(seg_onnx):
    r = subprocess.run([sys.executable, "-c", MISSING, str(seg_onnx)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    status, via_registry, direct = r.stdout.strip().splitlines()
    assert "pip install 'edgepix[openvino]'" in status
    assert via_registry.startswith("BackendError | backend 'openvino' is not available here")
    assert direct.startswith("DependencyError | ") and direct.endswith("pip install 'edgepix[openvino]'")
    assert DependencyError.__name__ == "DependencyError"
