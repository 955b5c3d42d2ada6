"""TensorRT engines: manifest, compatibility, cache, profiles, precision plans, CLI and doctor without a GPU; the
real build and run (marked `gpu`) where TensorRT and an NVIDIA GPU exist, skipped with the reason elsewhere."""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import importlib.util
import json
import logging
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_edgepix

from edgepix.export.tensorrt import BatchRange, SizeRange, default_engine_path, derive_profiles
from edgepix.runtime.backends.tensorrt.build import (
    EngineBuildOptions,
    Heartbeat,
    Int8Mode,
    format_parser_error,
    plan_precision,
)
from edgepix.runtime.backends.tensorrt.cudart import CudaRuntime, pinned_array
from edgepix.runtime.backends.tensorrt.manifest import (
    DeviceFacts,
    EngineManifest,
    ProfileShapes,
    TensorDesc,
    cache_entry_name,
    cache_key,
    cached_engine,
    check_compatibility,
    manifest_path,
    read_manifest,
    scan_engines,
    select_profile,
    write_manifest,
)
from edgepix.runtime.core.errors import BackendError, EdgepixError, ExportError, ModelFormatError
from edgepix.runtime.data.synthetic import CLASS_NAMES
from edgepix.runtime.description.spec import Layout, ModelSpec, Precision

HAS_TRT = importlib.util.find_spec("tensorrt") is not None

SPEC = ModelSpec(task="segmentation", model_name="fastscnn", input_size=(64, 64), class_names=CLASS_NAMES)
ORIN = DeviceFacts("10.3.0", "12.6", "Orin", "8.7")
PROFILE = (ProfileShapes("images", (1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64)),)


def manifest(**changes) -> EngineManifest:
    fields = dict(spec=SPEC, tensorrt=ORIN.tensorrt, cuda=ORIN.cuda, gpu=ORIN.gpu,
                  compute_capability=ORIN.compute_capability, onnx_sha256="ab" * 32, precision="fp16",
                  profiles=(PROFILE,), built="2025-01-01T00:00:00+00:00", builder={"opt_level": 3},
                  onnx="model.fp16.onnx", io=(TensorDesc("images", "input", "float32", (1, 3, 64, 64)),),
                  cache_key="k" * 64)
    fields.update(changes)
    return EngineManifest(**fields)


def fake_engine(folder: Path, name: str = "model.engine", **changes) -> Path:
    engine = folder / name
    engine.write_bytes(b"not a real plan")
    write_manifest(engine, manifest(**changes))
    return engine


# ---- manifest ------------------------------------------------------------------------------------------


def test_manifest_round_trips_and_is_written_atomically(tmp_path):
    engine = fake_engine(tmp_path)
    path = manifest_path(engine)
    assert path.name == "model.engine.json"
    assert read_manifest(engine) == manifest()
    assert read_manifest(path) == manifest()  # the manifest itself works too
    data = json.loads(path.read_text())
    assert data["spec"]["model_name"] == "fastscnn" and data["compute_capability"] == "8.7"
    assert data["profiles"] == [[{"input": "images", "min": [1, 3, 64, 64], "opt": [1, 3, 64, 64],
                                  "max": [1, 3, 64, 64]}]]
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*.partial*"))
    assert ModelSpec.load_json(path) == SPEC  # the spec loader unwraps {"spec": ...}


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d.pop("tensorrt"), "missing key 'tensorrt'"),
    (lambda d: d.update(gpu=""), "gpu: expected a non-empty string"),
    (lambda d: d.update(manifest_version=7), "manifest_version 7"),
    (lambda d: d["profiles"][0][0].update(min=[2, 3, 64, 64]), "needs min <= opt <= max"),
    (lambda d: d["spec"].update(task="detection"), "task: expected one of"),
])
def test_bad_manifests_name_the_key(tmp_path, mutate, expected):
    engine = fake_engine(tmp_path)
    data = json.loads(manifest_path(engine).read_text())
    mutate(data)
    manifest_path(engine).write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match=expected):
        read_manifest(engine)


def test_missing_manifest_says_how_to_rebuild(tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ModelFormatError, match=r"no manifest x\.engine\.json.*edgepix export"):
        read_manifest(engine)


# ---- compatibility -------------------------------------------------------------------------------------


def test_same_device_and_version_loads():
    assert check_compatibility(manifest(), ORIN).ok


def test_tensorrt_version_mismatch_names_both_sides_in_one_line():
    here = DeviceFacts("10.7.0", "12.6", "NVIDIA GeForce RTX 4090", "8.9")
    verdict = check_compatibility(manifest(), here, engine_name="model.engine")
    assert not verdict.ok
    line = verdict.problem
    assert "\n" not in line
    assert "TensorRT 10.3.0 on Orin (sm 8.7)" in line and "TensorRT 10.7.0 on NVIDIA GeForce RTX 4090 (sm 8.9)" in line
    assert "--rebuild" in line and "model.fp16.onnx" in line


def test_compute_capability_mismatch_is_refused_unless_hardware_compatible():
    here = DeviceFacts("10.3.0", "12.6", "NVIDIA A100", "8.0")
    verdict = check_compatibility(manifest(), here)
    assert not verdict.ok and "compute capability 8.7 cannot run on 8.0" in verdict.problem
    assert check_compatibility(manifest(builder={"hardware_compatibility": "ampere_plus"}), here).ok


def test_other_gpu_with_same_compute_capability_loads_with_a_warning():
    verdict = check_compatibility(manifest(), DeviceFacts("10.3.0", "12.6", "Jetson AGX Orin", "8.7"))
    assert verdict.ok and len(verdict.warnings) == 1 and "Jetson AGX Orin" in verdict.warnings[0]


def test_patch_versions_matter_build_numbers_do_not():
    assert check_compatibility(manifest(tensorrt="10.3.0.30"), DeviceFacts("10.3.0.26", None, "Orin", "8.7")).ok
    assert not check_compatibility(manifest(), DeviceFacts("10.3.1", None, "Orin", "8.7")).ok


@pytest.mark.parametrize("here, expected", [
    (DeviceFacts(None, None, "Orin", "8.7"), "TensorRT is not installed here"),
    (DeviceFacts("10.3.0", None, None, None), "no NVIDIA GPU"),
])
def test_missing_tensorrt_or_gpu_is_explained(here, expected):
    verdict = check_compatibility(manifest(), here)
    assert not verdict.ok and expected in verdict.problem and "TensorRT 10.3.0 on Orin" in verdict.problem


# ---- cache ---------------------------------------------------------------------------------------------


KEY_ARGS = dict(onnx_sha256="ab" * 32, tensorrt="10.3.0", gpu="Orin", compute_capability="8.7", precision="fp16",
                profiles=[PROFILE], options={"opt_level": None, "dla_core": None})


def test_cache_key_is_stable_and_sensitive_to_every_input():
    key = cache_key(**KEY_ARGS)
    assert key == cache_key(**{**KEY_ARGS, "profiles": [list(PROFILE)]}) and len(key) == 64
    bigger = (ProfileShapes("images", (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)),)
    for change in ({"onnx_sha256": "cd" * 32}, {"tensorrt": "10.7.0"}, {"gpu": "Xavier"},
                   {"compute_capability": "7.2"}, {"precision": "int8"}, {"profiles": [bigger]},
                   {"options": {"opt_level": 5, "dla_core": None}}, {"options": {"opt_level": None, "dla_core": 0}}):
        assert cache_key(**{**KEY_ARGS, **change}) != key, change


def test_only_plan_changing_options_enter_the_key():
    a = EngineBuildOptions(workspace_mb=512, timing_cache=Path("a.cache"))
    b = EngineBuildOptions(workspace_mb=4096, timing_cache=None)
    assert a.key_options() == b.key_options()
    assert EngineBuildOptions(opt_level=5).key_options() != b.key_options()


def test_cache_entry_names_are_readable():
    name = cache_entry_name("fastscnn", "fp16", "8.7", "10.3.0", "3f2a9c1b7d4e" + "0" * 52)
    assert name == "fastscnn-fp16-sm87-trt10.3.0-3f2a9c1b7d4e.engine"


def test_cache_lookup_finds_only_a_complete_matching_entry(tmp_path):
    key = cache_key(**KEY_ARGS)
    name = cache_entry_name("fastscnn", "fp16", "8.7", "10.3.0", key)
    assert cached_engine(tmp_path, name, key) is None  # empty cache
    engine = fake_engine(tmp_path, name, cache_key=key)
    assert cached_engine(tmp_path, name, key) == engine
    assert cached_engine(tmp_path, name, cache_key(**{**KEY_ARGS, "tensorrt": "10.7.0"})) is None
    manifest_path(engine).unlink()  # an engine without its manifest is not trusted
    assert cached_engine(tmp_path, name, key) is None


# ---- profiles --------------------------------------------------------------------------------------------


def test_static_onnx_gives_a_static_profile():
    (p,) = derive_profiles([("images", (1, 3, 64, 64))], SPEC)
    assert p.static and p.opt == (1, 3, 64, 64)


def test_dynamic_batch_takes_min_opt_max():
    (p,) = derive_profiles([("images", ("batch", 3, 64, 64))], SPEC, batch=BatchRange.parse([1, 4, 8]))
    assert (p.min, p.opt, p.max) == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    (p,) = derive_profiles([("images", (None, 3, 64, 64))], SPEC)  # no --batch: 1
    assert p.static and p.opt[0] == 1


def test_dynamic_size_takes_the_range_and_checks_the_divisor():
    dims = [("images", ("batch", 3, "height", "width"))]
    size = SizeRange.parse([64, 64, 256, 320], (128, 160))
    (p,) = derive_profiles(dims, SPEC, batch=BatchRange.parse([2]), imgsz=size)
    assert (p.min, p.opt, p.max) == ((2, 3, 64, 64), (2, 3, 128, 160), (2, 3, 256, 320))
    (p,) = derive_profiles(dims, SPEC)  # no range: fixed at the spec's size
    assert p.static and p.opt == (1, 3, 64, 64)
    with pytest.raises(ExportError, match=r"min 48x64 is not a multiple of 32"):
        derive_profiles(dims, SPEC, imgsz=SizeRange.parse([48, 64, 256, 256], (64, 64)))


def test_nhwc_uses_the_middle_axes():
    spec = SPEC.replace(input_layout=Layout.NHWC)
    (p,) = derive_profiles([("images", (1, "h", "w", 3))], spec, imgsz=SizeRange.parse([32, 32, 96, 96], (64, 64)))
    assert p.min == (1, 32, 32, 3) and p.max == (1, 96, 96, 3)


@pytest.mark.parametrize("dims, kwargs, expected", [
    ((1, 3, 64, 64), {"batch": BatchRange(1, 4, 8)}, r"fixed batch of 1 .*--dynamic-batch"),
    ((1, 3, 64, 64), {"imgsz": SizeRange((32, 32), (64, 64), (128, 128))}, r"fixed size 64x64.*--dynamic-size"),
    ((1, "c", 64, 64), {}, r"dimension 1 \('c'\) is dynamic"),
    ((1, 3, "h", 64), {}, "both be fixed or both dynamic"),
    (("n", 100), {"imgsz": SizeRange.fixed((64, 64))}, "no image dimensions"),
])
def test_impossible_profiles_are_explained(dims, kwargs, expected):
    with pytest.raises(ExportError, match=expected):
        derive_profiles([("images", dims)], SPEC, **kwargs)


def test_noise_inputs_take_the_batch_only():
    (p,) = derive_profiles([("z", ("n", 100))], None, batch=BatchRange(1, 2, 4))
    assert (p.min, p.opt, p.max) == ((1, 100), (2, 100), (4, 100))


@pytest.mark.parametrize("values, expected", [([1, 2], "takes 1 value"), ([4, 2, 8], "MIN <= OPT <= MAX"),
                                              ([0], "positive integers")])
def test_batch_arguments_are_validated(values, expected):
    with pytest.raises(ExportError, match=expected):
        BatchRange.parse(values)


def test_profile_selection_picks_the_first_profile_that_fits():
    small = (ProfileShapes("images", (1, 3, 64, 64), (1, 3, 64, 64), (4, 3, 64, 64)),)
    large = (ProfileShapes("images", (5, 3, 64, 64), (8, 3, 64, 64), (16, 3, 64, 64)),)
    assert select_profile([small, large], {"images": (2, 3, 64, 64)}) == 0
    assert select_profile([small, large], {"images": (9, 3, 64, 64)}) == 1
    assert select_profile([small, large], {"images": (32, 3, 64, 64)}) is None


def test_default_engine_names():
    assert default_engine_path(Path("m/fastscnn.pt"), Precision.FP16) == Path("m/fastscnn.fp16.engine")
    assert default_engine_path(Path("fastscnn.fp16.onnx"), Precision.FP16) == Path("fastscnn.fp16.engine")
    assert default_engine_path(Path("fastscnn.onnx"), Precision.FP32, argmax=True) == Path("fastscnn.argmax.engine")


# ---- precision plans (TensorRT 10 vs 11) --------------------------------------------------------------------


FP32, FP16 = SPEC, SPEC.replace(precision=Precision.FP16)
QDQ = SPEC.replace(precision=Precision.INT8, quantization="QDQ S8S8 per-channel minmax, 64 calibration images")
U8S8 = SPEC.replace(precision=Precision.INT8, quantization="QDQ U8S8 per-channel minmax, 64 calibration images")


@pytest.mark.parametrize("major", [10, 11])
def test_strongly_typed_paths_work_on_10_and_11(major):
    for requested, onnx in ((Precision.FP32, FP32), (Precision.FP16, FP16), (Precision.INT8, QDQ)):
        plan = plan_precision(requested, onnx, major)
        assert plan.strongly_typed and plan.flags == () and not plan.calibrate, (requested, plan)


def test_weak_typing_exists_only_before_tensorrt_11():
    plan = plan_precision(Precision.FP16, FP32, 10)
    assert not plan.strongly_typed and plan.flags == ("FP16",)
    with pytest.raises(ExportError, match=r"TensorRT 11 has no FP16 builder flag.*onnx-fp16"):
        plan_precision(Precision.FP16, FP32, 11)
    plan = plan_precision(Precision.INT8, FP32, 10, int8_mode=Int8Mode.CALIBRATE)
    assert plan.calibrate and plan.flags == ("INT8", "FP16")
    with pytest.raises(ExportError, match="TensorRT 11 removed implicit INT8 calibration"):
        plan_precision(Precision.INT8, FP32, 11, int8_mode=Int8Mode.CALIBRATE)


def test_int8_needs_a_symmetric_qdq_onnx():
    with pytest.raises(ExportError, match=r"U8S8.*--int8-target tensorrt"):
        plan_precision(Precision.INT8, U8S8, 10)
    with pytest.raises(ExportError, match=r"needs a Q/DQ ONNX.*--int8-mode calibrate"):
        plan_precision(Precision.INT8, FP32, 10)
    with pytest.raises(ExportError, match="needs an FP32 ONNX"):
        plan_precision(Precision.FP32, FP16, 10)


def test_dla_plans():
    assert plan_precision(Precision.FP16, FP16, 10, dla=True).flags == ("FP16",)
    assert plan_precision(Precision.INT8, QDQ, 10, dla=True).flags == ("INT8", "FP16")
    with pytest.raises(ExportError, match="DLA runs FP16 and INT8 only"):
        plan_precision(Precision.FP32, FP32, 10, dla=True)


def test_build_options_are_validated_and_round_trip_through_the_manifest():
    for kwargs, expected in (({"opt_level": 6}, "--opt-level"), ({"workspace_mb": 0}, "--workspace"),
                             ({"dla_core": -1}, "--dla-core"), ({"precision": "bf16"}, "precision: expected one of")):
        with pytest.raises(ExportError, match=expected):
            EngineBuildOptions(**kwargs)
    options = EngineBuildOptions(precision="int8", int8_mode="calibrate", workspace_mb=1024, opt_level=4, dla_core=1)
    assert EngineBuildOptions.from_record(json.loads(json.dumps(options.record()))) == options


# ---- builder helpers that need no TensorRT -----------------------------------------------------------------


class _ParserError:
    def __init__(self, node, op, name, desc):
        self._v = {"node": node, "node_operator": op, "node_name": name, "desc": desc}

    def __getattr__(self, key):
        return lambda: self._v[key]


def test_parser_errors_become_one_line_each():
    line = format_parser_error(_ParserError(12, "Resize", "up1", "Unsupported mode:\n  'cubic'"))
    assert line == "node 12, Resize 'up1': Unsupported mode: 'cubic'"
    assert format_parser_error(_ParserError(-1, "", "", "Invalid model")) == "Invalid model"


def test_heartbeat_logs_while_a_build_runs(caplog):
    import time

    with caplog.at_level(logging.INFO, logger="edgepix.tensorrt"), Heartbeat(0.01) as hb:
        time.sleep(0.1)
    assert hb.beats >= 2
    assert any("still building the TensorRT engine..." in r.getMessage() for r in caplog.records)


class _FakeCudart:
    """Stands in for cuda-python's runtime module: (error, value) tuples, error names and strings."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self, fail=0):
        self.fail, self.calls = fail, []

    def cudaMalloc(self, n):
        self.calls.append(("cudaMalloc", n))
        return (self.fail, None if self.fail else 0xDEAD0000)

    def cudaMemcpyAsync(self, *args):
        self.calls.append(("cudaMemcpyAsync", *args))
        return (self.fail,)

    def cudaGetErrorName(self, err):
        return (0, b"cudaErrorInsufficientDriver")

    def cudaGetErrorString(self, err):
        return (0, b"CUDA driver version is insufficient for CUDA runtime version")


def test_cuda_calls_are_checked_and_unwrapped():
    cuda = CudaRuntime(_FakeCudart())
    assert cuda.malloc(16) == 0xDEAD0000
    assert cuda.memcpy_htod_async(1, 2, 16, "stream") is None
    assert cuda.rt.calls[-1] == ("cudaMemcpyAsync", 1, 2, 16, 1, "stream")
    with pytest.raises(BackendError, match=r"CUDA cudaMalloc failed: cudaErrorInsufficientDriver \(CUDA driver "
                                           r"version is insufficient.*edgepix doctor"):
        CudaRuntime(_FakeCudart(fail=35)).malloc(16)


def test_pinned_views_share_memory_with_the_buffer():
    raw = (ctypes.c_uint8 * 64)()
    view = pinned_array(ctypes.addressof(raw), 64, np.float32, (2, 4))
    view[:] = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.frombuffer(raw, dtype=np.float32)[:8].tolist() == list(range(8))
    with pytest.raises(BackendError, match="cannot hold"):
        pinned_array(ctypes.addressof(raw), 64, np.float32, (4, 8))


# ---- the backend refuses a mismatched engine before touching TensorRT ---------------------------------------


def test_backend_refuses_an_engine_from_another_device_in_one_line(tmp_path, monkeypatch):
    import edgepix.runtime.backends.tensorrt.backend as trt_backend

    engine = fake_engine(tmp_path)
    here = DeviceFacts("10.7.0", "12.8", "NVIDIA RTX 6000 Ada Generation", "8.9")
    monkeypatch.setattr(trt_backend, "running_device_facts", lambda device=0: here)
    with pytest.raises(BackendError) as e:
        trt_backend.TensorRTBackend.load(engine)
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT 10.3.0 on Orin (sm 8.7)" in msg and "TensorRT 10.7.0 on NVIDIA RTX 6000" in msg
    assert "rebuild=True" in msg
    with pytest.raises(BackendError, match="TensorRT is not installed here"):  # rebuild needs TensorRT here
        monkeypatch.setattr(trt_backend, "running_device_facts", lambda device=0: DeviceFacts(None, None, None, None))
        trt_backend.TensorRTBackend.load(engine, rebuild=True)


def test_backend_options_are_typed(tmp_path):
    from edgepix.runtime.backends.base import BackendOptionError
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    with pytest.raises(BackendOptionError, match="unknown option"):
        TensorRTBackend.load(fake_engine(tmp_path), cuda_graphs=True)
    with pytest.raises(BackendOptionError, match="device_id"):
        TensorRTBackend.load(fake_engine(tmp_path), device_id=-1)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing; TensorRT is installed")
def test_registry_says_how_to_get_the_tensorrt_backend(tmp_path):
    from edgepix.runtime.backends import load_backend

    with pytest.raises(BackendError, match=r"'tensorrt' is not available here.*pip install 'edgepix\[gpu\]'"):
        load_backend(fake_engine(tmp_path), "auto")


# ---- doctor and the CLI (subprocesses, as a user runs them) ---------------------------------------------------


def test_doctor_engines_reports_each_engine(tmp_path, capsys):
    from edgepix.cli import main

    fake_engine(tmp_path, "model.engine", tensorrt="9.9.9", gpu="Imaginary GPU")  # loads on no real machine
    (tmp_path / "foreign.plan").write_bytes(b"plan")
    code = main(["doctor", "--engines", str(tmp_path)])
    r = types.SimpleNamespace(stdout=capsys.readouterr().out)
    assert code == 1  # an engine that cannot load here makes doctor --engines fail
    lines = r.stdout.splitlines()
    model = next(line for line in lines if "model.engine:" in line)
    foreign = next(line for line in lines if "foreign.plan:" in line)
    assert model.split()[0] == "NO" and "TensorRT 9.9.9 on Imaginary GPU (sm 8.7)" in model
    assert foreign.split()[0] == "NO" and "no manifest" in foreign
    assert "2 engine(s), 2 cannot load here" in r.stdout
    assert "tensorrt" in r.stdout and "gpu" in r.stdout  # the usual doctor table comes first


def test_scan_engines_says_which_load(tmp_path):
    fake_engine(tmp_path, "a.engine")
    fake_engine(tmp_path, "b.engine", tensorrt="8.6.1")
    (tmp_path / "notes.txt").write_text("not an engine")
    statuses = {s.path.name: s for s in scan_engines(tmp_path, ORIN)}
    assert set(statuses) == {"a.engine", "b.engine"}
    assert statuses["a.engine"].loads and "fastscnn fp16" in statuses["a.engine"].detail
    assert not statuses["b.engine"].loads and "TensorRT 8.6.1" in statuses["b.engine"].detail
    with pytest.raises(ModelFormatError, match="expects a folder"):
        scan_engines(tmp_path / "a.engine", ORIN)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing; TensorRT is installed")
def test_export_engine_without_tensorrt_fails_in_one_line(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    r = run_edgepix("export", str(onnx), "--format", "engine", "--precision", "fp16")
    assert r.returncode == 1
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "pip install 'edgepix[gpu]'" in err and "JetPack" in err
    assert not list(tmp_path.glob("*.engine"))


def test_engine_arguments_are_checked_before_anything_runs(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    for args, expected in ((["--batch", "1", "2"], "--batch takes 1 value (N) or 3"),
                           (["--opt-level", "7"], "--opt-level: expected 0..5"),
                           (["--out", str(tmp_path / "m.onnx")], "an engine file ends in .engine")):
        r = run_edgepix("export", str(onnx), "--format", "engine", *args)
        assert r.returncode == 1 and expected in r.stderr, (args, r.stderr)


def test_gpu_check_script_skips_cleanly_without_a_gpu():
    from edgepix.runtime.backends.tensorrt.manifest import running_device_facts

    facts = running_device_facts()
    if facts.gpu and HAS_TRT:
        pytest.skip("this machine has a GPU and TensorRT: gpu_check.sh would run for real")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gpu_check: skipped: no ")


# ---- on a GPU with TensorRT ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'edgepix[gpu]')")
    if importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-python is not installed (pip install 'edgepix[gpu]')")
    from edgepix.runtime.backends.tensorrt.manifest import running_device_facts

    facts = running_device_facts()
    if not facts.gpu:
        pytest.skip("no NVIDIA GPU visible to CUDA")
    return facts


@pytest.fixture(scope="module")
def fp16_onnx(trt_gpu, request, tmp_path_factory):
    from edgepix.export.pipeline import ExportFormat, ExportRequest, run_export

    seg_checkpoint = request.getfixturevalue("seg_checkpoint")  # trained only once the GPU check passed

    out = tmp_path_factory.mktemp("trt") / "fastscnn64.fp16.onnx"
    run_export(ExportRequest(checkpoint=seg_checkpoint, format=ExportFormat.ONNX_FP16, out=out, verify=False))
    return out


@pytest.mark.gpu
def test_fp16_engine_builds_matches_onnx_runtime_and_is_cached(trt_gpu, fp16_onnx, tmp_path):
    from edgepix.export.tensorrt import EngineExportOptions, export_engine_from_onnx

    options = EngineExportOptions(build=EngineBuildOptions(precision=Precision.FP16,
                                                           timing_cache=tmp_path / "timing.cache"),
                                  cache_dir=tmp_path / "cache", verify_n=10)
    first = export_engine_from_onnx(fp16_onnx, tmp_path / "a.engine", options)
    assert not first.reused and first.path.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    m = read_manifest(first.path)
    assert m.tensorrt == trt_gpu.tensorrt and m.gpu == trt_gpu.gpu and m.precision == "fp16"
    assert m.onnx == fp16_onnx.name or Path(m.onnx) == fp16_onnx.resolve()
    second = export_engine_from_onnx(fp16_onnx, tmp_path / "b.engine", options)
    assert second.reused and second.path.read_bytes() == first.path.read_bytes()


@pytest.mark.gpu
def test_engine_runs_with_stage_times_and_cuda_graph(trt_gpu, fp16_onnx, tmp_path):
    from edgepix.export.tensorrt import EngineExportOptions, export_engine_from_onnx
    from edgepix.runtime.backends import load_backend

    options = EngineExportOptions(build=EngineBuildOptions(precision=Precision.FP16), cache_dir=tmp_path / "c",
                                  verify=False)
    engine = export_engine_from_onnx(fp16_onnx, tmp_path / "m.engine", options).path
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with load_backend(fp16_onnx, "ort-cpu") as ref:
        expected = ref.infer(x)[SPEC.output_name]
    for graph in (False, True):
        with load_backend(engine, "tensorrt", cuda_graph=graph) as b:
            assert b.spec.model_name == "fastscnn"
            for _ in range(3):  # the graph is captured after the first call and replayed after that
                out = b.infer(x)[SPEC.output_name]
            assert out.shape == expected.shape
            assert (out.argmax(1) == expected.argmax(1)).mean() >= 0.995
            t = b.last_timings
            assert t is not None and t.compute_ms > 0 and t.h2d_ms >= 0 and t.d2h_ms >= 0
            with pytest.raises(EdgepixError, match="expected shape"):
                b.infer(np.zeros((1, 3, 32, 32), np.float32))


# ---- simulated TensorRT and CUDA: the plumbing, not a GPU result ------------------------------------------------
# A stand-in `tensorrt` module and cuda-python runtime that follow the real APIs' names and call conventions
# (TensorRT 10/11 name-based I/O, cudart's (error, value) tuples). "Device" memory is host memory and the "engine"
# computes 2 * x, so these tests check how edgepix drives the APIs (profiles, shapes, buffers, copies, graph
# capture, caching, manifests); they say nothing about TensorRT's numbers, which only the `gpu` tests measure.
# They are as strict as the real libraries where a kinder stand-in would hide a bug:
# - calibration reads the calibration profile's OPT volume from each device pointer (an illegal access if smaller);
# - an engine reports -1 for every dimension that is dynamic in the network, whatever its profiles;
# - events are stamped on a simulated GPU timeline (the time the stream reaches them), so host work recorded
#   inside an event window shows up in the measured stage;
# - trt.nptype raises TypeError for BF16/FP8/INT4/FP4, as the real one does;
# - a DLA engine is refused while IRuntime.DLA_core is at its default -1 (the documented range is 0..N-1);
# - the builder records the CUDA device current when it is created (TensorRT builds on that device);
# - the current device is per thread, as CUDA's is: a thread that never called cudaSetDevice has none (None here,
#   device 0 on a real GPU), and every set device and every execute_async_v3 is logged with its thread;
# - stream capture records its mode (CUDA's cudaStreamCaptureMode values).


class _FakeCuda:
    cudaStreamNonBlocking = 1

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:  # the values of CUDA's enum
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal, cudaStreamCaptureModeRelaxed = 0, 1, 2

    # Simulated costs in milliseconds: what the GPU spends on each stream operation, and the host on an enqueue.
    H2D_MS, D2H_MS, COMPUTE_MS, ENQUEUE_MS = 1.0, 1.0, 2.0, 0.5

    def __init__(self):
        self.blocks, self.capturing, self.freed = {}, {}, 0
        self._current = threading.local()  # the calling thread's device (cudaSetDevice)
        self.log = []  # (thread name, "set_device" | "execute", device current in that thread)
        self.capture_modes = []
        self.host_ms = 0.0  # the host's clock, advanced by simulated host work
        self.gpu_free_ms = 0.0  # when the stream has finished everything enqueued so far

    def host_work(self, ms):
        self.host_ms += ms

    def gpu_work(self, ms):
        start = max(self.host_ms, self.gpu_free_ms)  # a stream op starts when enqueued and the stream is free
        self.gpu_free_ms = start + ms

    def _alloc(self, n):
        block = (ctypes.c_uint8 * n)()
        self.blocks[ctypes.addressof(block)] = block
        return (0, ctypes.addressof(block))

    def _free(self, ptr):
        self.blocks.pop(ptr)
        self.freed += 1
        return (0,)

    cudaMalloc = cudaMallocHost = _alloc
    cudaFree = cudaFreeHost = _free

    def capacity(self, ptr):
        """Bytes readable from `ptr` (0 if it is not the start of an allocation)."""
        block = self.blocks.get(ptr)
        return ctypes.sizeof(block) if block is not None else 0

    @property
    def device(self):
        """The calling thread's current device; None: this thread never set one."""
        return getattr(self._current, "device", None)

    def cudaSetDevice(self, d):
        self._current.device = d
        self.log.append((threading.current_thread().name, "set_device", d))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        self.gpu_work(self.H2D_MS if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else self.D2H_MS)
        return (0,)

    def cudaMemcpy(self, dst, src, n, kind):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        return (0, 7)

    def cudaStreamSynchronize(self, s):
        self.host_ms = max(self.host_ms, self.gpu_free_ms)
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaEventCreate(self):
        return (0, [0.0])

    def cudaEventRecord(self, e, s):
        e[0] = max(self.host_ms, self.gpu_free_ms)  # the time the GPU reaches the event in stream order
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return (0, b[0] - a[0])

    def cudaEventDestroy(self, e):
        return (0,)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing[s] = []
        self.capture_modes.append(mode)
        return (0,)

    def cudaStreamEndCapture(self, s):
        return (0, self.capturing.pop(s))

    def cudaGraphInstantiate(self, graph, flags):
        return (0, list(graph))

    def cudaGraphLaunch(self, graph_exec, s):
        for op in graph_exec:
            op()
            self.gpu_work(self.COMPUTE_MS)  # a replay is one launch: no per-kernel host enqueue
        return (0,)

    def cudaGraphDestroy(self, g):
        return (0,)

    cudaGraphExecDestroy = cudaGraphDestroy


def _fake_tensorrt(cuda: _FakeCuda, *, version="10.16.1.11", parse_errors=(), dla_cores=0, io_dtypes=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    built = {"profiles": [], "flags": [], "network_flags": None, "monitor_calls": 0}
    trt.built = built

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class DataType(enum.Enum):  # the real enum's members; nptype knows only those numpy has
        FLOAT, HALF, INT8, INT32, BOOL, UINT8, FP8, BF16, INT64, INT4, FP4 = range(11)

    numpy_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                   DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
                   DataType.UINT8: np.uint8}

    def nptype(dt):
        if dt in numpy_types:
            return numpy_types[dt]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    dtypes = {"images": DataType.FLOAT, "output": DataType.FLOAT}
    dtypes.update({k: DataType[v] for k, v in (io_dtypes or {}).items()})

    trt.ILogger, trt.IProgressMonitor, trt.IInt8EntropyCalibrator2 = ILogger, IProgressMonitor, IInt8EntropyCalibrator2
    trt.DataType, trt.nptype = DataType, nptype
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")

    # The network, as the ONNX parser makes it: a dynamic batch (-1), whatever the profiles will say.
    NETWORK_SHAPES = {"images": (-1, 3, 64, 64), "output": (-1, 6, 64, 64)}

    class Tensor:
        def __init__(self, name):
            self.name, self.shape, self.dtype = name, NETWORK_SHAPES[name], dtypes[name]

    class Network:
        num_inputs = num_outputs = 1

        def get_input(self, i):
            return Tensor("images")

        def get_output(self, i):
            return Tensor("output")

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path):
            return not parse_errors

        def get_error(self, i):
            return _ParserError(*parse_errors[i])

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (tuple(lo), tuple(mid), tuple(hi))

    class Config:
        progress_monitor = int8_calibrator = None
        default_device_type, DLA_core = "GPU", -1

        def __init__(self):
            self.calibration_profile = None

        def set_calibration_profile(self, profile):
            self.calibration_profile = profile
            built["calibration_profile"] = profile.shapes
            return True

        def set_memory_pool_limit(self, pool, size):
            built["workspace"] = size

        def set_flag(self, f):
            built["flags"].append(f)

        def add_optimization_profile(self, p):
            built["profiles"].append(p.shapes)

        def create_timing_cache(self, blob):
            return types.SimpleNamespace(serialize=lambda: memoryview(bytes(blob) + b"+timings"))

        def set_timing_cache(self, cache, ignore_mismatch):
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.logger = logger
            built["device"] = cuda.device  # TensorRT builds on the calling thread's current device

        def create_network(self, flags):
            built["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def _calibrate(self, config):
            """What TensorRT does with a calibrator: read the cache, else pull batches at the calibration shape."""
            cal = config.int8_calibrator
            if cal.read_calibration_cache() is not None:
                return True
            # MIN and MAX of the calibration profile are overwritten by OPT: every batch has the OPT shape.
            shape = config.calibration_profile.shapes["images"][1] if config.calibration_profile else None
            if shape is None:
                shape = built["profiles"][0]["images"][1]
            n = int(np.prod(shape))
            while (ptrs := cal.get_batch(["images"])) is not None:
                if cuda.capacity(ptrs[0]) < 4 * n:
                    self.logger.log(ILogger.Severity.ERROR, f"calibration: an illegal memory access reading "
                                    f"{4 * n} bytes for shape {shape} from a {cuda.capacity(ptrs[0])}-byte buffer")
                    return False
                data = np.frombuffer((ctypes.c_float * n).from_address(ptrs[0]), np.float32).reshape(shape)
                built.setdefault("calibration_sums", []).append([float(x.sum()) for x in data])
            cal.write_calibration_cache(memoryview(b"calibration table"))
            return True

        def build_serialized_network(self, network, config):
            m = config.progress_monitor
            if m is not None:
                m.phase_start("Building engine", None, 2)
                built["monitor_calls"] += int(m.step_complete("Building engine", 0))
                m.phase_finish("Building engine")
            if config.int8_calibrator is not None and not self._calibrate(config):
                return None
            dla = config.DLA_core if config.default_device_type == "DLA" else None
            profile = built["profiles"][-1]["images"]
            return memoryview(b"FAKEPLAN" + json.dumps({"profile": profile, "dla_core": dla}).encode())

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses, self.shape, self.profile = engine, {}, None, 0

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile
            self.shape = tuple(shape)
            return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

        def get_tensor_shape(self, name):
            n, _, h, w = self.shape
            return (n, 6, h, w)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream):
            cuda.log.append((threading.current_thread().name, "execute", cuda.device))

            def run():
                n = int(np.prod(self.shape))
                x = np.frombuffer((ctypes.c_float * n).from_address(self.addresses["images"]), np.float32)
                out = (ctypes.c_float * (n * 2)).from_address(self.addresses["output"])
                y = np.frombuffer(out, np.float32).reshape(self.get_tensor_shape("output"))
                y[:] = 2 * np.concatenate([x.reshape(self.shape)] * 2, axis=1)
            self.engine.runs += 1
            if stream in cuda.capturing:
                cuda.capturing[stream].append(run)
            else:
                run()
                cuda.host_work(cuda.ENQUEUE_MS)  # the host launches the kernels...
                cuda.gpu_work(cuda.COMPUTE_MS)  # ...which run on the stream
            return True

    class Engine:
        num_io_tensors, num_optimization_profiles = 2, 1

        def __init__(self, profile):
            self.profile, self.runs = profile, 0

        def get_tensor_name(self, i):
            return ("images", "output")[i]

        def get_tensor_mode(self, name):
            return "in" if name == "images" else "out"

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_shape(self, name):
            return NETWORK_SHAPES[name]  # -1 where the network is dynamic, even if the profile fixes it

        def get_tensor_profile_shape(self, name, p):
            return self.profile

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        DLA_core = -1  # TensorRT's default: no DLA core chosen
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if not data.startswith(b"FAKEPLAN"):
                self.logger.log(ILogger.Severity.ERROR, "magic tag does not match")
                return None
            plan = json.loads(data[8:])
            if plan["dla_core"] is not None and not 0 <= self.DLA_core < dla_cores:
                self.logger.log(ILogger.Severity.ERROR, f"engine was built for DLA; IRuntime.DLA_core is "
                                f"{self.DLA_core}")
                return None
            built["runtime_dla_core"] = self.DLA_core
            return Engine(tuple(tuple(s) for s in plan["profile"]))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def simulated(monkeypatch, tmp_path):
    import edgepix.runtime.backends.tensorrt.backend as backend_mod
    import edgepix.runtime.backends.tensorrt.build as build_mod
    import edgepix.runtime.backends.tensorrt.cudart as cudart_mod

    cuda = _FakeCuda()
    trt = _fake_tensorrt(cuda)
    facts = DeviceFacts(trt.__version__, "12.9", "Simulated GPU", "8.9")
    import edgepix.export.tensorrt as export_mod

    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(export_mod, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(build_mod, "running_device_facts", lambda device=0: facts)
    monkeypatch.setattr(backend_mod, "running_device_facts", lambda device=0: facts)
    monkeypatch.setattr(cudart_mod, "import_cudart", lambda: cuda)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"an onnx file")
    return types.SimpleNamespace(trt=trt, cuda=cuda, onnx=onnx, tmp=tmp_path)


def _build(sim, out="model.engine", **kwargs):
    from edgepix.runtime.backends.tensorrt.build import build_engine_file

    options = kwargs.pop("options", EngineBuildOptions(precision=Precision.FP32,
                                                       timing_cache=sim.tmp / "timing.cache"))
    profile = (ProfileShapes("images", (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)),)
    return build_engine_file(sim.onnx, sim.tmp / out, spec=SPEC, options=options, profiles=[profile],
                             cache_dir=sim.tmp / "cache", **kwargs)


def test_simulated_build_writes_engine_manifest_cache_and_timing_cache(simulated):
    first = _build(simulated)
    assert not first.reused and first.path.read_bytes().startswith(b"FAKEPLAN")
    built = simulated.trt.built
    assert built["network_flags"] == 1  # STRONGLY_TYPED on TensorRT 10
    assert built["profiles"] == [{"images": ((1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))}]
    assert built["monitor_calls"] == 1  # the IProgressMonitor was attached and answered "go on"
    assert (simulated.tmp / "timing.cache").read_bytes() == b"+timings"
    m = read_manifest(first.path)
    assert m.onnx == "model.onnx" and m.gpu == "Simulated GPU" and m.builder["plan"] == "FP32, strongly typed"
    assert [t.to_dict() for t in m.io] == [
        {"name": "images", "mode": "input", "dtype": "float32", "shape": [-1, 3, 64, 64]},
        {"name": "output", "mode": "output", "dtype": "float32", "shape": [-1, 6, 64, 64]}]
    again = _build(simulated, "copy.engine")
    assert again.reused and again.path.read_bytes() == first.path.read_bytes()
    assert read_manifest(again.path).onnx == "model.onnx"
    assert not _build(simulated, "copy.engine", rebuild=True).reused
    assert len(list((simulated.tmp / "cache").glob("*.engine"))) == 1


def test_simulated_parser_errors_are_all_shown(simulated, monkeypatch):
    import edgepix.runtime.backends.tensorrt.build as build_mod

    trt = _fake_tensorrt(simulated.cuda, parse_errors=[(3, "Resize", "up", "cubic mode"), (9, "NonZero", "nz", "x")])
    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: trt)
    with pytest.raises(ExportError) as e:
        _build(simulated)
    lines = str(e.value).splitlines()
    assert "could not parse" in lines[0] and "(2 errors)" in lines[0]
    assert lines[1:] == ["  node 3, Resize 'up': cubic mode", "  node 9, NonZero 'nz': x"]


def test_simulated_tensorrt_11_refuses_weak_typing(simulated, monkeypatch):
    import edgepix.runtime.backends.tensorrt.build as build_mod

    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: _fake_tensorrt(simulated.cuda, version="11.4.0.106"))
    monkeypatch.setattr(build_mod, "running_device_facts", lambda device=0: DeviceFacts("11.4.0", None, "G", "9.0"))
    with pytest.raises(ExportError, match="TensorRT 11 has no FP16 builder flag"):
        _build(simulated, options=EngineBuildOptions(precision=Precision.FP16))


def test_simulated_backend_runs_profiles_pinned_copies_timings_and_cuda_graph(simulated):
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    engine = _build(simulated).path
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with TensorRTBackend.load(engine) as b:
        assert b.spec == SPEC and [m.name for m in b.inputs] == ["images"] and b.inputs[0].shape[0] is None
        out = b.infer(x)["output"]
        assert out.shape == (3, 6, 64, 64) and np.array_equal(out[:, :3], 2 * x)
        assert b.last_timings is not None and b.last_timings.compute_ms >= 0
        assert np.array_equal(b.infer(x[:1])["output"][:, 3:], 2 * x[:1])  # a new shape re-binds
        with pytest.raises(EdgepixError, match=r"outside the engine's optimization profile.*--batch"):
            b.infer(np.zeros((5, 3, 64, 64), np.float32))
        assert b.optimal_shape("images") == (2, 3, 64, 64)
    assert simulated.cuda.blocks == {}  # every device and pinned buffer was freed


def test_simulated_cuda_graph_is_captured_once_for_fixed_shapes(simulated):
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend
    from edgepix.runtime.backends.tensorrt.build import build_engine_file

    profile = (ProfileShapes("images", (2, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 64)),)

    engine = build_engine_file(simulated.onnx, simulated.tmp / "static.engine", spec=SPEC,
                               options=EngineBuildOptions(precision=Precision.FP32), profiles=[profile],
                               cache_dir=simulated.tmp / "cache").path
    x = np.ones((2, 3, 64, 64), np.float32)
    with TensorRTBackend.load(engine, cuda_graph=True) as b:
        assert b.inputs[0].shape == (2, 3, 64, 64)  # fixed by the profile, though TensorRT reports -1
        for i in range(4):
            assert np.array_equal(b.infer(x * i)["output"][:, 3:], 2 * x * i)
        assert b.cuda_graph_active and "CUDA graph" in b.description
        assert b.engine.runs == 2  # one plain run, one captured; the other calls replayed the graph
    # thread-local capture: another thread's engine may call cudaMalloc meanwhile without breaking this capture
    assert simulated.cuda.capture_modes == [_FakeCuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal]


def test_simulated_pipeline_workers_each_run_their_own_engine_on_its_device(simulated):
    """Two inference workers on an engine loaded for device 1: one engine instance each (an execution context is
    not thread-safe), and each worker thread makes device 1 current before its first call (a new thread starts on
    device 0). Stand-ins only: this checks the calls edgepix makes, not a GPU."""
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend
    from edgepix.runtime.streams.pipeline import Pipeline, PipelineOptions
    from edgepix.runtime.tasks.segmenter import Segmenter

    engine = _build(simulated).path
    loaded = []

    def load():
        seg = Segmenter.load(TensorRTBackend.load(engine, device_id=1))
        loaded.append(seg.backend)
        return seg

    cuda = simulated.cuda
    with load() as seg:
        cuda.log.clear()
        pipeline = Pipeline(seg, ["synthetic://?size=64x64&fps=0&frames=40"], ["null://"], PipelineOptions(workers=2),
                            processor_factory=load)
        assert "one model instance each (tensorrt is not thread-safe; 2x the model's memory)" in \
            pipeline.plan.describe()
        stats = pipeline.run()
    assert stats["frames"] == 40 and (stats["config"]["workers"], stats["config"]["model_instances"]) == (2, 2)
    assert len(loaded) == 2 and loaded[0] is not loaded[1] and all(b.closed for b in loaded)
    for worker in ("infer-0", "infer-1"):
        calls = [(what, device) for thread, what, device in cuda.log if thread == worker]
        assert calls[0] == ("set_device", 1), calls[:3]  # before its first call
        assert {device for what, device in calls if what == "execute"} == {1}  # every call on the engine's device
        assert any(what == "execute" for what, _ in calls)
    assert cuda.blocks == {}  # both engines' buffers freed


def test_simulated_backend_rebuilds_a_mismatched_engine_when_asked(simulated, caplog):
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    engine = _build(simulated).path
    old = read_manifest(engine)
    write_manifest(engine, dataclasses.replace(old, tensorrt="10.3.0", gpu="Orin", compute_capability="8.7"))
    with pytest.raises(BackendError, match=r"TensorRT 10\.3\.0 on Orin.*rebuild"):
        TensorRTBackend.load(engine)
    with caplog.at_level(logging.WARNING):
        with TensorRTBackend.load(engine, rebuild=True, cache_dir=simulated.tmp / "cache") as b:
            assert b.manifest.gpu == "Simulated GPU"
    assert read_manifest(engine).compute_capability == "8.9"
    assert any("rebuilding from model.onnx" in r.getMessage() for r in caplog.records)
    engine.write_bytes(b"garbage")  # a corrupt plan: TensorRT's reason comes through
    with pytest.raises(BackendError, match="could not deserialize model.engine: magic tag does not match"):
        TensorRTBackend.load(engine)


def test_simulated_implicit_int8_calibration_on_tensorrt_10(simulated, caplog):
    options = EngineBuildOptions(precision=Precision.INT8, int8_mode=Int8Mode.CALIBRATE)
    batches = [np.full((1, 3, 64, 64), i, np.float32) for i in (1, 2, 3, 4, 5)]
    with caplog.at_level(logging.INFO, logger="edgepix.tensorrt"):
        first = _build(simulated, options=options, calibration=batches)
    built = simulated.trt.built
    assert built["flags"] == ["INT8", "FP16"] and built["network_flags"] == 0  # weak typing for implicit INT8
    # TensorRT calibrates at the calibration profile's OPT shape (batch 2 here): the images arrive two at a time,
    # whole; the fifth would need a partial batch and is left out, with a message
    assert built["calibration_profile"]["images"][1] == (2, 3, 64, 64)
    assert built["calibration_sums"] == [[3 * 64 * 64 * 1, 3 * 64 * 64 * 2], [3 * 64 * 64 * 3, 3 * 64 * 64 * 4]]
    assert any("4 of 5 calibration images" in r.getMessage() for r in caplog.records)
    # the calibration table travels with the engine (a rebuild on the device replays it)
    calib = first.path.with_name(first.path.name + ".calib")
    assert read_manifest(first.path).builder["calibration_cache"] == calib.name
    assert calib.read_bytes() == b"calibration table"
    assert simulated.cuda.blocks == {}  # the calibrator's device buffer was freed
    assert _build(simulated, "b.engine", options=options, calibration=batches).reused
    other = [b + 1 for b in batches]  # other calibration images: another engine
    assert not _build(simulated, "c.engine", options=options, calibration=other).reused
    assert read_manifest(first.path).builder["plan"].startswith("FP32 ONNX, implicit INT8")


def test_simulated_calibration_needs_a_full_opt_batch(simulated):
    options = EngineBuildOptions(precision=Precision.INT8, int8_mode=Int8Mode.CALIBRATE)
    with pytest.raises(ExportError, match=r"1 calibration image.*OPT batch of 2.*--calib-n"):
        _build(simulated, options=options, calibration=[np.ones((1, 3, 64, 64), np.float32)])
    with pytest.raises(ExportError, match=r"calibration images are 3x32x32.*OPT shape 2x3x64x64"):
        _build(simulated, options=options, calibration=[np.ones((2, 3, 32, 32), np.float32)])


def test_simulated_stage_times_leave_host_staging_out(simulated, monkeypatch):
    import edgepix.runtime.backends.tensorrt.backend as backend_mod
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    cuda = simulated.cuda
    real = backend_mod.pinned_array

    def staging(*args, **kwargs):  # copying a frame into pinned memory is host work: 5 ms here
        cuda.host_work(5.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_mod, "pinned_array", staging)
    engine = _build(simulated).path
    with TensorRTBackend.load(engine) as b:
        for _ in range(3):
            b.infer(np.ones((2, 3, 64, 64), np.float32))
            t = b.last_timings
            # each stage is the GPU's time for that stage, as trtexec reports it: no host staging in H2D
            assert (t.h2d_ms, t.compute_ms, t.d2h_ms) == (cuda.H2D_MS, cuda.COMPUTE_MS, cuda.D2H_MS)
            assert t.enqueue_ms >= 0  # host time of the execute_async_v3 call (trtexec's Enqueue Time)


def test_simulated_rebuild_in_another_working_directory(simulated, monkeypatch, caplog):
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    build_host, device = simulated.tmp / "build-host", simulated.tmp / "device"
    build_host.mkdir()
    device.mkdir()
    monkeypatch.chdir(build_host)  # the build machine: a timing cache given relative to its working directory
    options = EngineBuildOptions(precision=Precision.FP32, timing_cache=Path("caches/timing.cache"))
    engine = _build(simulated, options=options).path
    old = read_manifest(engine)
    write_manifest(engine, dataclasses.replace(old, tensorrt="10.3.0", gpu="Orin", compute_capability="8.7"))
    # the device: another working directory, where "caches" is a file
    monkeypatch.chdir(device)
    (device / "caches").write_text("not a folder")
    with TensorRTBackend.load(engine, rebuild=True, cache_dir=simulated.tmp / "device-cache") as b:
        assert b.manifest.gpu == "Simulated GPU"
    timing = list((simulated.tmp / "device-cache").glob("timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"+timings"  # this device's own timing cache
    assert read_manifest(engine).builder["timing_cache"] == str(timing[0])
    assert (device / "caches").read_text() == "not a folder"
    # manifests record absolute cache paths, never ones relative to the build's working directory
    monkeypatch.chdir(build_host)
    recorded = read_manifest(_build(simulated, "again.engine", options=options, rebuild=True).path).builder
    assert recorded["timing_cache"] == str(build_host / "caches" / "timing.cache")
    # a timing cache that cannot be written costs the next build time, not this build
    blocked = simulated.tmp / "blocked"
    blocked.write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING):
        result = _build(simulated, "other.engine", rebuild=True,
                        options=EngineBuildOptions(precision=Precision.FP32, timing_cache=blocked / "t.cache"))
    assert result.path.is_file() and blocked.read_text() == "a file, not a folder"
    assert any("timing cache" in r.getMessage() and "not saved" in r.getMessage() for r in caplog.records)


def test_simulated_rebuild_replays_the_calibration_table_beside_the_engine(simulated, monkeypatch):
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    options = EngineBuildOptions(precision=Precision.INT8, int8_mode=Int8Mode.CALIBRATE)
    images = [np.full((1, 3, 64, 64), i, np.float32) for i in range(4)]
    engine = _build(simulated, options=options, calibration=images).path
    # on the device: only the folder with the engine, its manifest, its table and the ONNX
    device = simulated.tmp / "device"
    device.mkdir()
    for name in (engine.name, engine.name + ".json", engine.name + ".calib", "model.onnx"):
        (device / name).write_bytes((simulated.tmp / name).read_bytes())
    moved = device / engine.name
    write_manifest(moved, dataclasses.replace(read_manifest(moved), tensorrt="10.3.0", gpu="Orin",
                                              compute_capability="8.7"))
    simulated.trt.built.pop("calibration_sums")
    monkeypatch.chdir(device)
    with TensorRTBackend.load(moved, rebuild=True, cache_dir=simulated.tmp / "device-cache") as b:
        assert b.manifest.gpu == "Simulated GPU"
    assert "calibration_sums" not in simulated.trt.built  # the table was replayed, nothing recalibrated


def test_simulated_engine_with_bf16_output_fails_in_one_line(simulated, monkeypatch):
    import edgepix.runtime.backends.tensorrt.build as build_mod
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    trt = _fake_tensorrt(simulated.cuda, io_dtypes={"output": "BF16"})
    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: trt)
    engine = _build(simulated).path
    assert [t.dtype for t in read_manifest(engine).io] == ["float32", "bf16"]
    with pytest.raises(BackendError) as e:
        TensorRTBackend.load(engine)
    assert "\n" not in str(e.value)
    assert "output 'output' is BF16" in str(e.value) and "numpy" in str(e.value)
    assert simulated.cuda.blocks == {}


def test_simulated_build_makes_the_device_current(simulated):
    _build(simulated, options=EngineBuildOptions(precision=Precision.FP32, device=1))
    assert simulated.trt.built["device"] == 1  # TensorRT builds on the current device, not on device 0


def test_simulated_dla_engine_loads_on_its_dla_core(simulated, monkeypatch):
    import edgepix.runtime.backends.tensorrt.build as build_mod
    from edgepix.runtime.backends.tensorrt.backend import TensorRTBackend

    trt = _fake_tensorrt(simulated.cuda, dla_cores=2)
    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: trt)
    engine = _build(simulated, options=EngineBuildOptions(precision=Precision.FP16, dla_core=1)).path
    with TensorRTBackend.load(engine) as b:
        assert trt.built["runtime_dla_core"] == 1  # the core the manifest records
        assert b.infer(np.ones((1, 3, 64, 64), np.float32))["output"].shape == (1, 6, 64, 64)
    with TensorRTBackend.load(engine, dla_core=0):
        assert trt.built["runtime_dla_core"] == 0  # another core of the same device
    with pytest.raises(BackendError, match=r"dla_core 2: this device has 2 DLA core"):
        TensorRTBackend.load(engine, dla_core=2)


def test_cache_key_tells_cu12_from_cu13_tensorrt_builds(simulated, monkeypatch):
    import importlib.metadata

    import edgepix.runtime.backends.tensorrt.build as build_mod
    import edgepix.runtime.backends.tensorrt.manifest as manifest_mod

    assert cache_key(**KEY_ARGS, tensorrt_cuda="cu12") != cache_key(**KEY_ARGS, tensorrt_cuda="cu13")
    installed = {"tensorrt": "10.13.0.35", "tensorrt-cu13-bindings": "10.13.0.35"}

    def version(dist):
        if dist not in installed:
            raise importlib.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert manifest_mod.tensorrt_cuda_variant() == "cu13"
    installed = {"tensorrt-cu12": "10.13.0.35", "tensorrt-cu12-bindings": "10.13.0.35"}
    assert manifest_mod.tensorrt_cuda_variant() == "cu12"
    installed = {}  # JetPack: Debian packages, no pip metadata
    assert manifest_mod.tensorrt_cuda_variant() is None
    monkeypatch.setattr(build_mod, "tensorrt_cuda_variant", lambda: "cu12")
    first = _build(simulated)
    assert read_manifest(first.path).builder["tensorrt_cuda"] == "cu12"
    monkeypatch.setattr(build_mod, "tensorrt_cuda_variant", lambda: "cu13")
    assert not _build(simulated, "b.engine").reused  # same version number, another build of TensorRT


def test_ort_trt_ep_options_fall_back_on_older_onnxruntime(tmp_path, caplog):
    from edgepix.runtime.backends.ort import OrtTensorrtOptions, trt_provider_options

    model = tmp_path / "seg.onnx"
    cache = str(tmp_path / "seg.ort-trt-cache")
    o = OrtTensorrtOptions(builder_optimization_level=5)
    current = trt_provider_options(o, model, ort_version="1.20.1")
    assert current["trt_timing_cache_path"] == cache and current["trt_builder_optimization_level"] == "5"
    with caplog.at_level(logging.WARNING):
        v116 = trt_provider_options(o, model, ort_version="1.16.3")
        v114 = trt_provider_options(o, model, ort_version="1.14.1")
    # before 1.17 the EP writes the timing cache into trt_engine_cache_path: the same folder
    assert "trt_timing_cache_path" not in v116 and v116["trt_engine_cache_path"] == cache
    assert v116["trt_timing_cache_enable"] == "True" and v116["trt_builder_optimization_level"] == "5"
    assert "trt_builder_optimization_level" not in v114  # before 1.15: TensorRT's default level
    messages = [r.getMessage() for r in caplog.records]
    assert any("trt_builder_optimization_level" in m and "1.15" in m and "1.14.1" in m for m in messages)
    # timing cache without the engine cache: the path still points at our folder, the engine cache stays off
    timing_only = trt_provider_options(OrtTensorrtOptions(engine_cache=False), model, ort_version="1.16.0")
    assert timing_only["trt_engine_cache_path"] == cache and "trt_engine_cache_enable" not in timing_only


def _tiny_onnx(path: Path, spec: ModelSpec) -> Path:
    """A 1x1 convolution 3 -> 6 channels with a dynamic batch, carrying `spec`: enough for the export wiring."""
    onnx = pytest.importorskip("onnx", reason="the onnx package makes the test model")
    from onnx import TensorProto, helper, numpy_helper

    from edgepix.export.to_onnx import set_spec_metadata

    w = numpy_helper.from_array(np.ones((6, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["output"])], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 6, 64, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_spec_metadata(model, spec)
    onnx.save(model, str(path))
    return path


def test_simulated_cli_builds_from_an_onnx_then_reuses_the_cache(simulated, capsys):
    from edgepix.cli import main

    onnx = _tiny_onnx(simulated.tmp / "tiny.onnx", SPEC)
    args = ["export", str(onnx), "--format", "engine", "--precision", "fp32", "--batch", "1", "2", "4",
            "--cache", str(simulated.tmp / "cache"), "--no-verify"]
    assert main(args) == 0
    out = capsys.readouterr().out
    engine = simulated.tmp / "tiny.engine"
    assert f"wrote {engine}" in out and "built in" in out and "Simulated GPU sm 8.9" in out
    m = read_manifest(engine)
    assert m.profiles[0][0].min == (1, 3, 64, 64) and m.profiles[0][0].max == (4, 3, 64, 64)
    assert m.spec.precision is Precision.FP32 and m.onnx == "tiny.onnx"
    assert main(args) == 0
    assert "reused from the engine cache" in capsys.readouterr().out
    # FP16 from this FP32 ONNX: TensorRT 10's weak-typing flag (TensorRT 11 refuses; see the test above)
    assert main([*args[:4], "--precision", "fp16", *args[6:]]) == 0
    assert "FP16" in simulated.trt.built["flags"]
    assert read_manifest(simulated.tmp / "tiny.fp16.engine").builder["plan"].startswith("FP32 ONNX, BuilderFlag.FP16")
