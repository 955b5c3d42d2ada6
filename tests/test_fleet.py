"""Fleet deployment: Triton model repositories (config.pbtxt read by tritonclient's own ModelConfig protobuf); the
`triton` backend against a real Triton Inference Server (tests/triton_server.py: the nvidia-pytriton wheel's
tritonserver serving Python-backend repositories, over HTTP and gRPC, on a real video), and against a KServe v2
stand-in (tests/kserve_standin.py) only for the onnxruntime_onnx repositories that server cannot load; DeepStream
configs (read by GLib's key-file parser) with nvinfer's rules simulated in numpy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_edgepix
from kserve_standin import KServeStandInServer  # the stand-in, not Triton: onnxruntime_onnx models only

from edgepix.runtime.core.errors import BackendError, DependencyError, ModelFormatError
from edgepix.runtime.description.onnxproto import read_onnx_header
from edgepix.runtime.description.spec import ModelSpec, Precision

TRITON_TYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8", "float16": "TYPE_FP16"}
needs_tritonclient = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tritonclient") is None,
    reason="tritonclient is not installed (pip install 'edgepix[triton]')")


def parse_config(model_dir: Path):
    """config.pbtxt through tritonclient's ModelConfig protobuf, as Triton reads it."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def check_config_matches_onnx(config, onnx_path: Path) -> None:
    """Names, data types and dims of the config equal the ONNX's (batch dim dropped when batching)."""
    from tritonclient.grpc import model_config_pb2

    header = read_onnx_header(onnx_path)
    for tensors, values in ((config.input, header.inputs), (config.output, header.outputs)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for t, v in zip(tensors, values):
            assert model_config_pb2.DataType.Name(t.data_type) == TRITON_TYPES[v.dtype]
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in v.shape]
            if config.max_batch_size > 0:
                assert dims[0] == -1, "a batching model needs a dynamic batch dimension"
                dims = dims[1:]
            assert list(t.dims) == dims


def instance_groups(config) -> list[tuple[int, str]]:
    from tritonclient.grpc import model_config_pb2

    return [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group]


def spec_parameter(config) -> ModelSpec:
    return ModelSpec.from_json(config.parameters["edgepix.spec"].string_value)


# ---- Triton model repositories ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_repo(seg_checkpoint, tmp_path_factory) -> Path:
    """A repository with the checkpoint's class-map model (max batch 8) and its logits model (CPU, 2 instances)."""
    from edgepix.export.pipeline import ExportRequest
    from edgepix.export.triton import InstanceKind, TritonOptions, write_checkpoint_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    request = ExportRequest(seg_checkpoint, verify_n=4)
    write_checkpoint_repository(request, repo, TritonOptions(max_batch=8))
    write_checkpoint_repository(request, repo, TritonOptions(name="fastscnn_logits", max_batch=4, argmax=False,
                                                             kind=InstanceKind.CPU, instances=2))
    return repo


@needs_tritonclient
def test_triton_repository_from_checkpoint(triton_repo, seg_checkpoint):
    from edgepix.runtime.description.spec import OutputKind

    model_dir = triton_repo / "fastscnn"
    config = parse_config(model_dir)
    assert (config.name, config.platform, config.max_batch_size) == ("fastscnn", "onnxruntime_onnx", 8)
    check_config_matches_onnx(config, model_dir / "1" / "model.onnx")
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert instance_groups(config) == [(1, "KIND_GPU")]
    spec = spec_parameter(config)
    assert spec == ModelSpec.from_onnx(model_dir / "1" / "model.onnx")
    assert spec.output_kind is OutputKind.CLASS_MAP and spec.dynamic_batch  # argmax by default for serving
    assert (model_dir / "labels.txt").read_text().splitlines() == list(spec.class_names)
    assert config.output[0].label_filename == "labels.txt"
    assert not any(p.name.startswith(".") for p in triton_repo.iterdir()), "staging folders were left behind"

    logits = parse_config(triton_repo / "fastscnn_logits")
    check_config_matches_onnx(logits, triton_repo / "fastscnn_logits" / "1" / "model.onnx")
    assert logits.output[0].data_type == 11  # TYPE_FP32
    assert instance_groups(logits) == [(2, "KIND_CPU")]
    assert logits.parameters["intra_op_thread_count"].string_value == "1"
    assert logits.parameters["inter_op_thread_count"].string_value == "1"


@needs_tritonclient
def test_triton_static_batch_onnx_is_refused_or_served_without_batching(seg_onnx, tmp_path):
    repo = tmp_path / "repo"
    r = run_edgepix("export", str(seg_onnx), "--format", "triton", "--out", str(repo), "--max-batch", "8")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "static batch of 1" in lines[0] and "--dynamic-batch" in lines[0], r.stderr
    assert not (repo / "fastscnn").exists()

    r = run_edgepix("export", str(seg_onnx), "--format", "triton", "--out", str(repo), "--max-batch", "0",
                    "--no-argmax", "--name", "fixed")
    assert r.returncode == 0, r.stderr
    config = parse_config(repo / "fixed")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    check_config_matches_onnx(config, repo / "fixed" / "1" / "model.onnx")
    assert list(config.input[0].dims) == [1, 3, 64, 64]
    assert (repo / "fixed" / "1" / "model.onnx").read_bytes() == seg_onnx.read_bytes()


@needs_tritonclient
def test_triton_argmax_appended_to_an_existing_onnx(seg_onnx, tmp_path):
    import onnxruntime as ort

    from edgepix.export.triton import TritonOptions, write_onnx_repository

    result = write_onnx_repository(seg_onnx, tmp_path / "repo", TritonOptions(max_batch=0))
    config = parse_config(result.model_dir)
    check_config_matches_onnx(config, result.model_dir / "1" / "model.onnx")
    assert config.output[0].data_type == 2  # TYPE_UINT8
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    logits = ort.InferenceSession(str(seg_onnx), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    served = ort.InferenceSession(str(result.model_dir / "1" / "model.onnx"),
                                  providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(served, logits.argmax(1).astype(np.uint8))
    assert spec_parameter(config).output_name == config.output[0].name


@needs_tritonclient
def test_triton_tensorrt_accelerator_block_and_bad_combinations(seg_onnx, tmp_path):
    from edgepix.export.triton import TritonOptions, TrtAccelerator, model_config_text, write_onnx_repository
    from edgepix.runtime.core.errors import ExportError

    result = write_onnx_repository(seg_onnx, tmp_path / "repo", TritonOptions(max_batch=0,
                                                                               trt_accelerator=TrtAccelerator.FP16))
    config = parse_config(result.model_dir)
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert "intra_op_thread_count" not in config.parameters  # GPU instances
    with pytest.raises(ExportError, match="needs GPU instances"):
        TritonOptions(kind="cpu", trt_accelerator=TrtAccelerator.INT8)
    with pytest.raises(ExportError, match="--name"):
        TritonOptions(name="../escape")
    # The text builder is public for tools that write their own repositories: from the parts Triton reads back out
    # of this one it gives the config.pbtxt the writer wrote, byte for byte, and a tool's own options come through.
    from tritonclient.grpc import model_config_pb2

    from edgepix.export.triton import TensorConfig

    def tensors(group) -> list[TensorConfig]:
        return [TensorConfig(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in group]

    parts = dict(name=config.name, platform=config.platform, spec=spec_parameter(config),
                 inputs=tensors(config.input), outputs=tensors(config.output))
    text = model_config_text(**parts, options=TritonOptions(max_batch=0, trt_accelerator=TrtAccelerator.FP16))
    assert text == (result.model_dir / "config.pbtxt").read_text(encoding="utf-8") == result.config
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "config.pbtxt").write_text(model_config_text(**parts, options=TritonOptions(
        max_batch=0, instances=3, trt_accelerator=TrtAccelerator.FP16)), encoding="utf-8")
    own = parse_config(tmp_path / "own")
    assert instance_groups(own) == [(3, "KIND_GPU")] and instance_groups(config) == [(1, "KIND_GPU")]
    assert (own.input, own.output, own.optimization) == (config.input, config.output, config.optimization)


@needs_tritonclient
def test_triton_plan_repository_names_engines_by_compute_capability(seg_onnx, tmp_path):
    from edgepix.export.triton import TritonOptions, write_plan_repository
    from edgepix.runtime.backends.tensorrt.manifest import EngineManifest, ProfileShapes, TensorDesc, write_manifest
    from edgepix.runtime.core.errors import ExportError

    spec = ModelSpec.from_onnx(seg_onnx).replace(dynamic_batch=True, precision=Precision.FP16)
    engines = []
    for cc, gpu in (("8.7", "Orin"), ("8.9", "L4")):
        engine = tmp_path / f"fastscnn.{cc}.engine"
        engine.write_bytes(b"engine for " + cc.encode())
        write_manifest(engine, EngineManifest(
            spec=spec, tensorrt="10.3.0", cuda="12.6", gpu=gpu, compute_capability=cc, onnx_sha256="0" * 64,
            precision="fp16", profiles=((ProfileShapes("images", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)),),),
            built="2026-01-01T00:00:00Z",
            io=(TensorDesc("images", "input", "float32", (-1, 3, 64, 64)),
                TensorDesc("output", "output", "float32", (-1, 6, 64, 64)))))
        engines.append(engine)
    result = write_plan_repository(engines, tmp_path / "repo", TritonOptions(max_batch=8))
    config = parse_config(result.model_dir)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert dict(config.cc_model_filenames) == {"8.7": "model_sm87.plan", "8.9": "model_sm89.plan"}
    assert (result.model_dir / "1" / "model_sm89.plan").read_bytes() == b"engine for 8.9"
    assert list(config.input[0].dims) == [3, 64, 64] and list(config.output[0].dims) == [6, 64, 64]
    with pytest.raises(ExportError, match="takes batches up to 8"):
        write_plan_repository(engines[:1], tmp_path / "repo2", TritonOptions(max_batch=16))


# ---- Python-backend repositories (export/triton_model.py inside the server) ------------------------------------


@pytest.fixture(scope="module")
def dynamic_onnx(seg_checkpoint, tmp_path_factory) -> Path:
    """The checkpoint's FP32 logits ONNX with a dynamic batch (no parity gate: serving is what is tested here)."""
    from dataclasses import replace

    from edgepix.export.pipeline import ExportRequest, run_export

    request = ExportRequest(seg_checkpoint, out=tmp_path_factory.mktemp("dynamic") / "fastscnn64.onnx", verify=False)
    return run_export(replace(request, onnx=replace(request.onnx, dynamic_batch=True))).path


@pytest.fixture(scope="module")
def image_generator_onnx(tmp_path_factory) -> Path:
    """An image -> image generator that copies its input (a 1x1 convolution, test_runtime_models' ChannelLogits):
    with mean 0.5, std 0.5 and output range [-1, 1] it gives back the (resized) frame."""
    import torch
    from test_runtime_models import ChannelLogits, export

    spec = ModelSpec(task="generation-image", model_name="copy", input_size=(64, 64), output_kind="image",
                     output_range=(-1.0, 1.0), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return export(ChannelLogits(), tmp_path_factory.mktemp("generator") / "copy.onnx", torch.zeros(1, 3, 64, 64),
                  spec=spec, dynamic_batch=True)


@pytest.fixture(scope="module")
def python_repo(dynamic_onnx, image_generator_onnx, tmp_path_factory) -> Path:
    """A Python-backend repository: the class map and the logits as tensors, the frames API of a segmenter and of an
    image generator, and a model left unloaded (explicit model control) for the not-loaded error."""
    from edgepix.export.triton import TritonOptions, write_onnx_repository

    repo = tmp_path_factory.mktemp("triton-python") / "repo"
    for onnx, options in ((dynamic_onnx, TritonOptions(name="fastscnn", backend="python", max_batch=8)),
                          (dynamic_onnx, TritonOptions(name="fastscnn_logits", backend="python", max_batch=4,
                                                       argmax=False)),
                          (dynamic_onnx, TritonOptions(name="fastscnn_frames", backend="python", io="frames",
                                                       max_batch=8)),
                          (image_generator_onnx, TritonOptions(name="copy_frames", backend="python", io="frames",
                                                               max_batch=8)),
                          (dynamic_onnx, TritonOptions(name="fastscnn_spare", backend="python", max_batch=8))):
        write_onnx_repository(onnx, repo, options)
    return repo


# fastscnn_spare stays unloaded
SERVED_MODELS = ["fastscnn", "fastscnn_logits", "fastscnn_frames", "copy_frames"]


@needs_tritonclient
def test_python_backend_repository(python_repo, dynamic_onnx):
    from edgepix.export.triton import PYTHON_MODEL

    config = parse_config(python_repo / "fastscnn")
    assert (config.backend, config.platform, config.max_batch_size) == ("python", "", 8)
    check_config_matches_onnx(config, python_repo / "fastscnn" / "1" / "model.onnx")
    assert config.parameters["edgepix.io"].string_value == "tensors"
    assert config.parameters["edgepix.threads"].string_value == "0"
    assert instance_groups(config) == [(1, "KIND_CPU")]  # the runtime runs on ONNX Runtime's CPU provider there
    assert spec_parameter(config) == ModelSpec.from_onnx(python_repo / "fastscnn" / "1" / "model.onnx")
    assert (python_repo / "fastscnn" / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    # the frames API: uint8 frames of any size in, uint8 class maps at the frame's size out; the ONNX as exported
    frames = parse_config(python_repo / "fastscnn_frames")
    assert [(t.name, t.data_type, list(t.dims)) for t in frames.input] == [("frames", 2, [-1, -1, 3])]
    assert [(t.name, t.data_type, list(t.dims)) for t in frames.output] == [("class_map", 2, [-1, -1])]
    assert frames.output[0].label_filename == "labels.txt"
    assert frames.parameters["edgepix.io"].string_value == "frames"
    assert (python_repo / "fastscnn_frames" / "1" / "model.onnx").read_bytes() == dynamic_onnx.read_bytes()
    # model.py imports the edgepix runtime, numpy and Triton's utilities: never torch
    import ast

    tree = ast.parse(PYTHON_MODEL.read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert imported == {"__future__", "json", "pathlib", "numpy", "triton_python_backend_utils", "edgepix"}


def test_python_backend_refusals(seg_onnx, tmp_path):
    from edgepix.export.triton import TritonOptions
    from edgepix.runtime.core.errors import ExportError

    with pytest.raises(ExportError, match="--triton-io frames needs --triton-backend python"):
        TritonOptions(io="frames")
    with pytest.raises(ExportError, match="use --kind cpu"):
        TritonOptions(backend="python", kind="gpu")
    assert TritonOptions().kind.value == "gpu" and TritonOptions(backend="python").kind.value == "cpu"
    r = run_edgepix("export", str(seg_onnx), "--format", "triton", "--out", str(tmp_path / "repo"), "--max-batch", "0",
                    "--triton-io", "frames")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--triton-backend python" in r.stderr
    assert not (tmp_path / "repo" / "fastscnn").exists()


# ---- the triton backend against a real Triton Inference Server ---------------------------------------------------
# The nvidia-pytriton wheel's tritonserver (tests/triton_server.py) serving the Python-backend repository. It has no
# onnxruntime backend: the onnxruntime_onnx repositories are served by the stand-in further down.

REAL_VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")  # 768x576 street footage (Debian opencv-doc)


def video_frames(n: int) -> list[np.ndarray]:
    """The first n frames of the real video."""
    import cv2

    if not REAL_VIDEO.is_file():
        pytest.skip(f"{REAL_VIDEO} is missing: apt-get install opencv-doc (make system-tools)")
    capture = cv2.VideoCapture(str(REAL_VIDEO))
    images = []
    while len(images) < n:
        ok, image = capture.read()
        assert ok, f"{REAL_VIDEO} ended after {len(images)} frames"
        images.append(image)
    capture.release()
    return images


@pytest.fixture(scope="module")
def triton_install():
    """The nvidia-pytriton wheel's server and the Python its models run in, or a skip saying why not here."""
    from triton_server import find_install

    if __import__("importlib").util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (pip install 'edgepix[triton]')")
    install = find_install()
    if isinstance(install, str):
        pytest.skip(install)
    return install


@pytest.fixture(scope="module")
def triton_server(triton_install, python_repo, tmp_path_factory):
    """One real server for the module: HTTP and gRPC on free loopback ports."""
    from triton_server import TritonServer

    server = TritonServer(triton_install, python_repo, tmp_path_factory.mktemp("tritonserver"),
                          load_models=SERVED_MODELS)
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    yield server
    server.stop()
    assert server.process.poll() is not None


@pytest.fixture
def triton(triton_server):
    """The module's server, started again (same ports) if a test before this one killed it for good."""
    if triton_server.process.poll() is not None:
        triton_server.start()
    return triton_server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["fastscnn", "fastscnn_logits"])
def test_triton_backend_matches_ort_cpu_on_real_video(triton, python_repo, protocol, model):
    from edgepix.runtime.tasks.segmenter import Segmenter

    images = video_frames(10)
    with Segmenter.load(model, "triton", url=triton.url(protocol)) as remote, \
            Segmenter.load(python_repo / model / "1" / "model.onnx", "ort-cpu") as local:
        assert remote.spec == local.spec  # read from the server's model configuration
        assert remote.backend.platform == "python" and remote.backend.protocol == protocol
        got = [r.class_map for r in remote.segment_batch(images)]  # 10 frames: split to the server's max batch
        got += [remote.segment(f).class_map for f in images[:2]]
        want = [r.class_map for r in local.segment_batch(images)] + [local.segment(f).class_map for f in images[:2]]
        stats = remote.backend.run_stats()
        max_batch = remote.backend.max_batch_size
    assert got[0].shape == (576, 768)
    agreement = np.mean([np.mean(a == b) for a, b in zip(got, want)])
    assert agreement >= 0.999, agreement
    assert len(np.unique(np.concatenate([w.ravel() for w in want]))) >= 2  # not a background-only comparison
    requests = -(-len(images) // max_batch) + 2
    assert stats["requests"] == requests and stats["server_requests"] >= requests
    assert stats["reconnects"] == 0 and stats["outage_s"] == 0
    for key in ("round_trip_ms", "client_ms", "network_ms", "server_ms", "server_queue_ms", "server_compute_ms"):
        assert stats[key] >= 0.0, key
    # Triton's time per request is not bounded by the client's round trip: over gRPC it came out above it in 7 of 40
    # runs of a 64x64 Fast-SCNN on two busy cores (by up to 0.9 ms), so network_ms is the difference clamped at 0
    assert stats["server_queue_ms"] + stats["server_compute_ms"] <= stats["server_ms"] + 0.002  # 3-decimal rounding
    assert stats["network_ms"] == round(max(0.0, stats["round_trip_ms"] - stats["client_ms"] - stats["server_ms"]), 3)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_frames_api_matches_the_local_segmenter(triton, python_repo, protocol):
    """Raw video frames in, class maps at the frame's size out: the server runs the whole Segmenter."""
    import importlib

    from edgepix.runtime.tasks.segmenter import Segmenter

    client_module = importlib.import_module(f"tritonclient.{protocol}")
    address = triton.url(protocol).split("://")[1]
    images = np.stack(video_frames(4))
    client = client_module.InferenceServerClient(address)
    frames = client_module.InferInput("frames", list(images.shape), "UINT8")
    frames.set_data_from_numpy(images)
    served = client.infer("fastscnn_frames", [frames]).as_numpy("class_map")
    client.close()
    with Segmenter.load(python_repo / "fastscnn_frames" / "1" / "model.onnx", "ort-cpu") as local:
        want = np.stack([r.class_map for r in local.segment_batch(list(images))])
    assert served.shape == want.shape == (4, 576, 768) and served.dtype == np.uint8
    assert np.mean(served == want) >= 0.999
    # the triton backend sends tensors: it refuses a frames model in one line
    from edgepix.runtime.backends.registry import load_backend

    with pytest.raises(ModelFormatError, match="takes frames .* --triton-io tensors"):
        load_backend("fastscnn_frames", "triton", url=triton.url(protocol))


def test_frames_api_of_an_image_generator(triton, image_generator_onnx):
    """Frames in, the generated images at the frame's size out (BGR uint8), as a local ImageGenerator makes them."""
    import tritonclient.http as httpclient

    from edgepix.runtime.tasks.generator import ImageGenerator

    images = np.stack(video_frames(2))
    client = httpclient.InferenceServerClient(triton.http_url.split("://")[1])
    frames = httpclient.InferInput("frames", list(images.shape), "UINT8")
    frames.set_data_from_numpy(images)
    served = client.infer("copy_frames", [frames]).as_numpy("image")
    client.close()
    with ImageGenerator.load(image_generator_onnx, "ort-cpu", to_frame_size=True) as local:
        want = np.stack(local.generate_batch(list(images)))
    assert served.shape == want.shape == (2, 576, 768, 3) and served.dtype == np.uint8
    assert np.abs(served.astype(int) - want.astype(int)).max() <= 1  # OpenCV 4.6 there, this process's here
    assert np.abs(served.astype(int) - images.astype(int)).mean() < 20  # a copy, through 64x64 and back


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_backend_errors_come_from_types_and_status_codes(triton, protocol):
    from edgepix.runtime.backends.registry import load_backend
    from edgepix.runtime.backends.triton import Failure, classify

    url = triton.url(protocol)
    with pytest.raises(ModelFormatError, match=r"unknown model 'fastscn'; valid: copy_frames, fastscnn, "
                                               r"fastscnn_frames, fastscnn_logits\. Did you mean 'fastscnn'"):
        load_backend("fastscn", "triton", url=url)
    with pytest.raises(ModelFormatError, match="'fastscnn_spare' is in the repository but not ready"):
        load_backend("fastscnn_spare", "triton", url=url)
    with load_backend("fastscnn", "triton", url=url) as b:
        t0 = time.monotonic()
        with pytest.raises(BackendError) as refused:  # the server checks the shape: refused at once, not retried
            b.infer(np.zeros((1, 3, 32, 64), np.float32), check=False)
        assert time.monotonic() - t0 < 2.0 and b.run_stats()["reconnects"] == 0
        status = refused.value.__cause__.status()
        assert status == {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}[protocol]
        assert classify(refused.value.__cause__) is Failure.REFUSED
        assert "\n" not in str(refused.value) and "could not run inference for 'fastscnn'" in str(refused.value)
    # connection refused: the OS's error type (HTTP) or gRPC's UNAVAILABLE; bounded retries, then one line
    from edgepix.benchmarks.stream_bound import free_port

    closed = f"{protocol}://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"is unreachable \(.*\) after 2 retries over") as unreachable:
        load_backend("fastscnn", "triton", url=closed, reconnect_attempts=2, backoff_max=0.1)
    assert time.monotonic() - t0 < 5.0 and "\n" not in str(unreachable.value)
    cause = unreachable.value.__cause__
    if protocol == "http":
        assert isinstance(cause, ConnectionRefusedError)
    else:
        assert cause.status() == "StatusCode.UNAVAILABLE"
    assert classify(cause) is Failure.OUTAGE


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_stalled_server_times_out_on_both_protocols(triton, protocol):
    """SIGSTOP: the server's sockets stay open and nothing answers. timeout_s bounds each try on either protocol
    (HTTP's network timeout, gRPC's deadline), the retries are bounded, and the run ends in one line."""
    from edgepix.runtime.backends.registry import load_backend
    from edgepix.runtime.backends.triton import Failure, classify

    x = np.zeros((1, 3, 64, 64), np.float32)
    with load_backend("fastscnn", "triton", url=triton.url(protocol), timeout_s=0.5, reconnect_attempts=1,
                      backoff_max=0.1) as b:
        want = b.infer(x)["output.class_map"]
        triton.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendError, match=r"is not answering .* after 1 retry") as stalled:
                b.infer(x)
            elapsed = time.monotonic() - t0
        finally:
            triton.resume()
        assert 2 * 0.5 <= elapsed < 3.0, elapsed  # two tries of 0.5 s and one wait of 0.25 s
        assert classify(stalled.value.__cause__) is Failure.TIMEOUT
        np.testing.assert_array_equal(b.infer(x)["output.class_map"], want)  # a new client once it answers


def test_server_killed_and_restarted_mid_stream(triton, tmp_path):
    """`edgepix segment --backend triton` on the real video read live (--realtime: frames arrive at 10 fps whether or
    not inference keeps up): the server is killed (the whole process group, as a crash) and restarted on the same
    ports while the run goes on. The run finishes with exit 0, the outage is in the backend's statistics, and the
    frames that arrived meanwhile are counted as dropped."""
    import tritonclient.http as httpclient

    if not REAL_VIDEO.is_file():
        pytest.skip(f"{REAL_VIDEO} is missing: apt-get install opencv-doc (make system-tools)")
    stats_path = tmp_path / "stats.json"
    client = httpclient.InferenceServerClient(triton.http_url.split("://")[1])

    def served() -> int:
        return int(client.get_inference_statistics("fastscnn")["model_stats"][0]["inference_stats"]["success"]["count"])

    before = served()
    run = subprocess.Popen(
        [sys.executable, "-m", "edgepix", "segment", "fastscnn", "--backend", "triton", "--triton-url",
         triton.grpc_url, "--source", str(REAL_VIDEO), "--realtime", "--sink", "null://", "--duration", "9",
         "--stats", str(stats_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while served() < before + 5 and time.monotonic() < deadline and run.poll() is None:  # the stream runs
            time.sleep(0.1)
        client.close()
        assert run.poll() is None, f"the run ended before the outage: {run.communicate()[1]}"
        triton.kill()
        time.sleep(1.0)
        # the same ports, with only the model the run uses: the four Python-backend models take 10 to 15 s to start
        # again on two busy cores (each stub imports ONNX Runtime and OpenCV), past the backend's default patience
        # (8 retries over 11.8 s); one takes 2 to 4 s
        triton.load_models = ["fastscnn"]
        triton.start()
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if triton.load_models != SERVED_MODELS:  # the next test that needs the server starts it with every model
            triton.stop()
            triton.load_models = SERVED_MODELS
    assert run.returncode == 0, stderr
    stats = json.loads(stats_path.read_text())
    backend = stats["backend_stats"]
    # one outage, however many of the 4 workers waited it out: down 1 s, then the time the server takes to start
    assert backend["reconnects"] == 1 and backend["outage_s"] >= 1.5, backend
    stream = stats["streams"][0]
    assert stream["dropped"] > 0 and stats["dropped"] == stream["dropped"]  # frames of the outage, counted
    # every frame read was processed or counted as dropped, but for the newest one, which may still wait in the live
    # source's one-frame buffer when the duration ends
    assert 0 <= stream["frames_read"] - stream["frames_processed"] - stream["dropped"] <= 1, stream
    assert "reconnecting" in stderr and "reconnected after" in stderr


def test_server_that_never_becomes_ready_fails_with_its_log(triton_install, python_repo, tmp_path):
    """A model that cannot load (its ONNX is not one): the server exits, and the start fails with the lines of its
    log that say why, the edgepix runtime's one-line error among them."""
    from triton_server import TritonServer

    shutil.copytree(python_repo / "fastscnn", tmp_path / "repo" / "fastscnn")
    (tmp_path / "repo" / "fastscnn" / "1" / "model.onnx").write_bytes(b"not an ONNX file")
    server = TritonServer(triton_install, tmp_path / "repo", tmp_path / "work")
    with pytest.raises(RuntimeError, match="tritonserver exited with status 1 before it was ready") as failed:
        server.start()
    assert server.process.poll() is not None
    assert "failed to load 'fastscnn'" in str(failed.value) and "model.onnx" in str(failed.value)


def segment_video(model: str, backend: str, out: Path, *extra: str) -> list[np.ndarray]:
    """`edgepix segment MODEL --backend BACKEND` on the first 12 frames of the real video, masks written as PNGs."""
    import cv2

    if not REAL_VIDEO.is_file():
        pytest.skip(f"{REAL_VIDEO} is missing: apt-get install opencv-doc (make system-tools)")
    r = run_edgepix("segment", model, "--backend", backend, "--source", str(REAL_VIDEO), "--max-frames", "12",
                    "--sink", str(out / "f_%03d.png"), "--vis", "mask", "--stats", str(out / "stats.json"), *extra)
    assert r.returncode == 0, r.stderr
    return [cv2.imread(str(p)) for p in sorted(out.glob("*.png"))]


@pytest.fixture(scope="module")
def ort_cpu_masks(python_repo, tmp_path_factory) -> list[np.ndarray]:
    return segment_video(str(python_repo / "fastscnn" / "1" / "model.onnx"), "ort-cpu",
                         tmp_path_factory.mktemp("ort-cpu-masks"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_segment_cli_through_real_triton_on_video(triton, ort_cpu_masks, tmp_path, protocol):
    """`edgepix segment NAME --backend triton --triton-url` on the real video, against `--backend ort-cpu` on the
    same ONNX: the written masks agree."""
    masks = segment_video("fastscnn", "triton", tmp_path, "--triton-url", triton.url(protocol))
    assert len(masks) == len(ort_cpu_masks) == 12 and masks[0].shape == (576, 768, 3)
    agreement = np.mean([np.mean(np.all(a == b, axis=2)) for a, b in zip(masks, ort_cpu_masks)])
    assert agreement >= 0.999
    stats = json.loads((tmp_path / "stats.json").read_text())
    split = stats["backend_stats"]
    assert split["server"] == triton.url(protocol) and split["requests"] >= 1
    assert split["server_ms"] is not None and split["network_ms"] is not None
    assert stats["config"]["workers"] == 4


def test_server_that_never_comes_back_ends_the_run_in_one_line(triton):
    """A pipeline on the triton backend whose server dies for good: the bounded retries, then the run ends with the
    backend's one-line error. (The server is started again by the next test that needs it.)"""
    from edgepix.runtime.streams.pipeline import Pipeline
    from edgepix.runtime.streams.sinks import make_sink
    from edgepix.runtime.streams.sources import open_source
    from edgepix.runtime.tasks.segmenter import Segmenter

    seg = Segmenter.load("fastscnn", "triton", url=triton.http_url, reconnect_attempts=2, backoff_max=0.2)
    source = open_source("synthetic://?size=320x240&fps=0")
    killer = threading.Timer(1.0, triton.kill)
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(BackendError, match=r"is unreachable .* after 2 retries") as ended:
            Pipeline(seg, [source], [make_sink("null://")]).run()
        elapsed = time.monotonic() - t0
    finally:
        killer.join()
        seg.close()
    assert "\n" not in str(ended.value) and elapsed < 15.0


@needs_tritonclient
def test_the_command_line_sets_the_retries_per_outage():
    """`--triton-retries N` reaches the backend: no server at the URL, one retry, then one line; the flag is checked
    before anything opens."""
    from edgepix.benchmarks.stream_bound import free_port

    closed = f"127.0.0.1:{free_port()}"
    common = ("--source", "synthetic://?size=64x48&frames=5", "--sink", "null://")
    t0 = time.monotonic()
    r = run_edgepix("segment", "fastscnn", "--backend", "triton", "--triton-url", closed, "--triton-retries", "1",
                    *common)
    error = r.stderr.strip().splitlines()[-1]  # after the log line of the retry
    assert r.returncode == 1 and error.startswith("edgepix segment: error: triton server"), r.stderr
    assert "is unreachable" in error and "after 1 retry over" in error and "--triton-retries" in error, r.stderr
    assert time.monotonic() - t0 < 30.0
    for args, message in ((("--backend", "triton", "--triton-retries", "-1"), "expected 0 or more, got -1"),
                          (("--backend", "ort-cpu", "--triton-retries", "2"), "applies to --backend triton")):
        r = run_edgepix("segment", "fastscnn", *args, *common)
        assert r.returncode == 2 or r.returncode == 1, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


# ---- the triton backend against the stand-in: onnxruntime_onnx repositories -------------------------------------
# The pytriton server has no onnxruntime backend, so the onnxruntime_onnx repositories edgepix writes are served here
# by tests/kserve_standin.py (a KServe v2 HTTP stand-in with ONNX Runtime behind it, not Triton).


@pytest.fixture(scope="module")
def standin(triton_repo):
    with KServeStandInServer(triton_repo) as server:
        yield server


@needs_tritonclient
def test_onnxruntime_repository_through_the_standin(standin, triton_repo):
    from edgepix.runtime.tasks.segmenter import Segmenter

    images = frames(6)
    with Segmenter.load("fastscnn", "triton", url=standin.url) as remote, \
            Segmenter.load(triton_repo / "fastscnn" / "1" / "model.onnx", "ort-cpu") as local:
        assert remote.spec == local.spec and remote.backend.platform == "onnxruntime_onnx"
        got = [r.class_map for r in remote.segment_batch(images)]
        want = [r.class_map for r in local.segment_batch(images)]
    assert np.mean([np.mean(a == b) for a, b in zip(got, want)]) >= 0.999


def frames(n: int, size=(240, 320)) -> list[np.ndarray]:
    from edgepix.runtime.data.synthetic import MovingScene, SceneConfig

    scene = MovingScene(seed=3, config=SceneConfig(size=size))
    return [np.ascontiguousarray(scene.next()[0]) for _ in range(n)]


def test_triton_backend_without_tritonclient_says_which_extra(monkeypatch):
    from edgepix.runtime.backends import registry
    from edgepix.runtime.backends.triton import TritonBackend

    for name in ("tritonclient", "tritonclient.http", "tritonclient.grpc"):
        monkeypatch.setitem(sys.modules, name, None)
    assert "pip install 'edgepix[triton]'" in registry.backend_status()["triton"]
    with pytest.raises(BackendError, match=r"pip install 'edgepix\[triton\]'"):
        registry.load_backend("fastscnn", "triton")
    with pytest.raises(DependencyError, match=r"pip install 'edgepix\[triton\]'"):
        TritonBackend("fastscnn")


def test_triton_worker_plan_keeps_several_requests_in_flight():
    from edgepix.runtime.streams.pipeline import choose_workers

    plan = choose_workers("triton", cores=2)
    assert plan.workers == 4 and plan.backend_options() == {}
    assert choose_workers("triton", workers=2, threads=8).workers == 2


# ---- DeepStream -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepstream_dir(seg_checkpoint, tmp_path_factory) -> Path:
    from edgepix.export.deepstream import DeepStreamOptions, write_deepstream_from_checkpoint
    from edgepix.export.pipeline import ExportRequest

    out = tmp_path_factory.mktemp("deepstream")
    result = write_deepstream_from_checkpoint(ExportRequest(seg_checkpoint, verify_n=4), out, DeepStreamOptions(
        batch=3, precision="fp16", sources=("rtsp://camera-1/stream", "file:///videos/yard.mp4")))
    assert result.agreement >= 0.999
    return out


GLIB_READER = r"""
import json, sys
import gi
gi.require_version("GLib", "2.0")
from gi.repository import GLib
out = {}
for path in sys.argv[1:]:
    kf = GLib.KeyFile()
    kf.load_from_file(path, GLib.KeyFileFlags.NONE)
    out[path] = {g: {k: kf.get_string(g, k) for k in kf.get_keys(g)[0]} for g in kf.get_groups()[0]}
print(json.dumps(out))
"""


def glib_parse(*paths: Path) -> dict:
    """Parse key files with GLib's own GKeyFile (what nvinfer and deepstream-app use): from this Python when it has
    PyGObject, else from the system python3 (Debian's python3-gi)."""
    for python in (sys.executable, "/usr/bin/python3"):
        if not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import gi; gi.require_version('GLib', '2.0')"], capture_output=True)
        if probe.returncode == 0:
            r = subprocess.run([python, "-c", GLIB_READER, *map(str, paths)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr  # a GKeyFile parse error is a failure, not a skip
            return json.loads(r.stdout)
    pytest.skip("GLib's key-file parser is not available: apt-get install python3-gi gir1.2-glib-2.0 "
                "(make system-tools)")


def test_deepstream_configs_parse_with_glib(deepstream_dir):
    infer = deepstream_dir / "config_infer_primary_fastscnn.txt"
    app = deepstream_dir / "deepstream_app_fastscnn.txt"
    for path in (infer, app):
        for line in path.read_text().splitlines():
            assert "#" not in line or line.startswith("#"), f"inline comment in {path.name}: {line}"
    parsed = glib_parse(infer, app)
    prop = parsed[str(infer)]["property"]
    onnx_file = deepstream_dir / prop["onnx-file"]
    header = read_onnx_header(onnx_file)
    assert prop["network-type"] == "2" and prop["batch-size"] == "3" and prop["network-mode"] == "2"
    assert prop["infer-dims"] == "3;" + ";".join(str(d) for d in header.inputs[0].shape[2:])
    assert prop["output-blob-names"] in [o.name for o in header.outputs]
    assert prop["num-detected-classes"] == "6" and prop["segmentation-threshold"] == "0"
    assert prop["model-engine-file"] == f"{prop['onnx-file']}_b3_gpu0_fp16.engine"
    assert [float(v) for v in prop["offsets"].split(";")] == pytest.approx([123.675, 116.28, 103.53])
    assert (deepstream_dir / prop["labelfile-path"]).read_text().splitlines()[0] == "background"
    groups = parsed[str(app)]
    assert groups["streammux"]["batch-size"] == "3" and groups["streammux"]["live-source"] == "1"
    assert [groups[f"source{i}"]["type"] for i in range(3)] == ["4", "3", "3"]
    assert groups["primary-gie"]["config-file"] == infer.name and groups["segvisual"]["enable"] == "1"
    assert not isinstance(header.inputs[0].shape[0], int)  # nvinfer batches up to batch-size: a dynamic batch


def test_deepstream_adapted_onnx_under_nvinfer_rules_matches_segmenter(deepstream_dir, seg_checkpoint, tmp_path):
    """nvinfer's pre-processing (net-scale-factor, offsets, RGB, bilinear scaling) and its segmentation parser
    (argmax over channels above the threshold), simulated on the adapted ONNX, against the Segmenter on the
    original model: same class maps on camera-sized frames."""
    import onnxruntime as ort

    from edgepix.export.deepstream import NvinferPreprocess, nvinfer_class_map, nvinfer_preprocess
    from edgepix.export.pipeline import ExportRequest, run_export
    from edgepix.runtime.tasks.imageops import map_to_frame
    from edgepix.runtime.tasks.segmenter import Segmenter

    original = run_export(ExportRequest(seg_checkpoint, out=tmp_path / "m.onnx", verify=False)).path
    prop = glib_parse(deepstream_dir / "config_infer_primary_fastscnn.txt")[
        str(deepstream_dir / "config_infer_primary_fastscnn.txt")]["property"]
    _, h, w = (int(v) for v in prop["infer-dims"].split(";"))
    pre = NvinferPreprocess(net_scale_factor=float(prop["net-scale-factor"]),
                            offsets=tuple(float(v) for v in prop["offsets"].split(";")),
                            rgb=prop["model-color-format"] == "0", size=(h, w), nchw=True)
    session = ort.InferenceSession(str(deepstream_dir / prop["onnx-file"]), providers=["CPUExecutionProvider"])
    images = frames(10, size=(576, 768))
    with Segmenter.load(original, "ort-cpu", upsample="classes") as seg:  # nvinfer decides at the network's size
        results = seg.segment_batch(images)
    probs = session.run([prop["output-blob-names"]], {"images": nvinfer_preprocess(images, pre)})[0]
    maps = nvinfer_class_map(probs, float(prop["segmentation-threshold"]))
    assert (maps >= 0).all()  # a softmax output always has a class above threshold 0
    found = np.unique(np.concatenate([r.model_map.ravel() for r in results]))
    assert len(found) >= 3, f"the model finds only classes {found}: the comparison would prove little"
    model_agreement = np.mean([np.mean(m == r.model_map) for m, r in zip(maps, results)])
    frame_agreement = np.mean([np.mean(map_to_frame(m.astype(np.uint8), r.geometry) == r.class_map)
                               for m, r in zip(maps, results)])
    assert model_agreement >= 0.999 and frame_agreement >= 0.999


def test_nvinfer_threshold_rule():
    from edgepix.export.deepstream import nvinfer_class_map

    scores = np.array([[[[0.1, 0.6]], [[0.5, 0.6]], [[0.4, 0.2]]]], np.float32)  # (1, 3, 1, 2)
    np.testing.assert_array_equal(nvinfer_class_map(scores, 0.0), [[[1, 0]]])  # first of equal maxima wins
    np.testing.assert_array_equal(nvinfer_class_map(scores, 0.55), [[[-1, 0]]])  # nothing above: -1


def test_deepstream_refuses_what_nvinfer_cannot_run(seg_onnx, tmp_path):
    r = run_edgepix("export", str(seg_onnx), "--format", "deepstream", "--out", str(tmp_path / "ds"), "--batch", "4")
    assert r.returncode == 1 and "static batch of 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_edgepix("export", str(seg_onnx), "--format", "deepstream", "--out", str(tmp_path / "ds"), "--argmax")
    assert r.returncode == 1 and "Softmax" in r.stderr
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").glob("*.txt"))
    shutil.rmtree(tmp_path / "ds", ignore_errors=True)
