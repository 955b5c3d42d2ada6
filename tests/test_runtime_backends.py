"""Backends: the registry and `auto`, typed options, validated `infer`, resources, the ONNX header reader, the
in-graph argmax edit, and agreement between ONNX Runtime and OpenCV."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_runtime_models import export, seg_spec, small_seg_net

from edgepix.runtime.backends import (
    Backend,
    BackendOptionError,
    available_backends,
    backend_status,
    load_backend,
    registry,
)
from edgepix.runtime.backends.ort import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    IoBindingRunner,
    OrtCudaOptions,
    OrtOptions,
    OrtTensorrtOptions,
    cuda_providers,
    trt_providers,
)
from edgepix.runtime.core.errors import BackendError, InputError, ModelFormatError
from edgepix.runtime.description.onnxedit import append_argmax, output_names
from edgepix.runtime.description.onnxproto import parse_onnx_header, read_onnx_header
from edgepix.runtime.description.spec import ModelSpec


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("backends")
    return export(small_seg_net(4), tmp / "net.onnx", torch.zeros(1, 3, 32, 48),
                  spec=seg_spec(classes=tuple("abcd")), dynamic_batch=True)


@pytest.fixture(scope="module")
def static_net(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("backends_static")
    return export(small_seg_net(4), tmp / "static.onnx", torch.zeros(1, 3, 32, 48))


def batch(n=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 48), dtype=np.float32)


# ---- registry ---------------------------------------------------------------------------------------------------


def test_every_name_is_registered_and_the_cpu_ones_run_here():
    status = backend_status()
    assert set(status) == {"ort-trt", "ort-cuda", "ort-cpu", "opencv", "openvino", "tensorrt", "triton", "litert"}
    assert status["ort-cpu"] is None and status["opencv"] is None
    assert {"ort-cpu", "opencv"} <= set(available_backends())


def test_auto_picks_the_fastest_available_and_says_so(net, caplog):
    caplog.set_level(logging.INFO, logger="edgepix.runtime.backends")
    with load_backend(net) as b:
        expected = next(n for n in registry.AUTO_ORDER_ONNX if backend_status()[n] is None)
        assert b.name == expected
    assert f"backend auto: chose {expected}" in caplog.text


def test_auto_order_follows_the_onnx_runtime_providers(monkeypatch):
    monkeypatch.setattr(registry, "_ort_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    assert registry.candidates("auto", "m.onnx") == ["ort-trt", "ort-cuda", "ort-cpu", "opencv"]
    monkeypatch.setattr(registry, "_ort_providers", lambda: [CUDA_EP, CPU_EP])
    assert registry.candidates("auto", "m.onnx") == ["ort-cuda", "ort-cpu", "opencv"]
    monkeypatch.setattr(registry, "_ort_providers", lambda: None)  # onnxruntime not installed
    assert registry.candidates("auto", "m.onnx") == ["opencv"]
    assert registry.candidates("auto", "m.engine") == ["tensorrt"]


def test_auto_skips_a_gpu_backend_that_cannot_start(net, monkeypatch, caplog):
    class Broken(Backend):
        name = "ort-trt"

        def __init__(self, path, **kw):
            raise BackendError("ONNX Runtime could not start TensorrtExecutionProvider (libnvinfer.so.10 missing)")

        def infer_impl(self, feed):
            raise AssertionError

    real = registry.backend_class
    monkeypatch.setattr(registry, "candidates", lambda name, path, **_: ["ort-trt", "ort-cpu"])
    monkeypatch.setattr(registry, "backend_class", lambda name: Broken if name == "ort-trt" else real(name))
    caplog.set_level(logging.INFO, logger="edgepix.runtime.backends")
    with load_backend(net) as b:
        assert b.name == "ort-cpu"
    assert "ort-trt could not start" in caplog.text and "libnvinfer" in caplog.text
    with pytest.raises(BackendError, match="libnvinfer"):  # asked for by name: no fallback
        monkeypatch.setattr(registry, "candidates", lambda name, path, **_: ["ort-trt"])
        load_backend(net, "ort-trt")


def test_unknown_names_list_the_valid_ones_with_close_matches(net):
    with pytest.raises(BackendError,
                       match=r"unknown backend 'ort-gpu'; valid: auto, litert, opencv, openvino, ort-cpu, ort-cuda, "
                                           r"ort-trt, tensorrt, triton\. Did you mean 'ort-cpu'"):
        load_backend(net, "ort-gpu")


@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt"])
def test_an_unavailable_backend_says_why_and_lists_the_available_ones(net, name):
    if backend_status()[name] is None:
        pytest.skip(f"{name} is available on this machine")
    with pytest.raises(BackendError) as e:
        load_backend(net, name)
    text = str(e.value)
    assert f"backend {name!r} is not available here" in text and "Available: ort-cpu, opencv" in text
    assert "onnxruntime-gpu" in text or "edgepix[gpu]" in text


def test_the_tensorrt_slot_is_reserved_not_unknown(net, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 16)
    if backend_status()["tensorrt"] is None:
        pytest.skip("the tensorrt backend can run here")
    with pytest.raises(BackendError) as e:
        load_backend(engine)
    assert "unknown" not in str(e.value) and "'tensorrt' is not available here" in str(e.value)
    with pytest.raises(BackendError, match="loads .engine/.plan/.trt files, got net.onnx"):
        load_backend(net, "tensorrt")
    with pytest.raises(BackendError, match=r"loads .onnx files, got m.engine; use backend 'tensorrt'"):
        load_backend(engine, "ort-cpu")


# ---- options ----------------------------------------------------------------------------------------------------


def test_options_are_typed_and_checked(net):
    with pytest.raises(BackendOptionError, match=r"unknown option for backend 'ort-cpu': 'thread'.*Did you mean "
                                                 r"'threads'"):
        load_backend(net, "ort-cpu", thread=2)
    with pytest.raises(BackendOptionError, match="threads: expected a positive integer"):
        load_backend(net, "ort-cpu", threads=0)
    with pytest.raises(BackendOptionError, match="graph_optimization: expected one of 'disable'"):
        load_backend(net, "ort-cpu", graph_optimization="max")
    with pytest.raises(BackendOptionError, match="target: expected one of 'auto', 'cpu'"):
        load_backend(net, "opencv", target="gpu")
    with pytest.raises(TypeError):
        OrtOptions(2)  # keyword-only: no positional flags
    with load_backend(net, "ort-cpu", threads=1, graph_optimization="basic") as b:
        assert b.session.get_session_options().intra_op_num_threads == 1
        assert "1 threads, graph optimization basic" in b.description


def test_opencv_cannot_use_cuda_without_an_opencv_cuda_build(net):
    import cv2

    from edgepix.runtime.backends.opencv import opencv_cuda_devices

    if opencv_cuda_devices(cv2):
        pytest.skip("this OpenCV has CUDA")
    with pytest.raises(BackendError, match="has no CUDA device.*target='cpu'"):
        load_backend(net, "opencv", target="cuda")


def test_cuda_and_tensorrt_provider_options(tmp_path):
    model = tmp_path / "seg.onnx"
    cuda = cuda_providers(OrtCudaOptions(device_id=1, gpu_mem_limit_bytes=2 << 30, cudnn_conv_algo_search="HEURISTIC"))
    assert cuda == [(CUDA_EP, {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
                               "do_copy_in_default_stream": "1",
                               "gpu_mem_limit": str(2 << 30)}), (CPU_EP, {})]
    trt = trt_providers(OrtTensorrtOptions(fp16=True, max_workspace_bytes=1 << 30, builder_optimization_level=5), model)
    assert [name for name, _ in trt] == [TRT_EP, CUDA_EP, CPU_EP]
    opts = trt[0][1]
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "seg.ort-trt-cache") == opts["trt_timing_cache_path"]
    assert opts["trt_max_workspace_size"] == str(1 << 30) and opts["trt_builder_optimization_level"] == "5"
    options = OrtTensorrtOptions(engine_cache=False, timing_cache=False, engine_cache_dir=tmp_path)
    off = trt_providers(options, model)[0][1]
    assert off["trt_fp16_enable"] == "False" and "trt_engine_cache_enable" not in off
    with pytest.raises(BackendError, match="builder_optimization_level: expected 0..5"):
        OrtTensorrtOptions(builder_optimization_level=7)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt"])
def test_gpu_backends_match_the_cpu(net, name, tmp_path):
    if backend_status()[name] is not None:
        pytest.skip(f"{name}: {backend_status()[name]}")
    x = batch()
    options = {"engine_cache_dir": tmp_path} if name == "ort-trt" else {}
    with load_backend(net, "ort-cpu") as cpu, load_backend(net, name, **options) as gpu:
        np.testing.assert_allclose(gpu.infer(x)["output"], cpu.infer(x)["output"], atol=1e-3)


# ---- infer --------------------------------------------------------------------------------------------------------


def test_infer_validates_names_dtypes_and_shapes(net):
    with load_backend(net, "ort-cpu") as b:
        assert b.inputs[0].shape == ("batch", 3, 32, 48) and b.inputs[0].dtype == np.float32
        out = b.infer({"images": batch(3)})
        assert out["output"].shape == (3, 4, 32, 48) and b.last_infer_ms > 0
        assert np.array_equal(b.infer(batch(3))["output"], out["output"])  # one array for a one-input model
        cases = [
            ({"image": batch()}, r"inputs: expected \['images'\], got \['image'\] \(missing \['images'\]\)"),
            ({"images": batch().astype(np.float64)}, "expected dtype float32, got float64; convert with .astype"),
            ({"images": batch()[:, :2]}, r"expected shape \(batch, 3, 32, 48\), got \(2, 2, 32, 48\)"),
            ({"images": batch()[0]}, r"expected shape \(batch, 3, 32, 48\), got \(3, 32, 48\)"),
            ({"images": [[1.0]]}, "expected a numpy array, got list"),
        ]
        for feed, message in cases:
            with pytest.raises(InputError, match=message):
                b.infer(feed)


def test_check_false_skips_validation(net, monkeypatch):
    with load_backend(net, "ort-cpu") as b:
        monkeypatch.setattr(b, "check_feed", lambda feed: pytest.fail("validated"))
        assert b.infer({"images": batch()}, check=False)["output"].shape == (2, 4, 32, 48)


def test_a_closed_backend_refuses_to_run_and_closing_twice_is_fine(net):
    b = load_backend(net, "opencv")
    with b:
        b.infer(batch(1))
    assert b.closed and b.net is None
    b.close()
    with pytest.raises(BackendError, match="is closed"):
        b.infer(batch(1))


def test_iobinding_runner_reuses_its_buffer_and_matches_run(net):
    with load_backend(net, "ort-cpu") as b:
        runner = IoBindingRunner(b.session, device_type="cpu", device_id=0, output_names=["output"])
        x1, x2, x3 = batch(2, 1), batch(2, 2), batch(1, 3)
        keep = x1.copy()
        for x in (x1, x2, x1, x3):
            np.testing.assert_array_equal(runner.run({"images": x})["output"], b.infer(x)["output"])
        assert np.array_equal(x1, keep)  # the device buffer is its own memory, never the caller's array
        assert tuple(runner._buffers["images"].shape()) == (1, 3, 32, 48)


def test_opencv_and_onnx_runtime_agree(net):
    x = batch(2)
    with load_backend(net, "ort-cpu") as a, load_backend(net, "opencv") as b:
        assert [t.describe() for t in a.inputs] == [t.describe() for t in b.inputs]
        assert a.metadata == b.metadata and b.spec == ModelSpec.from_json(a.metadata["edgepix.spec"])
        np.testing.assert_allclose(b.infer(x)["output"], a.infer(x)["output"], atol=1e-4)


# ---- ONNX header reader and the argmax edit -------------------------------------------------------------------


def test_the_header_reader_sees_what_onnx_runtime_sees(net, static_net):
    for path in (net, static_net):
        header = read_onnx_header(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [(v.name, v.shape) for v in header.inputs] == [(t.name, tuple(t.shape)) for t in session.get_inputs()]
        assert [(v.name, v.shape) for v in header.outputs] == [(t.name, tuple(t.shape)) for t in session.get_outputs()]
        assert header.metadata == dict(session.get_modelmeta().custom_metadata_map)
        assert header.opsets[""] == 17 and header.inputs[0].dtype == "float32"


def test_the_header_reader_rejects_what_is_not_onnx(tmp_path, net):
    with pytest.raises(ModelFormatError, match="is not an ONNX model"):
        parse_onnx_header(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ModelFormatError, match="is not an ONNX model"):
        parse_onnx_header(net.read_bytes()[:5000])  # truncated
    with pytest.raises(ModelFormatError, match="model file not found"):
        read_onnx_header(tmp_path / "missing.onnx")


def test_append_argmax_makes_a_valid_graph_that_outputs_the_class_map(net):
    data = net.read_bytes()
    fused, name = append_argmax(data, "output")
    assert name == "output.class_map" and output_names(fused) == ["output.class_map"]
    onnx.checker.check_model(onnx.load_from_string(fused), full_check=True)
    x = batch(3)
    logits = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    session = ort.InferenceSession(fused, providers=["CPUExecutionProvider"])
    out = session.get_outputs()[0]
    assert out.type == "tensor(uint8)" and out.shape == ["batch", 32, 48]
    assert np.array_equal(session.run(None, {"images": x})[0], logits.argmax(1))
    assert read_onnx_header(net).metadata == parse_onnx_header(fused).metadata
    with pytest.raises(ModelFormatError, match="no output 'logits'"):
        append_argmax(data, "logits")
